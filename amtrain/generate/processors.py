"""Logits processors: every rule about which id may come next, as one callable each.

    processor(logits (B, V), generated (B, t)) -> logits (B, V)

`generated` is what the model has seen so far: the prompt and the new ids for a decoder or
LSTM, the targets so far (decoder start token excluded) for T5. A `LogitsProcessorList` runs
its processors in order (Hugging Face's `LogitsProcessorList`); the decode loop
(`amtrain.generate.loop`) runs the caller's list, then the sampler's own (temperature, top-k,
top-p), then picks an id. Masks set logits to -inf, so no sampler setting can pick a masked id.

Order used everywhere: grammar masks -> forced tokens -> temperature -> top-k -> top-p.

Shape legend: B batch, t ids so far, V the tokenizer's vocab_size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from amtrain.errors import UserError


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor: ...


class LogitsProcessorList(list):
    """Processors applied in list order; a list is itself a processor."""

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        for processor in self:
            logits = processor(logits, generated)
        return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept too), -inf elsewhere. (B, V)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to >= p (always at least the most likely one), -inf elsewhere. (B, V).
    p >= 1 keeps everything (no fp32 cumsum rounding can drop a token then)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p, so it stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    def __init__(self, k: int):
        self.k = k

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return top_k_filter(logits, self.k)


class TopP:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return top_p_filter(logits, self.p)


def sampling_processors(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """Temperature, then top-k, then top-p; none at temperature 0 (greedy takes the argmax of
    the caller's logits as they are)."""
    if temperature < 0:
        raise UserError("temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p: must be in (0, 1], got {top_p}")
    if temperature == 0:
        return LogitsProcessorList()
    out = LogitsProcessorList([Temperature(temperature)])
    if top_k is not None:
        out.append(TopK(top_k))
    if top_p is not None:
        out.append(TopP(top_p))
    return out


class ForcedTokens:
    """New id i is forced[i], whatever the model and the processors before said: its logit
    becomes 0, every other -inf (a one-hot choice, at any temperature and for any filter).

    New ids are counted from `start`: the id chosen when `generated` holds start + i ids is
    new id i. A decoder window of W ids after n earlier new ids: start = W - n; T5 targets
    after n earlier new ids: start = -n; the ids of a T5 span opened by one sentinel: start = 1.
    """

    def __init__(self, forced: Mapping[int, int], start: int = 0):
        self.forced, self.start = forced, start

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        i = generated.shape[1] - self.start
        if i not in self.forced:
            return logits
        onehot = torch.full_like(logits, float("-inf"))
        onehot[:, self.forced[i]] = 0.0
        return onehot
