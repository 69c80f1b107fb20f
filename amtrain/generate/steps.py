"""Model steps: how the one decode loop (`amtrain.generate.loop.decode`) asks a model family
for next-token logits, so the loop never knows which family it drives.

    step.prefill(ids (B, t0), max_len) -> logits (B, V)   a new sequence, room for max_len ids
    step.step(ids (B, t)) -> logits (B, V)                 the same rows, one id longer

`ids` is what the loop has generated so far (and the processors see): the prompt and the new
ids for a decoder or LSTM, the targets so far for T5 (its decoder start token is the step's
business). Logits are fp32 over the tokenizer's vocab_size: padded vocabulary rows are cut off
here, so a padded id can never be produced. With `use_cache` a step feeds the model only the
ids it has not seen (a KV cache or recurrent state filled by `model.new_cache`); without, it
recomputes the whole sequence each step: the same logits (tested), much slower.

Shape legend: B batch, t ids so far, S encoder length, D width, V vocab_size.
"""

from __future__ import annotations

from typing import Protocol

import torch

from amtrain.models.base import SequenceModel
from amtrain.models.t5 import T5


class ModelStep(Protocol):
    @property
    def model(self) -> SequenceModel: ...

    def prefill(self, ids: torch.Tensor, max_len: int) -> torch.Tensor: ...

    def step(self, ids: torch.Tensor) -> torch.Tensor: ...


class LMStep:
    """Decoder or LSTM: `model(ids, cache=, last_only=True)` projects only the last position onto
    the vocabulary (nanoGPT's `lm_head(x[:, [-1]])`), so a long prompt's prefill never builds its
    (B, t0, V) logits."""

    def __init__(self, model: SequenceModel, use_cache: bool = True):
        self.model, self.use_cache, self.cache = model, use_cache, None

    def prefill(self, ids: torch.Tensor, max_len: int) -> torch.Tensor:
        self.cache = self.model.new_cache(ids.shape[0], max_len, device=ids.device) if self.use_cache else None
        return self._logits(ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._logits(ids[:, -1:] if self.cache is not None else ids)

    def _logits(self, feed: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(feed, cache=self.cache, last_only=True)  # (B, 1, V')
        return logits[:, -1, :self.model.cfg.vocab_size].float()  # (B, V)


class T5Step:
    """T5: the decoder over one encoder output, computed at prefill. The cache's cross-attention
    keys/values are computed once; its self-attention keys/values are written in place."""

    def __init__(self, model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True):
        self.model, self.input_ids, self.attention_mask, self.use_cache = model, input_ids, attention_mask, use_cache

    def prefill(self, ids: torch.Tensor, max_len: int) -> torch.Tensor:
        self.encoder_out = self.model.encode(self.input_ids, self.attention_mask)  # (B, S, D)
        self.start = ids.new_full((ids.shape[0], 1), self.model.cfg.decoder_start_token_id)
        self.cache = self.model.new_cache(ids.shape[0], 1 + max_len, device=ids.device) if self.use_cache else None
        return self._logits(torch.cat([self.start, ids], 1))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._logits(ids[:, -1:] if self.cache is not None else torch.cat([self.start, ids], 1))

    def _logits(self, feed: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(feed, self.encoder_out, self.attention_mask, cache=self.cache)  # (B, t, V')
        return logits[:, -1, :self.model.cfg.vocab_size].float()  # (B, V)
