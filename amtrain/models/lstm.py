"""LSTM language model: the recurrent baseline of the scaling study (issue: scaling).

Shape legend: B batch, T time, D width, V padded vocabulary, L layers.

    idx (B, T) -> embed (B, T, D) -> L stacked LSTM layers (B, T, D) -> LayerNorm -> tied head (B, T, V)

Sizes are matched to the decoder's by NON-embedding parameter count (tests pin both), so a
study compares architectures at equal N. The input embedding and output projection are tied,
as in the decoder. For generation the recurrent state plays the KV cache's role: `new_cache`
returns an `LSTMState` that `forward(..., cache=state)` reads and advances, so the decoder's
`generate` drives this model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.base import SequenceModel
from amtrain.models.sizes import SEED_LSTM_SIZES
from amtrain.registry import ModelFamily, register_family
from amtrain.tokens import IGNORE_INDEX


@dataclass
class LSTMConfig:
    vocab_size: int
    """Real vocabulary size (ids in the data); the embedding is padded above it."""
    num_layers: int = 2
    """Stacked LSTM layers."""
    d_model: int = 256
    """Embedding and hidden width D."""
    dropout: float = 0.0
    """Dropout between LSTM layers and on the embedding."""
    max_seq_len: int = 1024
    """Longest training window (recurrence has no hard limit; kept for a uniform interface)."""
    pad_vocab_multiple: int = 64
    """The embedding has a multiple of this many rows."""

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "max_seq_len", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"LSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSTMConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m


# Non-embedding counts within 1% of the decoder sizes of the same name (8 D² + 8 D per layer,
# plus the final LayerNorm's 2 D). tests/test_lstm.py pins them against DECODER_SIZES.
LSTM_SIZES: dict[str, dict] = {
    "debug": {"num_layers": 1, "d_model": 110},
    "tiny": {"num_layers": 2, "d_model": 248},
    "small": {"num_layers": 2, "d_model": 543},
    "medium": {"num_layers": 3, "d_model": 940},
    "large": {"num_layers": 4, "d_model": 1254},
}



@dataclass
class LSTMState:
    """Recurrent state for generation: h, c (L, B, D); `pos` counts tokens consumed."""

    h: torch.Tensor
    c: torch.Tensor
    pos: int = 0
    max_len: int = 0


class LSTMLM(SequenceModel):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: LSTMState | None = None, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `Decoder.forward`: logits (B, T, V), the loss given targets; `last_only` projects only
        the last position (B, 1, V) for generation."""
        if last_only and targets is not None:
            raise ValueError("last_only gives no loss: pass targets or last_only, not both")
        x = self.drop(self.embed(idx))  # (B, T, D)
        state = (cache.h, cache.c) if cache is not None and cache.pos > 0 else None
        y, (h, c) = self.lstm(x, state)  # (B, T, D)
        if cache is not None:
            cache.h, cache.c = h, c
            cache.pos += idx.shape[1]
        if last_only:
            y = y[:, -1:]  # (B, 1, D)
        logits = self.norm(y) @ self.embed.weight.T  # (B, T or 1, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> LSTMState:
        p = self.embed.weight
        shape = (self.cfg.num_layers, batch_size, self.cfg.d_model)
        zeros = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return LSTMState(zeros, zeros.clone(), 0, max_len)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N with N the matmul weights, the tied (V, D) output
        projection included (as the decoder counts it); recurrence has no T-dependent term."""
        return 6.0 * self.num_params()


register_family(ModelFamily(
    name="lstm", config_cls=LSTMConfig, model_cls=LSTMLM, sizes={**LSTM_SIZES, **SEED_LSTM_SIZES}, left_to_right=True,
    objective="amtrain.train.objective:LMObjective", study_name="lstm",
    description="LSTM language model: the recurrent baseline of scaling studies"))
