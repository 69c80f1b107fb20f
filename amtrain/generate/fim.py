"""In-filling with a left-to-right model trained to fill in the middle (the layout of
`amtrain.data.fim.FimSpec`, passed in: generate imports nothing above models and tokens).

The model sees a prompt in the format it was trained on and writes the middle after it:

    PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle> | middle ... <end>
    SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix | middle ... <end>

through the one decode loop (`amtrain.generate.loop.generate`, KV cache). The caller's grammar,
which sees the middle so far (positions from 0), keeps it to base ids (`IdsBelow`: never a
sentinel) or a modality's units (`CodebookConstraint`); a middle ends at the end id (`stop=True`,
text and ids: the loop's EOS) or after exactly `n` ids (audio: the gap's frames).

The prompt must fit the context with the middle: `fim_prompt` keeps the prefix's tail (whole
units, counted back from the gap) and the suffix's head, half the room each (what one leaves
goes to the other), so the ids nearest the gap are the ones the model sees.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.generate.loop import generate
from amtrain.generate.processors import ForcedTokens, LogitsProcessor, LogitsProcessorList
from amtrain.models.base import SequenceModel


class FimIds(Protocol):
    """The ids of a FIM layout (`amtrain.data.fim.FimSpec` is one)."""

    @property
    def prefix_id(self) -> int: ...

    @property
    def suffix_id(self) -> int: ...

    @property
    def middle_id(self) -> int: ...

    @property
    def end_id(self) -> int: ...

    @property
    def spm_at_inference(self) -> bool: ...


def fit_views(prefix_len: int, suffix_len: int, room: int, unit: int = 1) -> tuple[int, int]:
    """(prefix ids kept, suffix ids kept) within `room`: half each, the rest to the other side;
    a cut prefix keeps whole units (counted back from the gap)."""
    keep_s = min(suffix_len, max(room // 2, room - prefix_len))
    keep_p = min(prefix_len, room - keep_s)
    if keep_p < prefix_len:
        keep_p = keep_p // unit * unit
    return keep_p, min(suffix_len, room - keep_p)


class OnMiddle:
    """A logits processor that sees only the ids after the first `start` (the middle so far)."""

    def __init__(self, inner: LogitsProcessor, start: int):
        self.inner, self.start = inner, start

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, generated[:, self.start:])


def fim_prompt(spec: FimIds, prefix: np.ndarray, suffix: np.ndarray, spm: bool) -> np.ndarray:
    """The ids before the middle, in PSM or SPM order (module doc)."""
    pre, suf, mid = [spec.prefix_id], [spec.suffix_id], [spec.middle_id]
    parts = [pre, suf, suffix, mid, prefix] if spm else [pre, prefix, suf, suffix, mid]
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


def middle_budget(context: int, length: int, prompt_len: int) -> int:
    """New ids a gap may take: `length`, at most what the context leaves after the whole prompt
    and the three sentinels, but never less than a quarter of the context (the prompt's far
    ends are then hidden from the model)."""
    room = context - 3 - prompt_len
    return max(1, min(length, max(context // 4, room), context - 4))


@torch.no_grad()
def fim_generate(model: SequenceModel, spec: FimIds, prefixes: np.ndarray, suffix: np.ndarray, n: int, *,
                 unit: int = 1, spm: bool | None = None, stop: bool = True,
                 processor: LogitsProcessor | None = None, forced: dict[int, int] | None = None,
                 **sampling) -> list[np.ndarray]:
    """The middle of each row of `prefixes` (B, P) before `suffix` (S,): up to `n` new ids
    (exactly n without `stop`), cut before the end id. `processor` sees the middle so far;
    `forced` maps middle indices to the id they must be. `spm`: the prompt order
    (default: the one the checkpoint trained more often)."""
    context = model.cfg.max_seq_len
    if n + 4 > context:
        raise UserError(f"an in-fill of {n} ids does not fit the model's context of {context} with the FIM sentinels; "
                        f"ask for fewer (--length)")
    keep_p, keep_s = fit_views(prefixes.shape[1], len(suffix), context - 3 - n, unit)
    spm = spec.spm_at_inference if spm is None else spm
    rows = [fim_prompt(spec, p[len(p) - keep_p:], suffix[:keep_s], spm) for p in prefixes]
    x = torch.tensor(np.stack(rows), dtype=torch.long, device=next(model.parameters()).device)
    processors = LogitsProcessorList([OnMiddle(processor, x.shape[1])] if processor is not None else [])
    if forced:
        processors.append(ForcedTokens(forced, start=x.shape[1]))
    out = generate(model, x, n, logits_processor=processors, eos_id=spec.end_id if stop else None,
                   **sampling)[:, x.shape[1]:].cpu().numpy()
    if not stop:
        return list(out)
    return [row[:np.flatnonzero(row == spec.end_id)[0]] if (row == spec.end_id).any() else row for row in out]
