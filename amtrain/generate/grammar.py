"""Token-grammar masks: logits processors that keep only the ids a grammar allows next.

Each constraint answers `allowed(generated (B, t), V) -> (B, V) bool` for the next position and,
called as a logits processor, sets every other logit to -inf, so no sampler setting (greedy,
temperature, top-k, top-p) can pick a forbidden id.

`MidiConstraint` (the AMT grammar, after jthickstun/anticipation `sample.py` `safe_logits` and
`add_token`): after `header` ids (the sequence flag), ids come in triples in arrival-time order

    phase 0  TIME block, onset >= the current time (the latest event onset so far, or `floor`)
             and < `ceiling`: never an onset before the current time
    phase 1  DUR block
    phase 2  NOTE block or REST
    never    control (anticipated) ids, SEPARATOR, flags, or any id beyond the MIDI vocabulary

Controls already in the sequence are skipped when finding the current time (they are
anticipated: their times run ahead of the events).

`CodebookConstraint`: audio tokens K per frame, position k of a frame (after `header`) only
takes codebook k's ids [k*1024, (k+1)*1024); never <eot> / <pad>.

`IdsBelow`: ids of the base vocabulary only (T5 continuation: no sentinel, EOS or mode id).

`SpanGrammar`: T5 in-filling targets `<s_0> span_0 <s_1> span_1 ... EOS` (see
`amtrain.generate.t5`).

Forced ids are not a grammar: `amtrain.generate.processors.ForcedTokens` overrides any mask.
"""

from __future__ import annotations

import numpy as np
import torch

from amtrain.tokens.midi import DUR_OFFSET, MAX_DUR, MAX_NOTE, MAX_TIME, NOTE_OFFSET, TIME_OFFSET


class Constraint:
    """Base: a logits processor that keeps only `allowed` ids."""

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed(generated, logits.shape[-1]), float("-inf"))


def block_mask(batch: int, vocab: int, lo, hi, device) -> torch.Tensor:
    """(B, V) True on ids in [lo, hi): lo / hi ints or (B,) tensors."""
    ids = torch.arange(vocab, device=device)[None]  # (1, V)
    lo = torch.as_tensor(lo, device=device).reshape(-1, 1)
    hi = torch.as_tensor(hi, device=device).reshape(-1, 1)
    return ((ids >= lo) & (ids < hi)).expand(batch, vocab)


def current_time(body: torch.Tensor, floor) -> torch.Tensor:
    """Latest event onset in whole triples body (B, 3n) (controls skipped), at least floor. (B,)"""
    B = body.shape[0]
    floor = torch.as_tensor(floor, device=body.device).expand(B)
    if body.shape[1] == 0:
        return floor.clone()
    times = body.reshape(B, -1, 3)[:, :, 0]  # (B, n)
    is_event = times < TIME_OFFSET + MAX_TIME
    latest = torch.where(is_event, times - TIME_OFFSET, torch.full_like(times, -1)).amax(dim=1)
    return torch.maximum(latest, floor)


class MidiConstraint(Constraint):
    def __init__(self, header: int = 1, floor: int | torch.Tensor = 0, ceiling: int | torch.Tensor = MAX_TIME):
        self.header, self.floor, self.ceiling = header, floor, ceiling

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        B, t = generated.shape
        phase = (t - self.header) % 3
        dev = generated.device
        if phase == 1:
            return block_mask(B, vocab, DUR_OFFSET, DUR_OFFSET + MAX_DUR, dev)
        if phase == 2:
            return block_mask(B, vocab, NOTE_OFFSET, NOTE_OFFSET + MAX_NOTE + 1, dev)  # + REST
        now = current_time(generated[:, self.header:], self.floor)
        ceiling = torch.as_tensor(self.ceiling, device=dev).expand(B)
        lo = torch.minimum(now, ceiling - 1).clamp(max=MAX_TIME - 1)  # never an empty set
        return block_mask(B, vocab, TIME_OFFSET + lo, TIME_OFFSET + ceiling.clamp(max=MAX_TIME), dev)


class CodebookConstraint(Constraint):
    def __init__(self, num_codebooks: int, codebook_size: int = 1024, header: int = 0):
        self.num_codebooks, self.codebook_size, self.header = num_codebooks, codebook_size, header

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        B, t = generated.shape
        k = (t - self.header) % self.num_codebooks
        return block_mask(B, vocab, k * self.codebook_size, (k + 1) * self.codebook_size, generated.device)


class IdsBelow(Constraint):
    """Ids in [0, n) only."""

    def __init__(self, n: int):
        self.n = n

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        return block_mask(generated.shape[0], vocab, 0, self.n, generated.device)


class SpanGrammar(Constraint):
    """T5 in-filling targets `<s_0> span_0 <s_1> span_1 ... EOS` for num_gaps gaps: the target
    opens with <s_0>, each span holds whole units (`unit` ids) of base-vocabulary ids allowed by
    `inner(span (B, j), V)` (None: any base id), span i closes with <s_{i+1}> (EOS after the
    last); with `lengths` span i closes exactly at lengths[i] ids, else at most `max_span`."""

    def __init__(self, vocab, num_gaps: int, unit: int = 1, inner: Constraint | None = None,
                 lengths: list[int] | None = None, max_span: int | None = None):
        self.vocab, self.num_gaps, self.unit, self.inner = vocab, num_gaps, unit, inner
        self.lengths, self.max_span = lengths, max_span

    def spans(self, targets: np.ndarray) -> list[np.ndarray]:
        """The ids of each gap in a decoded target (N,), read up to its first EOS; a gap whose
        sentinel never came is empty."""
        end = np.flatnonzero(targets == self.vocab.eos_id)
        targets = targets[:end[0]] if end.size else targets
        marks = np.append(np.flatnonzero(self.vocab.is_sentinel(targets)), len(targets))
        found = {int(targets[a]): targets[a + 1:b] for a, b in zip(marks[:-1], marks[1:], strict=True)}
        return [found.get(self.vocab.sentinel(i), targets[:0]) for i in range(self.num_gaps)]

    def _close(self, i: int) -> int:
        return self.vocab.sentinel(i + 1) if i + 1 < self.num_gaps else self.vocab.eos_id

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        B, t = generated.shape
        dev = generated.device
        if t == 0:
            return block_mask(B, vocab, self.vocab.sentinel(0), self.vocab.sentinel(0) + 1, dev)
        out = torch.zeros(B, vocab, dtype=torch.bool, device=dev)
        is_mark = self.vocab.is_sentinel(generated.cpu().numpy()) | (generated.cpu().numpy() == self.vocab.eos_id)
        for b in range(B):
            marks = np.flatnonzero(is_mark[b])
            i, j = len(marks) - 1, t - 1 - marks[-1]  # current span and its length so far
            if int(generated[b, marks[-1]]) == self.vocab.eos_id:
                out[b, self.vocab.eos_id] = True  # finished: EOS padding
                continue
            target = self.lengths[i] if self.lengths is not None else None
            can_close = j >= self.unit and j % self.unit == 0 and (target is None or j == target)
            must_close = (target is not None and j >= target) or (self.max_span is not None and j >= self.max_span)
            if can_close or must_close:
                out[b, self._close(i)] = True
            if not must_close:
                span = generated[b:b + 1, marks[-1] + 1:]
                inner = (self.inner.allowed(span, vocab)[0] if self.inner is not None
                         else block_mask(1, vocab, 0, self.vocab.base_vocab_size, dev)[0])
                out[b] |= inner & (torch.arange(vocab, device=dev) < self.vocab.base_vocab_size)
        return out
