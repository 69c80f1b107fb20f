"""MIDI generation in AMT's time windows: the anticipatory loop for decoders (continuation and
AMT-style in-filling) and T5 continuation of pieces of any length (`amt_t5_continue`).

After jthickstun/anticipation `sample.py` `generate` (Apache-2.0), rewritten for batches, a KV
cache and windows longer than the context:

- the tape starts as the prompt triples (events, REST padding, controls already interleaved);
- before every event, each row inserts its next control (anticipated event, control block) as
  soon as `current_time >= control_time - delta` (AMT's delta = 5 s), so a control enters the
  sequence before the events it should shape, exactly where `amtrain.midi.tokenize.anticipate`
  puts controls in training data;
- otherwise the row samples one event, id by id, under `MidiConstraint` (time, duration, note
  in arrival-time order; the onset never before the current time, nor before `floor_time`);
  a window is also rebuilt when a row's current time reaches the end of the TIME block
  (100 s after the window's first onset), so a later onset always stays representable;
- a row stops when an onset reaches `end_time` (that event is dropped, as in AMT) or when it
  has sampled `max_new_events`; remaining controls are appended to its tape (AMT's `future`).

Rows advance in lockstep, one triple per step for every row (a forced control replaces what the
row sampled), so one batch forward serves all rows. Times on the tape are absolute 10 ms bins;
the model sees a window `flag + the last triples` whose times are shifted so its earliest time
is 0 (AMT's `translate(-min_time)` in `add_token`). When a window is full it is rebuilt from the
tape keeping its last `keep` triples (context - stride tokens), shifted again and re-prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.generate.grammar import MidiConstraint
from amtrain.generate.loop import Sampler
from amtrain.generate.steps import LMStep
from amtrain.generate.t5 import t5_prefix_round
from amtrain.models.base import SequenceModel
from amtrain.tokens.midi import (
    ANTICIPATE,
    ATIME_OFFSET,
    AUTOREGRESS,
    CONTROL_OFFSET,
    DELTA,
    MAX_TIME,
    NOTE_OFFSET,
    TIME_OFFSET,
    TIME_RESOLUTION,
)


@dataclass
class AmtSampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    use_cache: bool = True
    stride: int | None = None  # tokens; default context // 2
    delta: int = DELTA * TIME_RESOLUTION  # anticipation interval, bins


def is_control(tri: np.ndarray) -> np.ndarray:
    return tri[:, 2] >= CONTROL_OFFSET


def triple_times(tri: np.ndarray) -> np.ndarray:
    """Onset bins of triples (N, 3), controls included (their ATIME block shifted back)."""
    return tri[:, 0] - np.where(is_control(tri), ATIME_OFFSET, TIME_OFFSET)


def shift_times(tri: np.ndarray, dt: int) -> np.ndarray:
    out = tri.copy()
    out[:, 0] += dt
    return out


def fit_window(tri: np.ndarray, max_triples: int, max_span: int = MAX_TIME) -> int:
    """Largest n <= max_triples such that the last n triples span < max_span bins (a rebuilt
    window spans at most half the TIME block, so its next onsets have room to move on)."""
    n = min(max_triples, len(tri))
    times = triple_times(tri)
    while n > 1 and times[-n:].max() - times[-n:].min() >= max_span:
        n -= 1
    return n


def window_rows(fed: list[np.ndarray], num_triples: int, flag: int) -> tuple[np.ndarray, np.ndarray]:
    """flag + the last num_triples of each row's triples, times shifted so each row's window
    starts at 0 (AMT's translate(-min_time)): (B, 1 + 3n) ids and the (B,) offsets shifted away."""
    rows, offsets = [], []
    for tri in fed:
        tail = tri[len(tri) - num_triples:]
        off = int(triple_times(tail).min()) if len(tail) else 0
        offsets.append(off)
        rows.append(np.concatenate([[flag], shift_times(tail, -off).ravel()]))
    return np.stack(rows).astype(np.int64), np.array(offsets, np.int64)


class _Window:
    """The model's view of all rows: flag + relativized triples, with an optional KV cache."""

    def __init__(self, model: SequenceModel, flag: int, use_cache: bool):
        self.model, self.flag, self.step = model, flag, LMStep(model, use_cache)
        self.context = model.cfg.max_seq_len

    def reset(self, fed: list[np.ndarray], num_triples: int) -> torch.Tensor:
        """Rebuild from the last num_triples of each row's fed triples; returns next logits."""
        rows, offsets = window_rows(fed, num_triples, self.flag)
        dev = next(self.model.parameters()).device
        self.seq = torch.tensor(rows, dtype=torch.long, device=dev)  # (B, 1 + 3n)
        self.offset = torch.tensor(offsets, dtype=torch.long, device=dev)  # (B,)
        return self.step.prefill(self.seq, self.context)  # (B, V)

    def push(self, tok: torch.Tensor) -> torch.Tensor:
        self.seq = torch.cat([self.seq, tok], 1)
        return self.step.step(self.seq)

    @property
    def room(self) -> int:
        return self.context - self.seq.shape[1]


@torch.no_grad()
def amt_generate(model: SequenceModel, prompt: np.ndarray, controls: np.ndarray, num_samples: int,
                 sampling: AmtSampling, floor_time: int = 0, end_time: int | None = None,
                 max_new_events: int | None = None) -> tuple[int, list[np.ndarray]]:
    """prompt (L, 3) triples (absolute times, controls interleaved), controls (M, 3) in the
    control block sorted by time, not yet placed. Returns (flag, one tape (L', 3) per sample)."""
    if end_time is None and max_new_events is None:
        raise UserError("MIDI generation needs a length: --length in tokens or seconds (or an in-fill range)")
    context = model.cfg.max_seq_len
    stride = context // 2 if sampling.stride is None else sampling.stride
    if not 3 <= stride <= context - 4:
        raise UserError(f"--stride {stride}: must be in [3, {context - 4}] for a MIDI context of {context}")
    keep = (context - 1 - stride) // 3  # triples kept when a window is rebuilt
    flag = ANTICIPATE if len(controls) or is_control(prompt).any() else AUTOREGRESS
    dev = next(model.parameters()).device
    sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, dev)
    B = num_samples
    fed = [prompt.astype(np.int64)] * B  # every triple the model saw, per row (absolute)
    tapes: list[list[np.ndarray]] = [[prompt.astype(np.int64)] for _ in range(B)]
    pending = [0] * B  # index of each row's next control
    ev = prompt[~is_control(prompt)]
    now = np.full(B, max(int(ev[:, 0].max()) - TIME_OFFSET if len(ev) else 0, floor_time), np.int64)
    done = np.zeros(B, bool)
    num_new = np.zeros(B, np.int64)
    win = _Window(model, flag, sampling.use_cache)
    first = len(prompt) if len(prompt) <= (context - 1) // 3 - 1 else keep
    logits = win.reset(fed, min(fit_window(f, first) for f in fed) if len(prompt) else 0)
    while not done.all():
        rel_now = torch.as_tensor(now, device=win.seq.device) - win.offset
        if win.room < 3 or bool((rel_now >= MAX_TIME - 1).any()):  # full, or no later onset fits
            logits = win.reset(fed, min(fit_window(f, keep, MAX_TIME // 2) for f in fed))
            rel_now = torch.as_tensor(now, device=win.seq.device) - win.offset
        forced = [_due(controls, pending[b], now[b], sampling.delta) for b in range(B)]
        constraint = MidiConstraint(header=1, floor=rel_now)
        triple = []
        for p in range(3):
            logits = constraint(logits, win.seq)
            tok = sampler(logits, win.seq)  # (B, 1)
            for b in range(B):
                due = forced[b]
                if due is not None:
                    tok[b, 0] = int(due[p]) - (win.offset[b] if p == 0 else 0)
            triple.append(tok)
            logits = win.push(tok)
        tri = torch.cat(triple, 1).cpu().numpy()  # (B, 3) window-relative
        for b in range(B):
            t = shift_times(tri[b:b + 1], int(win.offset[b]))
            fed[b] = np.concatenate([fed[b], t])
            if done[b]:
                continue
            if forced[b] is not None:
                tapes[b].append(t)
                pending[b] += 1
                continue
            onset = int(t[0, 0]) - TIME_OFFSET
            if end_time is not None and onset >= end_time:
                done[b] = True
                continue
            tapes[b].append(t)
            now[b] = onset
            num_new[b] += 1
            if max_new_events is not None and num_new[b] >= max_new_events:
                done[b] = True
    return flag, [np.concatenate(tp + [controls[pending[b]:]]) for b, tp in enumerate(tapes)]


@torch.no_grad()
def amt_t5_continue(model: SequenceModel, vocab, flag: int, prompt: np.ndarray, max_new_events: int, num_samples: int,
                    *, context: int, stride: int, seed: int | None = None, **sampling) -> list[np.ndarray]:
    """T5 continuation of prompt triples (L, 3) (absolute times) by max_new_events events: the
    rounds of `amtrain.generate.t5.t5_continue` (`stride` new ids a round), each over the
    window the decoder's loop would rebuild - flag + the last triples (at most context - stride
    ids, spanning < 50 s), times shifted to start at 0 - so any piece, however long, is seen as
    training sequences are. New onsets are never before a row's latest onset, nor past the
    TIME block of the window; they are shifted back to absolute times. One tape (L', 3) per sample."""
    keep = t5_window_triples(context, stride)
    tapes = [prompt.astype(np.int64)] * num_samples
    ev = prompt[~is_control(prompt)]
    now = np.full(num_samples, int(ev[:, 0].max()) - TIME_OFFSET if len(ev) else 0, np.int64)
    remaining, r = max_new_events, 0
    while remaining > 0:
        num = min(fit_window(t, keep, MAX_TIME // 2) for t in tapes) if len(tapes[0]) else 0
        rows, offsets = window_rows(tapes, num, flag)
        n = min(remaining, stride // 3)
        rule = MidiConstraint(header=0, floor=torch.as_tensor(now - offsets, device=next(model.parameters()).device))
        new = t5_prefix_round(model, vocab, rows, 3 * n, [rule], seed=None if seed is None else seed + r,
                              **sampling).reshape(num_samples, n, 3)
        for b in range(num_samples):
            tri = shift_times(new[b], int(offsets[b]))
            tapes[b] = np.concatenate([tapes[b], tri])
            now[b] = max(now[b], int(tri[:, 0].max()) - TIME_OFFSET)
        remaining -= n
        r += 1
    return tapes


def t5_window_triples(context: int, stride: int) -> int:
    """Most triples of a T5 continuation window: flag + triples fill context - stride ids."""
    keep = (context - stride - 1) // 3
    if stride < 3 or keep < 1:
        raise UserError(f"--stride {stride} with --t5-context {context}: T5 MIDI continuation needs "
                        "3 <= stride <= t5_context - 4 (each round's window holds the flag and one event)")
    return keep


def _due(controls: np.ndarray, i: int, now: int, delta: int) -> np.ndarray | None:
    """The row's next control if it is due (current time >= its time - delta), else None."""
    if i < len(controls) and now >= int(controls[i, 0]) - ATIME_OFFSET - delta:
        return controls[i]
    return None


def event_instruments(tri: np.ndarray) -> np.ndarray:
    base = np.where(is_control(tri), CONTROL_OFFSET, 0)
    return (tri[:, 2] - base - NOTE_OFFSET) // 128
