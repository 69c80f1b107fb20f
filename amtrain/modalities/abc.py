"""ABC notation (`amtrain prep-midi --encoding abc`): tapes are ids (T,) of (symbol, argument)
units (`amtrain.tokens.abc`); prompts are .abc text, MIDI files (converted on the ABC grid) or
id files; outputs are the .abc text, its .mid (abc2midi), a piano roll and the ids.

Every document starts with <START>, so a left-to-right prompt does too. T5 spans and FIM cut on
whole units (2 tokens after the <START>): an ABC note with its accidental, octave marks and
length is never split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic
from amtrain.modalities.base import (
    GAP,
    Modality,
    RolloutModel,
    SpanLayout,
    check_ids,
    read_ids,
    save_npy,
    split_gaps,
)
from amtrain.registry import register_modality

MIDI_SUFFIXES = (".mid", ".midi")


class AbcModality(Modality):
    name = "abc"
    tokenizers = ("abc",)
    prompt_files = ".abc text, .mid, .txt ids, .npy ids"
    text_output = False
    has_velocity = False
    encoding = "abc"
    prep = "amtrain.prep.abc:prep_abc"
    prep_options = ("split", "val_fraction", "test_fraction", "min_freq", "min_length", "max_length", "seed")

    def span_layout(self, tokenizer) -> SpanLayout:
        from amtrain.tokens.abc import UNIT

        return SpanLayout(unit=UNIT, offset=1, inside_documents=True)  # after <START>

    def document_prefix(self, tokenizer) -> list[int]:
        return [tokenizer.start_id]

    def notes(self, tokenizer, ids: np.ndarray):
        """Ids -> ABC text -> abc2midi -> notes (10 ms bins); units holding <UNK> are dropped,
        a fragment without a header plays under the default one (4/4, 120 bpm)."""
        from amtrain.midi.abc import abc_to_notes

        return abc_to_notes(tokenizer.decode(ids))

    # -- prompts and outputs -------------------------------------------------------------
    def document_prompt(self, rm: RolloutModel, doc: np.ndarray, cfg):
        """The base cut (`Modality.document_prompt`) moved onto unit boundaries: the opening
        ends, and an in-fill gap starts and ends, between two (symbol, argument) units."""
        from amtrain.tokens.abc import UNIT

        prompt, original, _ = super().document_prompt(rm, doc, cfg)
        n = len(original) - len(original) % UNIT
        if cfg.mode != "infill":
            return [original[:n]], original[:n], f"its first {n} ids ({n // UNIT} ABC units)"
        a = len(prompt[0]) - len(prompt[0]) % UNIT
        b = min(n, len(original) - len(prompt[1]) + (len(original) - len(prompt[1])) % UNIT)
        piece = original[:n]
        return ([piece[:a], piece[b:]], piece,
                f"its first {n} ids: prefix [0, {a}) <gap: [{a}, {b}) held out> suffix [{b}, {n}), whole ABC units")

    def read_prompt(self, rm: RolloutModel, path: Path, cfg, codec=None):
        """.abc text (split at --gap-marker for in-filling) or a MIDI file (its first tune on
        the ABC grid) -> id segments; id files as given."""
        from amtrain.tokens.abc import AbcTokenizer

        tok = rm.tokenizer
        assert isinstance(tok, AbcTokenizer), tok
        if path.suffix.lower() in MIDI_SUFFIXES:
            from amtrain.midi.abc import AbcError, midi_to_tunes

            try:
                _, tunes = midi_to_tunes(path.read_bytes(), max_tokens=None)
            except AbcError as e:
                raise UserError(f"{path}: {e}") from None
            return [tok.encode_pairs(tunes[0], document=False)]
        if path.suffix.lower() == ".abc":
            parts = path.read_text(errors="replace").split(cfg.gap_marker)
            return [np.asarray(tok.encode(p), np.int64) for p in parts]
        return split_gaps(check_ids(read_ids(path), tok.vocab_size, path))

    def write_tape(self, rm: RolloutModel, tape, stem: Path, codec=None, prompt=None) -> list[Path]:
        """.abc text, .mid (abc2midi), the ids (.npy), and with the prompt a piano roll."""
        from amtrain.midi.abc import abc_to_midi_bytes, abc_to_notes

        ids = np.asarray(tape, np.int64)
        ids = ids[ids != GAP]
        text = rm.tokenizer.decode(ids)
        write_bytes_atomic(stem.with_suffix(".abc"), text.encode())
        files = [stem.with_suffix(".abc")]
        midi = abc_to_midi_bytes(text)
        if midi:
            write_bytes_atomic(stem.with_suffix(".mid"), midi)
            files.append(stem.with_suffix(".mid"))
        files.append(save_npy(ids, stem))
        if prompt is not None and midi:
            from amtrain.midi.pianoroll import plot_notes

            files.append(plot_notes(abc_to_notes(text), stem.with_suffix(".png"), title=stem.name))
        return files

    def describe(self, rm: RolloutModel, before, after, cfg) -> tuple[str, list[str]]:
        line, warnings = super().describe(rm, before, after, cfg)
        from amtrain.midi.abc import abc_to_notes

        notes = abc_to_notes(rm.tokenizer.decode(np.asarray(after, np.int64)))
        if len(notes) == 0:
            warnings.append("abc2midi found no notes in the result")
        return f"{line}; {len(notes)} notes", warnings


ABC = register_modality(AbcModality())
