"""MIDI as nano-GPT-v3's note / velocity / duration tokens (`amtrain.tokens.nvd`).

Tape: the ids of one piece, `START` first (int64 array). Prompts: .mid files (encoded on the
dataset's grid and vocabulary) or id files; outputs: .mid, the tokens as text (.txt), the ids
(.npy) and, for a rollout, a piano roll (.png) with the generated notes hatched.

T5 spans keep an event (sep, n, v, d) whole: unit 4 after START, windows inside documents.
Continuation moves whole events too (sliding window in units of 4).

Validation metrics: bits per note (4 x the per-token cross-entropy / ln 2) beside the bits per
second of music every symbolic encoding reports (`amtrain.modalities.music`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.generate.grammar import Constraint, block_mask
from amtrain.modalities.base import (
    Modality,
    RolloutModel,
    SpanLayout,
    fim_infill,
    left_to_right_continue,
    save_npy,
    seq2seq_continue,
)
from amtrain.registry import register_modality
from amtrain.tokens.nvd import EVENT_SIZE, NvdTokenizer

MIDI_SUFFIXES = (".mid", ".midi")


class NvdModality(Modality):
    name = "nvd"
    tokenizers = ("nvd",)
    encoding = "nvd"
    prep = "amtrain.prep.nvd:prep_nvd"
    prep_options = ("split", "val_fraction", "test_fraction", "transpose", "velocity_shift", "augmented_share",
                    "min_freq", "min_length", "max_length", "grid_ms", "seed")
    prompt_files = ".mid, .txt ids, .npy ids"
    text_output = False
    has_velocity = True

    def span_layout(self, tokenizer) -> SpanLayout:
        return SpanLayout(unit=EVENT_SIZE, offset=1, inside_documents=True)  # after START

    def val_metrics(self, ce_per_token: float) -> dict[str, float]:
        return {"bits_per_note": EVENT_SIZE * ce_per_token / math.log(2)}

    def notes(self, tokenizer, ids: np.ndarray):
        from amtrain.midi.nvd import values_to_notes

        return values_to_notes(tokenizer.decode_values(ids), tokenizer.grid_ms)

    def document_prefix(self, tokenizer) -> list[int]:
        return [tokenizer.start_id]

    # -- prompts and outputs -------------------------------------------------------------
    def read_prompt(self, rm: RolloutModel, path: Path, cfg, codec=None):
        """.mid -> its events on the checkpoint's grid and vocabulary (no START; continuation
        adds it); id files as the base reads them."""
        if path.suffix.lower() not in MIDI_SUFFIXES:
            return super().read_prompt(rm, path, cfg, codec)
        from amtrain.midi.events import MidiReadError, read_notes
        from amtrain.midi.nvd import notes_to_values

        try:
            values = notes_to_values(read_notes(path), _tok(rm).grid_ms)
        except MidiReadError as e:
            raise UserError(f"{path}: {e}") from None
        if not len(values):
            raise UserError(f"{path}: no notes to encode (nvd leaves drums out); give another prompt file")
        return [_tok(rm).encode_values(values)[1:]]

    def document_prompt(self, rm: RolloutModel, doc: np.ndarray, cfg) -> tuple[list, np.ndarray, str]:
        """A held-out document cut at event boundaries: its opening (half the context), or for
        in-filling prefix <gap> suffix with whole events on each side (as the base sizes them)."""
        ids = np.asarray(doc, np.int64)
        ids = ids[1:] if ids.size and ids[0] == _tok(rm).start_id else ids
        events = ids.size // EVENT_SIZE
        if events < 3:
            raise UserError(f"the held-out document has {events} notes, too few to cut; pass --prompt FILE")
        context = rm.context // EVENT_SIZE
        if cfg.mode != "infill":
            piece = ids[:max(1, context // 2) * EVENT_SIZE]
            return [piece], piece, f"its first {piece.size // EVENT_SIZE} of {events} notes"
        gap = max(1, min(context // 8, events // 8))
        side = max(1, min((context - 1 - context // 4) // 2, (events - gap) // 2))
        a, b = side * EVENT_SIZE, (side + gap) * EVENT_SIZE
        piece = ids[:b + a]
        return ([piece[:a], piece[b:]], piece,
                f"its first {piece.size // EVENT_SIZE} of {events} notes: prefix {side} notes <gap: {gap} notes held out> "
                f"suffix {side} notes")

    def write_tape(self, rm: RolloutModel, tape, stem: Path, codec=None, prompt=None) -> list[Path]:
        from amtrain.fileio import write_bytes_atomic
        from amtrain.midi.decode import write_midi

        ids = np.asarray(tape, np.int64)
        notes = self.notes(rm.tokenizer, ids)
        write_midi(notes, stem.with_suffix(".mid"))
        write_bytes_atomic(stem.with_suffix(".txt"), (rm.tokenizer.decode(ids) + "\n").encode())
        files = [stem.with_suffix(".mid"), stem.with_suffix(".txt"), save_npy(ids, stem)]
        if prompt is not None:
            from amtrain.midi.pianoroll import plot_notes

            files.append(plot_notes(notes, stem.with_suffix(".png"), title=stem.name,
                                    generated=self._generated(rm, ids, prompt)))
        return files

    def _generated(self, rm: RolloutModel, ids: np.ndarray, prompt) -> np.ndarray:
        """(notes,) True for notes past the prompt's, in `notes` order (sorted by onset)."""
        before = sum(len(s) for s in prompt) if isinstance(prompt, list) else len(prompt)
        events = _tok(rm).decode_values(ids)
        mask = np.arange(len(events)) >= len(_tok(rm).decode_values(ids[:before]))
        return mask[np.argsort(events[:, 0], kind="stable")]

    def describe(self, rm: RolloutModel, before, after, cfg) -> tuple[str, list[str]]:
        head = np.concatenate(before) if isinstance(before, list) else np.asarray(before)
        old, new = self.notes(rm.tokenizer, head), self.notes(rm.tokenizer, np.asarray(after))
        added = len(new) - len(old)
        seconds = (_end(new) - _end(old)) / 100
        warnings = [] if added > 0 else ["no notes were generated"]
        return f"{added:+d} notes, {seconds:+.2f} s; {len(new)} notes in all", warnings

    # -- generation ----------------------------------------------------------------------
    def continue_tape(self, rm: RolloutModel, tape, cfg, num_samples: int, seed_offset: int = 0) -> list:
        """`--length` tokens (rounded up to whole events); the sliding window moves by events."""
        if cfg.seconds:
            raise UserError("nvd continuation takes --length in tokens (4 per note), not --seconds")
        n = -(-int(cfg.length) // EVENT_SIZE) * EVENT_SIZE
        tok = rm.tokenizer
        if not rm.family.left_to_right:
            return list(seq2seq_continue(rm, tape, n, num_samples, cfg, seed_offset, header=1, unit=EVENT_SIZE,
                                         inner_for=lambda t: NvdGrammar(tok, header=0)))
        return list(left_to_right_continue(rm, tape, n, num_samples, cfg, seed_offset, header=1, unit=EVENT_SIZE,
                                           processor=NvdGrammar(tok, header=1)).numpy())

    def random_region(self, rm: RolloutModel, tape, cfg, rng: np.random.Generator):
        """Alternate's in-fill region: whole events (as many as one continuation), after START."""
        events = (len(tape) - 1) // EVENT_SIZE
        width = max(1, min(int(cfg.length) // EVENT_SIZE, events - 1))
        s = int(rng.integers(0, events - width)) if events > width else 0
        return 1 + s * EVENT_SIZE, 1 + (s + width) * EVENT_SIZE

    def infill_tape(self, rm: RolloutModel, prompt, cfg, num_samples: int, seed_offset: int = 0) -> list:
        """T5: sentinel spans of whole events under the grammar; a FIM decoder as the base does."""
        from amtrain.generate.t5 import t5_infill

        segments = prompt if isinstance(prompt, list) else [prompt]
        if len(segments) < 2:
            raise UserError("in-filling needs a gap: a prompt with a <gap> marker (id files), or no --prompt")
        if rm.family.left_to_right:  # fill in the middle: whole events, closed by END at an event boundary
            tok = _tok(rm)
            first = np.asarray(segments[0], np.int64)
            opened = bool(first.size) and first[0] == tok.start_id
            segments = [first[1:] if opened else first, *segments[1:]]
            tapes = fim_infill(rm, segments, cfg, num_samples, seed_offset, [tok.start_id],
                               processor=NvdGrammar(tok, header=0, end_id=tok.eot_id))
            return [np.concatenate([[tok.start_id], t]).astype(np.int64) if opened else t for t in tapes]
        return t5_infill(rm.model, rm.t5_vocab(), segments, num_samples, mode=cfg.denoiser, unit=EVENT_SIZE,
                         inner=NvdGrammar(_tok(rm), header=0), max_span=max(1, int(cfg.length) // EVENT_SIZE) * EVENT_SIZE,
                         **cfg.sampling(seed_offset))


class NvdGrammar(Constraint):
    """Every event is sep, n, v, d in this order: the position after the header picks the kind,
    whose tokens are one block of the vocabulary (`amtrain.tokens.nvd` orders ids by kind)."""

    def __init__(self, tokenizer, header: int = 1, end_id: int | None = None):
        self.header, self.end_id = header, end_id
        self.blocks = []
        for k in range(EVENT_SIZE):
            ids = np.flatnonzero(tokenizer.kind == k)
            self.blocks.append((int(ids[0]), int(ids[-1]) + 1))

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        k = (generated.shape[1] - self.header) % EVENT_SIZE
        lo, hi = self.blocks[k]
        mask = block_mask(generated.shape[0], vocab, lo, hi, generated.device).clone()
        if self.end_id is not None and k == 0:  # a middle may end between events
            mask[:, self.end_id] = True
        return mask


def _tok(rm: RolloutModel) -> NvdTokenizer:
    assert isinstance(rm.tokenizer, NvdTokenizer), rm.tokenizer  # modality_of("nvd") is this modality
    return rm.tokenizer


def _end(notes) -> int:
    return int((notes.time + notes.dur).max()) if len(notes) else 0


NVD = register_modality(NvdModality())
