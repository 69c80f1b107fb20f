"""The GPT-2 block variant of the decoder (`DecoderConfig(block="gpt2")`): exactly the layout of
OpenAI's GPT-2 and of the Anticipatory Music Transformer checkpoints (trained with Levanter,
`stanford-crfm/music-*-800k`), so their weights load without approximation.

Differences from the parallel / serial blocks of `amtrain.models.layers`:
- learned absolute position embeddings (`wpe`, `max_seq_len` rows) added to the token
  embedding; no RoPE;
- bias terms on every Linear and LayerNorm (LayerNorm eps 1e-5);
- serial pre-norm block, tanh-GELU MLP (GPT-2's `gelu_new`), tied input/output embedding;
- attention logits scaled by 1/sqrt(Dh), and by 1/(layer_idx + 1) as well when
  `scale_attn_by_inverse_layer_idx` (Levanter / Mistral's stability trick, on in the AMT
  checkpoints).

    y = x + Attn(LN1(x));  y = y + MLP(LN2(y))

Shape legend: B batch, T new positions, S cached + new positions, D d_model, H heads, Dh D // H.
torch only, single-device code; the KV cache is the decoder's `KVCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.layers import (
    FLASH_AVAILABLE,
    FLASH_DTYPES,
    KVCache,
    _cached_mask,
    flash_attn_func,
)

__all__ = ["GPT2Attention", "GPT2Block", "GPT2MLP", "LearnedPositions"]


class LearnedPositions(nn.Module):
    """GPT-2's `wpe`: one learned D-vector per absolute position."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))

    def forward(self, start: int, T: int) -> torch.Tensor:
        return self.weight[start:start + T]  # (T, D)


class GPT2Attention(nn.Module):
    """Multi-head causal self-attention with biases, no rotary, optional 1/(layer+1) scale."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, attn_impl: str, layer_idx: int,
                 scale_by_layer: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.layer_idx = layer_idx
        self.scale = 1.0 / math.sqrt(self.head_dim) / (layer_idx + 1 if scale_by_layer else 1)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)  # residual projection (scaled init)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
                   for t in self.qkv(x).split(D, dim=-1))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, Dh)
        p = self.dropout if self.training else 0.0
        flash = FLASH_AVAILABLE and q.is_cuda and q.dtype in FLASH_DTYPES and self.attn_impl != "sdpa"
        if flash:
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p,
                                softmax_scale=self.scale, causal=True).transpose(1, 2)  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(start, T, x.device),
                                               dropout_p=p, is_causal=start == 0, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GPT2MLP(nn.Module):
    """D -> F -> D with tanh-GELU and biases."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)  # residual projection (scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """GPT-2 pre-norm serial block with biased LayerNorms (see the module docstring)."""

    def __init__(self, d_model: int, d_ff: int, attn: GPT2Attention, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = GPT2MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.mlp(self.norm2(x)))


def init_gpt2_extras(module: nn.Module) -> None:
    """Zero biases, unit LayerNorm gains (GPT-2's init); the decoder inits the matrices."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LearnedPositions):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
