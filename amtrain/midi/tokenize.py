"""AMT training sequences from event arrays: filters, anticipation augmentation, REST padding,
interleaving, and cutting the stream into 1024-id sequences — numpy versions of
jthickstun/anticipation `tokenize.py` (`maybe_tokenize`, `extract_spans`, `extract_random`,
`extract_instruments`, `tokenize`) and `ops.py` (`pad`, `anticipate`, `translate`, `min_time`),
producing the same ids and drawing the same random numbers in the same order.

Events are (N, 3) int64 arrays of ids (time, dur, note), times non-decreasing.

    piece -> filter -> for k in range(augment):            (k % 10: 0 plain, 1 spans,
               split events/controls (k)                     2-5 random, 6-9 instruments)
               pad with REST so no gap > 1 s (to the piece's end)
               interleave controls: each one right after the first event at/after t - delta
               prefix (SEP, SEP, SEP)
           -> one stream per split -> cut every 1023 ids -> shift times so the sequence's
              first piece starts at 0 (drop the sequence if a time reaches 100 s) -> prefix flag

Controls are the events moved to the control block (+CONTROL_OFFSET). AMT's RNG is the legacy
global `np.random` seeded with 0 per split; here a `np.random.RandomState` is passed in, which
produces the identical stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from amtrain.tokens.midi import (
    ANTICIPATE,
    ATIME_OFFSET,
    AUTOREGRESS,
    CONTROL_OFFSET,
    DELTA,
    DUR_OFFSET,
    EVENT_SIZE,
    MAX_PITCH,
    MAX_TIME,
    MAX_TRACK_INSTR,
    MAX_TRACK_TIME_IN_SECONDS,
    MIN_TRACK_EVENTS,
    MIN_TRACK_TIME_IN_SECONDS,
    NOTE_OFFSET,
    REST,
    SEPARATOR,
    TIME_OFFSET,
    TIME_RESOLUTION,
    M,
)

ANTICIPATION_RATES = 10
SPAN_RATE = 0.05  # AMT's lambda for span augmentation: a span every 20 s on average
SEQ_BODY = EVENT_SIZE * M  # 1023 ids after the flag
DROP_REASONS = ("few_events", "short", "long", "instruments")


def drop_reason(events: np.ndarray) -> str | None:
    """AMT's `maybe_tokenize` filters (it lumps `few_events` into `short`)."""
    if len(events) < MIN_TRACK_EVENTS:
        return "few_events"
    end_time = int(events[:, 0].max()) - TIME_OFFSET
    if end_time < TIME_RESOLUTION * MIN_TRACK_TIME_IN_SECONDS:
        return "short"
    if end_time > TIME_RESOLUTION * MAX_TRACK_TIME_IN_SECONDS:
        return "long"
    if len(instruments(events)) > MAX_TRACK_INSTR:
        return "instruments"
    return None


def instruments(events: np.ndarray) -> list[int]:
    """Instruments in order of first appearance (AMT's `get_instruments(...).keys()`)."""
    instr = (events[:, 2] - NOTE_OFFSET) // MAX_PITCH
    uniq, first = np.unique(instr, return_index=True)
    return uniq[np.argsort(first)].tolist()


def extract_spans(events: np.ndarray, rate: float, rng: np.random.RandomState) -> np.ndarray:
    """Mask of events that become controls: 5 s spans starting at exponential gaps (AMT)."""
    times = events[:, 0]
    is_control = np.zeros(len(events), bool)
    i, span, end_span, next_span = 0, True, TIME_OFFSET, TIME_OFFSET
    while i < len(events):
        if span:
            j = int(np.searchsorted(times, end_span, side="left"))  # first time >= end_span
            j = max(j, i)
            is_control[i:j] = True
            if j == len(events):
                break
            span = False
            next_span = int(times[j]) + int(TIME_RESOLUTION * rng.exponential(1.0 / rate))
            i = j
        j = max(i, int(np.searchsorted(times, next_span, side="left")))  # first time >= next_span
        if j == len(events):
            break
        span, end_span = True, int(times[j]) + DELTA * TIME_RESOLUTION
        is_control[j] = True
        i = j + 1
    return is_control


def augmentation_mask(k: int, events: np.ndarray, instrs: list[int], rng) -> np.ndarray | None:
    """Controls of augmentation k (None: plain autoregressive), drawing AMT's random numbers."""
    if k % 10 == 0:
        return None
    if k % 10 == 1:
        return extract_spans(events, SPAN_RATE, rng)
    if k % 10 < 6:
        r = rng.randint(1, ANTICIPATION_RATES)
        return rng.random_sample(len(events)) < r / float(ANTICIPATION_RATES)
    if len(instrs) > 1:
        u = 1 + rng.randint(len(instrs) - 1)
        subset = rng.choice(instrs, u, replace=False)
        return np.isin((events[:, 2] - NOTE_OFFSET) // MAX_PITCH, subset)
    return None


def pad(events: np.ndarray, end_time: int, density: int = TIME_RESOLUTION) -> np.ndarray:
    """Insert REST events so that no gap between onsets (or to `end_time`) exceeds `density`."""
    times = np.append(events[:, 0], TIME_OFFSET + end_time)  # (N+1,) the end acts as a last onset
    prev = np.concatenate([[TIME_OFFSET], events[:, 0]])  # previous onset (or 0)
    num_rests = np.maximum(0, -(-(times - prev) // density) - 1)  # rests strictly inside each gap
    total = len(events) + int(num_rests.sum())
    out = np.empty((total, 3), np.int64)
    event_pos = np.arange(len(events)) + np.cumsum(num_rests)[:-1]
    out[event_pos] = events
    is_rest = np.ones(total, bool)
    is_rest[event_pos] = False
    gap = np.repeat(np.arange(len(times)), num_rests)  # which gap each rest fills
    step = np.arange(gap.size) - np.repeat(np.cumsum(num_rests) - num_rests, num_rests) + 1
    out[is_rest] = np.stack([prev[gap] + density * step, np.full(gap.size, DUR_OFFSET),
                             np.full(gap.size, REST)], 1)
    return out


def anticipate(events: np.ndarray, controls: np.ndarray, delta: int = DELTA * TIME_RESOLUTION):
    """Interleave controls: each goes right before the first event whose *previous* event time
    is >= its time - delta (AMT ops.anticipate). -> (tokens (T,3), unconsumed controls)."""
    if len(controls) == 0:
        return events, controls
    prev_time = np.concatenate([[0], events[:-1, 0] - TIME_OFFSET])  # (N,)
    at = np.searchsorted(prev_time, controls[:, 0] - ATIME_OFFSET - delta, side="left")
    placed = at < len(events)
    at = at[placed]
    out = np.empty((len(events) + len(at), 3), np.int64)
    ctrl_pos = at + np.arange(len(at))  # controls before event `at`, in order
    is_ctrl = np.zeros(len(out), bool)
    is_ctrl[ctrl_pos] = True
    out[ctrl_pos] = controls[placed]
    out[~is_ctrl] = events
    return out, controls[~placed]


def piece_chunks(events: np.ndarray, augment: int, rng) -> tuple[list[tuple[int, np.ndarray]], int]:
    """A piece's token chunks, one per augmentation: [(k, flat ids with SEP prefix)], rests."""
    end_time = int(events[:, 0].max()) - TIME_OFFSET
    instrs = instruments(events)
    chunks, num_rests = [], 0
    for k in range(augment):
        mask = augmentation_mask(k, events, instrs, rng)
        ev = events if mask is None else events[~mask]
        ctrl = events[:0] if mask is None else events[mask] + CONTROL_OFFSET
        padded = pad(ev, end_time)
        num_rests += int(np.count_nonzero(padded[:, 2] == REST))
        tokens, left = anticipate(padded, ctrl)
        assert len(left) == 0, "padding to the piece's end consumes every control"
        chunks.append((k, np.concatenate([[SEPARATOR] * 3, tokens.ravel()])))
    return chunks, num_rests


def relativize(seq: np.ndarray) -> np.ndarray | None:
    """AMT's translate(seq, -min_time(seq)): shift the times before the first SEPARATOR so the
    earliest is 0; None if any time (after the shift) is >= MAX_TIME (AMT drops the sequence)."""
    tri = seq.reshape(-1, 3)
    sep = np.flatnonzero(tri[:, 2] == SEPARATOR)
    cut = int(sep[0]) if sep.size else len(tri)
    is_ctrl = tri[:, 2] >= CONTROL_OFFSET
    rel = tri[:, 0] - np.where(is_ctrl, ATIME_OFFSET, TIME_OFFSET)
    keep = tri[:, 2] != SEPARATOR
    dt = -int(rel[:cut].min()) if cut else 0
    shift = np.zeros(len(tri), np.int64)
    shift[:cut] = dt
    if np.any((rel + shift)[keep] >= MAX_TIME):
        return None
    out = tri.copy()
    out[:, 0] += shift
    return out.ravel()


@dataclass
class SequenceStats:
    num_sequences: int = 0
    num_dropped_overflow: int = 0  # AMT's "discarded seqs": a time reached MAX_TIME
    num_rests: int = 0
    num_truncated: int = 0
    num_events: int = 0


@dataclass
class SequenceCutter:
    """AMT's stream: chunks are concatenated and cut every 1023 ids; the flag of a sequence is
    that of the augmentation current when the previous sequence was written (AMT's `z`)."""

    sequences: list[np.ndarray] = field(default_factory=list)
    stats: SequenceStats = field(default_factory=SequenceStats)
    _buf: list[np.ndarray] = field(default_factory=list)
    _len: int = 0
    _z: int = AUTOREGRESS

    def add(self, k: int, chunk: np.ndarray) -> None:
        flag = ANTICIPATE if k % 10 != 0 else AUTOREGRESS
        if self._len == 0:
            self._z = flag
        self._buf.append(chunk)
        self._len += len(chunk)
        if self._len < SEQ_BODY:
            return
        stream = np.concatenate(self._buf)
        n_full = len(stream) // SEQ_BODY
        for s in range(n_full):
            seq = relativize(stream[s * SEQ_BODY:(s + 1) * SEQ_BODY])
            if seq is None:
                self.stats.num_dropped_overflow += 1
                continue
            self.sequences.append(np.concatenate([[self._z], seq]).astype(np.uint16))
            self.stats.num_sequences += 1
            self._z = flag
        rest = stream[n_full * SEQ_BODY:]
        self._buf, self._len = [rest], len(rest)

    def take(self) -> list[np.ndarray]:
        out, self.sequences = self.sequences, []
        return out


def tokenize_pieces(pieces, augment: int, rng) -> tuple[list[np.ndarray], SequenceStats]:
    """AMT's `tokenize` over already-filtered pieces [(events, num_truncated)] in order."""
    cutter = SequenceCutter()
    for events, num_truncated in pieces:
        chunks, num_rests = piece_chunks(events, augment, rng)
        cutter.stats.num_rests += num_rests
        cutter.stats.num_truncated += num_truncated * augment
        cutter.stats.num_events += len(events) * augment
        for k, chunk in chunks:
            cutter.add(k, chunk)
    return cutter.take(), cutter.stats
