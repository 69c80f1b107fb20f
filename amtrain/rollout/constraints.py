"""Token-grammar masks for sampling, usable as `generate(..., logits_processor=...)`.

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
"""

from __future__ import annotations

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


class ForcedConstraint(Constraint):
    """`inner`, except that position j (the generated length) is forced to forced[j]."""

    def __init__(self, inner: Constraint, forced: dict[int, int]):
        self.inner, self.forced = inner, forced

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        j = generated.shape[1]
        if j in self.forced:
            return block_mask(generated.shape[0], vocab, self.forced[j], self.forced[j] + 1, generated.device)
        return self.inner.allowed(generated, vocab)
