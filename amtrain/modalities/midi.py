"""MIDI as Anticipatory Music Transformer arrival-time events (`amtrain.tokens.midi`).

Tape: `MidiTape(flag, triples (N, 3))` with absolute times (10 ms bins; AMT's `generate`
returns the same): the .npy written is the flag followed by the triples, so for pieces longer
than 100 s the time ids run past the TIME block. Prompts: .mid files or id files; outputs
.mid + .npy.

Strategies: a left-to-right model continues with AMT's anticipatory loop (`amt_generate`) and
in-fills by anticipation (events after the range, and the control instruments' events inside it,
become controls); a denoiser continues by S-mode rounds over windows re-based to start at 0 like
the decoder's (`amt_t5_continue`: any length) and in-fills a time range of a piece under 100 s
as one sentinel span, its encoder seeing at most `t5_context` tokens nearest the range; both
under the AMT grammar (`MidiConstraint`).

Validation metrics: AMT's event perplexity and bits per event (arXiv 2306.08620, Sec. 5). An
event is three tokens (time, duration, note), so a mean per-token cross-entropy `ce` (nats)
gives event perplexity = exp(3 ce) and bits per event = 3 ce / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.modalities.base import (
    GAP,
    Modality,
    RolloutModel,
    SpanLayout,
    check_ids,
    note,
    read_ids,
    save_npy,
)
from amtrain.registry import register_modality
from amtrain.tokens.midi import (
    ANTICIPATE,
    AUTOREGRESS,
    CONTROL_OFFSET,
    DUR_OFFSET,
    EVENT_SIZE,
    MAX_DUR,
    MAX_NOTE,
    MAX_TIME,
    NOTE_OFFSET,
    REST,
    SEPARATOR,
    TIME_OFFSET,
    TIME_RESOLUTION,
    VOCAB_SIZE,
)

MIDI_SUFFIXES = (".mid", ".midi")
MAX_EVENTS_PER_SECOND = 100  # a stop for a model that never moves time on (dense piano ~10-30/s)


@dataclass
class MidiTape:
    flag: int
    triples: np.ndarray  # (N, 3) int64, absolute times, events and controls

    def ids(self) -> np.ndarray:
        return np.concatenate([[self.flag], self.triples.ravel()]).astype(np.int64)

    def events(self) -> np.ndarray:
        """Controls turned back into events (the notes a listener hears), in tape order."""
        tri = self.triples.copy()
        ctrl = tri[:, 2] >= CONTROL_OFFSET
        tri[ctrl] -= CONTROL_OFFSET
        return tri


def event_perplexity(ce_per_token):
    """exp(EVENT_SIZE * ce): perplexity per (time, duration, note) event."""
    return np.exp(EVENT_SIZE * np.asarray(ce_per_token, dtype=np.float64))


def bits_per_event(ce_per_token):
    """EVENT_SIZE * ce / ln 2: information per event in bits."""
    return EVENT_SIZE * np.asarray(ce_per_token, dtype=np.float64) / math.log(2)


def event_metrics(ce_per_token: float) -> dict[str, float]:
    """The pair, as plain floats for logs: {"event_ppl", "bits_per_event"}."""
    return {"event_ppl": float(event_perplexity(ce_per_token)), "bits_per_event": float(bits_per_event(ce_per_token))}


def event_cap(seconds: float) -> int:
    """Most events sampled for a span given in seconds: the stop rule is the end time, this only
    bounds a degenerate model that keeps every onset at the current time."""
    return max(1, round(MAX_EVENTS_PER_SECOND * seconds))



class MidiModality(Modality):
    name = "midi"
    tokenizers = ("midi",)
    encoding = "amt"
    prep = "amtrain.prep.midi:prep_amt"
    prep_options = ("augment", "split", "val_fraction", "test_fraction", "transpose", "stretch", "seed")
    prompt_files = ".mid, .txt ids, .npy ids"
    text_output = False

    def span_layout(self, tokenizer) -> SpanLayout:
        return SpanLayout(unit=EVENT_SIZE, offset=1, inside_documents=True)  # after the AMT flag

    def val_metrics(self, ce_per_token: float) -> dict[str, float]:
        return event_metrics(ce_per_token)

    def notes(self, tokenizer, ids: np.ndarray):
        """AMT ids (events and controls, flags and separators skipped) -> notes."""
        from amtrain.midi.decode import ids_to_notes

        return ids_to_notes(ids)[0]

    def tape_ids(self, rm: RolloutModel, tape: MidiTape) -> np.ndarray:
        return tape.ids()

    def start_tape(self, rm: RolloutModel) -> MidiTape | None:
        """A left-to-right model starts a piece from nothing (AMT's autoregressive flag)."""
        return MidiTape(AUTOREGRESS, np.zeros((0, 3), np.int64)) if rm.family.left_to_right else None

    def generated_part(self, rm: RolloutModel, before: MidiTape, after: MidiTape) -> MidiTape:
        """The triples after the prompt's (with the REST padding a left-to-right continuation
        adds to a MIDI file's events)."""
        from amtrain.generate.amt import is_control

        ev = before.triples[~is_control(before.triples)]
        prompt = _padded(before.triples, int(ev[:, 0].max()) if len(ev) else 0) if rm.family.left_to_right \
            else before.triples
        return MidiTape(after.flag, after.triples[len(prompt):])

    def invalid_ids(self, tokenizer, ids: np.ndarray) -> np.ndarray:
        """The AMT grammar of `MidiConstraint` on a tape (absolute times, so a time may run past
        the TIME block): after the flags, whole (time, dur, note) triples — an event's onset
        never before the latest event onset so far, DUR block, NOTE block or REST — or
        controls (the same blocks + CONTROL_OFFSET, anticipated: their times run ahead), or
        SEPARATOR triples (the next piece's times start again). A trailing partial triple is
        invalid."""
        ids = np.asarray(ids, np.int64)
        bad = np.zeros(ids.size, bool)
        head = 0
        while head < ids.size and ids[head] in (AUTOREGRESS, ANTICIPATE):
            head += 1
        n = (ids.size - head) // 3
        bad[head + 3 * n:] = True
        tri = ids[head:head + 3 * n].reshape(-1, 3).copy()
        sep = (tri == SEPARATOR).all(axis=1)
        ctrl = (tri[:, 2] >= CONTROL_OFFSET) & ~sep
        tri[ctrl] -= CONTROL_OFFSET
        event = ~ctrl & ~sep
        t_ok = tri[:, 0] >= TIME_OFFSET
        latest = TIME_OFFSET
        for i in np.flatnonzero(event | sep).tolist():  # a SEPARATOR starts the next piece at 0
            latest = TIME_OFFSET if sep[i] else latest
            t_ok[i] &= sep[i] or tri[i, 0] >= latest
            latest = latest if sep[i] else max(latest, int(tri[i, 0]))
        d_ok = (tri[:, 1] >= DUR_OFFSET) & (tri[:, 1] < DUR_OFFSET + MAX_DUR)
        n_ok = (tri[:, 2] >= NOTE_OFFSET) & (tri[:, 2] <= NOTE_OFFSET + MAX_NOTE)
        n_ok |= event & (tri[:, 2] == REST)
        ok = np.stack([t_ok, d_ok, n_ok], 1) | sep[:, None]
        bad[head:head + 3 * n] = ~ok.ravel()
        return bad

    # -- prompts and outputs -------------------------------------------------------------
    def read_prompt(self, rm: RolloutModel, path: Path, cfg, codec=None) -> MidiTape:
        """.mid -> events (no controls; padding happens at generation); id file -> the triples as
        given (flags dropped, SEPARATOR triples dropped, controls kept; time ids may run past the
        vocabulary: a rollout's .npy of a long piece holds absolute times)."""
        if path.suffix.lower() in MIDI_SUFFIXES:
            from amtrain.midi.events import MidiReadError, notes_to_events, read_notes

            try:
                events, _ = notes_to_events(read_notes(path))
            except MidiReadError as e:
                raise UserError(f"{path}: {e}") from None
            return MidiTape(AUTOREGRESS, events[np.argsort(events[:, 0], kind="stable")])
        ids = read_ids(path)
        if (ids == GAP).any():
            raise UserError(f"{path}: MIDI prompts mark gaps by time (--infill-range), not by <gap>")
        return _tape_of_ids(ids, path)

    def document_prompt(self, rm: RolloutModel, doc: np.ndarray, cfg) -> tuple[MidiTape, MidiTape, str]:
        """The whole AMT sequence (in-filling takes its range from --infill-range)."""
        tape = _tape_of_ids(np.asarray(doc, np.int64), "the held-out document")
        return tape, tape, f"all {len(tape.triples)} events"

    def write_tape(self, rm: RolloutModel, tape: MidiTape, stem: Path, codec=None, prompt=None) -> list[Path]:
        """.mid, the ids (.npy), and with the prompt a piano roll (.png) marking what was generated."""
        from amtrain.midi.decode import events_to_notes, write_midi

        events = tape.events()[_well_formed(tape.triples)]
        notes = events_to_notes(events)
        write_midi(notes, stem.with_suffix(".mid"))
        files = [stem.with_suffix(".mid"), save_npy(tape.ids(), stem)]
        if prompt is not None:
            from amtrain.midi.pianoroll import plot_notes

            files.append(plot_notes(notes, stem.with_suffix(".png"), title=stem.name,
                                    generated=_generated_mask(events, prompt)))
        return files

    def continuation_tape(self, rm: RolloutModel, prompt):
        return prompt

    def describe(self, rm: RolloutModel, before: MidiTape, after: MidiTape, cfg) -> tuple[str, list[str]]:
        """Notes added and removed (as (onset, duration, note) multisets: a note moved counts
        once each way), seconds of music added, ill-formed triples dropped at writing."""
        from collections import Counter

        old, new = Counter(_notes(before)), Counter(_notes(after))
        added, removed = sum((new - old).values()), sum((old - new).values())
        seconds = (_end(after) - _end(before)) / TIME_RESOLUTION
        bad = int((~_well_formed(after.triples)).sum())
        line = f"{added} notes added, {seconds:+.2f} s; {sum(new.values())} notes in all"
        warnings = []
        if added == 0:
            warnings.append("no notes were generated" + (" in the range" if cfg.mode == "infill" else ""))
        if removed:
            warnings.append(f"{removed} of {sum(old.values())} prompt notes are gone from the result")
        if bad:
            warnings.append(f"{bad} ill-formed triples dropped when writing")
        return line, warnings

    # -- generation ----------------------------------------------------------------------
    def can_infill(self, rm) -> bool:
        return True  # a denoiser by sentinel spans, a left-to-right model by anticipation

    def continue_tape(self, rm: RolloutModel, tape: MidiTape, cfg, num_samples: int, seed_offset: int = 0) -> list:
        from amtrain.generate.amt import amt_generate, is_control

        tri = tape.triples
        ev = tri[~is_control(tri)]
        now = int(ev[:, 0].max()) if len(ev) else 0
        if not rm.family.left_to_right:
            if cfg.seconds:
                raise UserError("T5 MIDI continuation takes --length in tokens (whole events: 3 tokens each)")
            return self._seq2seq_continue(rm, tape, cfg, num_samples, seed_offset)
        tri = _padded(tri, now)
        end = now + round(cfg.length * TIME_RESOLUTION) if cfg.seconds else None
        max_events = event_cap(cfg.length) if cfg.seconds else max(1, int(cfg.length) // 3)
        flag, tapes = amt_generate(rm.model, tri, tri[:0], num_samples, _amt_sampling(cfg, seed_offset),
                                   floor_time=now, end_time=end, max_new_events=max_events)
        return [MidiTape(flag, t) for t in tapes]

    def _seq2seq_continue(self, rm: RolloutModel, tape: MidiTape, cfg, num_samples, seed_offset):
        """S-denoiser rounds over time-shifted windows (`amt_t5_continue`): `--length` tokens,
        whole events."""
        from amtrain.generate.amt import amt_t5_continue, fit_window, t5_window_triples

        stride = cfg.t5_stride(unit=3)
        keep = fit_window(tape.triples, t5_window_triples(cfg.t5_context, stride), MAX_TIME // 2)
        if keep < len(tape.triples):
            note(f"T5 continuation: each round's encoder sees at most the last {keep} of the prompt's "
                  f"{len(tape.triples)} events (--t5-context {cfg.t5_context}, windows under "
                  f"{MAX_TIME // 2 // TIME_RESOLUTION} s, times re-based to 0)")
        out = amt_t5_continue(rm.model, rm.t5_vocab(), tape.flag, tape.triples, max(1, int(cfg.length) // 3),
                              num_samples, context=cfg.t5_context, stride=stride, **cfg.sampling(seed_offset))
        return [MidiTape(tape.flag, t) for t in out]

    def infill_tape(self, rm: RolloutModel, tape: MidiTape, cfg, num_samples: int, seed_offset: int = 0) -> list:
        if cfg.infill_range is None and not cfg.control_instruments:
            raise UserError("MIDI in-filling needs --infill-range START:END (seconds) or --control-instruments")
        if rm.family.left_to_right:
            return self._anticipate(rm, tape, cfg, num_samples, seed_offset)
        return self._seq2seq_infill(rm, tape, cfg, num_samples, seed_offset)

    def _anticipate(self, rm: RolloutModel, tape: MidiTape, cfg, num_samples, seed_offset):
        """Events before the range are the prompt; events at/after its end, and events of the
        control instruments inside it, become controls; the model generates the range."""
        from amtrain.generate.amt import amt_generate, event_instruments
        from amtrain.midi.tokenize import anticipate, pad

        ev = tape.events()
        ev = ev[ev[:, 2] != REST]
        a, b = _range_bins(cfg, ev)
        t = ev[:, 0]
        inside_kept = np.isin(event_instruments(ev), list(cfg.control_instruments)) & (t >= a)
        history = ev[t < a]
        controls = ev[(t >= b) | inside_kept] + CONTROL_OFFSET
        prompt, controls = anticipate(pad(history, a), controls)
        flag, tapes = amt_generate(rm.model, prompt, controls, num_samples, _amt_sampling(cfg, seed_offset),
                                   floor_time=a, end_time=b, max_new_events=event_cap((b - a) / TIME_RESOLUTION))
        return [MidiTape(flag, tp) for tp in tapes]

    def _seq2seq_infill(self, rm: RolloutModel, tape: MidiTape, cfg, num_samples, seed_offset):
        from amtrain.generate.amt import is_control, triple_times
        from amtrain.generate.grammar import MidiConstraint
        from amtrain.generate.t5 import infill_window, t5_infill
        from amtrain.midi.tokenize import pad

        tri = tape.triples
        if not is_control(tri).any() and len(tri):
            tri = pad(tri, int(triple_times(tri).max()))
        if len(tri) and triple_times(tri).max() >= MAX_TIME:
            raise UserError("T5 MIDI in-filling works inside one AMT sequence: the prompt must be shorter than 100 s")
        a, b = _range_bins(cfg, tri)
        t = triple_times(tri)
        prefix = np.concatenate([[tape.flag], tri[t < a].ravel()])
        suffix = tri[t >= b].ravel()
        window = infill_window([prefix, suffix], cfg.t5_context, header=1, unit=3)  # the encoder's memory
        if window.num_cut:
            before, after = (len(window.segments[0]) - 1) // 3, len(window.segments[1]) // 3
            note(f"T5 in-fill: the encoder sees {before} events before the range and {after} after it; "
                 f"{window.num_cut // 3} of the prompt's {len(tri)} events are not shown to it "
                 f"(--t5-context {cfg.t5_context}) and are kept as they are")
        out = t5_infill(rm.model, rm.t5_vocab(), window.segments, num_samples, mode=cfg.denoiser, unit=3,
                        inner=MidiConstraint(header=0, floor=a, ceiling=b), max_span=cfg.max_span // 3 * 3,
                        **cfg.sampling(seed_offset))
        return [MidiTape(int(ids[0]), window.restore(ids)[1:].reshape(-1, 3)) for ids in out]

    # -- alternate -----------------------------------------------------------------------
    def random_region(self, rm: RolloutModel, tape: MidiTape, cfg, rng: np.random.Generator):
        """Seconds: as long as one continuation (or a quarter of the piece), placed uniformly."""
        from amtrain.generate.amt import triple_times

        end = triple_times(tape.triples).max() / TIME_RESOLUTION if len(tape.triples) else 0.0
        width = cfg.length if cfg.seconds else max(end / 4, 0.5)
        start = float(rng.uniform(0, max(end - width, 0)))
        return start, start + width

    def infill_prompt(self, tape: MidiTape, region):
        return tape  # the region travels as cfg.infill_range

    def after_infill(self, rm: RolloutModel, tape: MidiTape) -> MidiTape:
        """After an anticipatory in-fill the suffix rides along as controls; the next iteration
        must see it as plain events again (sorted by onset, RESTs dropped: continuation re-pads)."""
        if not rm.family.left_to_right:
            return tape
        ev = tape.events()
        ev = ev[ev[:, 2] != REST]
        return MidiTape(AUTOREGRESS, ev[np.argsort(ev[:, 0], kind="stable")])


def _padded(tri: np.ndarray, now: int) -> np.ndarray:
    """A MIDI file's events (no controls, no REST) get REST padding as in training; other
    tapes stay as they are."""
    from amtrain.generate.amt import is_control
    from amtrain.midi.tokenize import pad

    if len(tri) and not is_control(tri).any() and not (tri[:, 2] == REST).any():
        return pad(tri, now)
    return tri


def _tape_of_ids(ids: np.ndarray, where) -> MidiTape:
    """AMT ids (flags, then triples) -> a tape: flags dropped, SEPARATOR triples dropped,
    controls kept."""
    flag = AUTOREGRESS
    while ids.size and ids[0] in (AUTOREGRESS, ANTICIPATE):
        flag, ids = int(ids[0]), ids[1:]
    if ids.size % 3:
        raise UserError(f"{where}: {ids.size} ids after the flag is not a whole number of (time, dur, note) triples")
    tri = ids.reshape(-1, 3)
    check_ids(np.concatenate([tri[:, 1:].ravel(), np.minimum(tri[:, 0], 0)]), VOCAB_SIZE, Path(str(where)))  # times: >= 0
    return MidiTape(flag, tri[tri[:, 2] != SEPARATOR])


def _well_formed(tri: np.ndarray) -> np.ndarray:
    """(N,) True for triples whose ids sit in the TIME (events or controls), DUR and NOTE/REST
    blocks; a constrained sampler makes no others, an id file may."""
    ev = tri.copy()
    ctrl = ev[:, 2] >= CONTROL_OFFSET
    ev[ctrl] -= CONTROL_OFFSET
    t_ok = ev[:, 0] >= TIME_OFFSET  # absolute times run past the TIME block on long pieces
    d_ok = (ev[:, 1] >= DUR_OFFSET) & (ev[:, 1] < DUR_OFFSET + MAX_DUR)
    n_ok = (ev[:, 2] >= NOTE_OFFSET) & (ev[:, 2] <= NOTE_OFFSET + MAX_NOTE)
    return t_ok & d_ok & n_ok


def _sounding(tape: MidiTape) -> np.ndarray:
    """The well-formed non-REST events of a tape (controls as events): the notes one hears."""
    ev = tape.events()
    return ev[_well_formed(tape.triples) & (ev[:, 2] != REST)]


def _generated_mask(events: np.ndarray, prompt: MidiTape) -> np.ndarray:
    """(notes,) True for the notes of `events` (in `events_to_notes` order) not in the prompt
    (multiset: a prompt note is matched once)."""
    from collections import Counter

    left = Counter(_notes(prompt))
    ev = events[events[:, 2] != REST]
    mask = np.zeros(len(ev), bool)
    for i, row in enumerate(map(tuple, ev.tolist())):
        if left[row] > 0:
            left[row] -= 1
        else:
            mask[i] = True
    return mask[np.argsort(ev[:, 0], kind="stable")]


def _notes(tape: MidiTape) -> list[tuple[int, int, int]]:
    return [(t, d, n) for t, d, n in _sounding(tape).tolist()]


def _end(tape: MidiTape) -> int:
    ev = _sounding(tape)
    return int((ev[:, 0] - TIME_OFFSET + ev[:, 1] - DUR_OFFSET).max()) if len(ev) else 0


def _amt_sampling(cfg, seed_offset):
    from amtrain.generate.amt import AmtSampling

    s = cfg.sampling(seed_offset)
    return AmtSampling(s["temperature"], s["top_k"], s["top_p"], s["seed"], s["use_cache"], cfg.stride)


def _range_bins(cfg, tri) -> tuple[int, int]:
    from amtrain.generate.amt import triple_times

    if cfg.infill_range is None:
        return 0, int(triple_times(tri).max()) + 1 if len(tri) else 0
    a, b = (round(s * TIME_RESOLUTION) for s in cfg.infill_range)
    if not 0 <= a < b:
        raise UserError(f"--infill-range {cfg.infill_range[0]}:{cfg.infill_range[1]}: need 0 <= START < END")
    return a, b



MIDI = register_modality(MidiModality())
