"""Transformer building blocks shared by the decoder (and later the T5 / LSTM models): norms,
rotary position embeddings, causal self-attention with an optional KV cache, the MLP, and the
parallel (PaLM / GPT-J) and serial (GPT-2 pre-norm) blocks. torch only, single-device code.

Shape legend:
    B  batch            T  new positions in this call     S  cached + new positions (keys)
    D  d_model          H  attention heads                Dh head width = D // H
    F  MLP width (d_ff) L  layers

No bias terms anywhere (Linear or norm), as in PaLM: they add parameters and memory traffic
for no measurable gain at these scales, and keep the parameter count a clean function of
(L, D, F, V).

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, or through
flash-attn's `flash_attn_func` when that package is installed, the tensors are on CUDA and in
fp16/bf16 (flash-attn supports nothing else). Both compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional CUDA kernel (extra `gpu`); SDPA is the fallback everywhere else
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

FLASH_AVAILABLE = flash_attn_func is not None
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def make_norm(kind: str, dim: int) -> nn.Module:
    """"layernorm" (no bias, PaLM) or "rmsnorm" (Zhang & Sennrich 2019, as in LLaMA)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=False)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    raise ValueError(f"norm: unknown kind {kind!r}; use 'layernorm' or 'rmsnorm'")


@dataclass
class KVCache:
    """Keys and values of every layer for generation, preallocated to `max_len` positions.

    `k`, `v`: (L, B, H, max_len, Dh). `pos` = number of positions already written; a forward
    pass with T new tokens writes positions [pos, pos + T) in every layer and then advances
    `pos` by T (done once by the model, after the last layer). Only generation uses it: the
    training path passes no cache, so nothing Python-side changes under `torch.compile`.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
              device: torch.device | str, dtype: torch.dtype) -> Self:
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's keys/values (B, H, T, Dh) of one layer; return all so far (B, H, S, Dh)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated; "
                             "make a larger cache with model.new_cache(batch_size, max_len, ...)")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer), "rotate-half" form as in GPT-NeoX
    and LLaMA. cos/sin tables for `max_seq_len` positions are precomputed as non-persistent
    buffers (rebuilt from the config, never saved)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (Dh/2,)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (Tmax, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (Tmax, Dh)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x (B, H, T, Dh) as if it sat at positions start .. start+T-1."""
        T = x.shape[2]
        cos = self.cos[start:start + T].to(x.dtype)  # (T, Dh)
        sin = self.sin[start:start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys; one fused qkv matmul."""

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int, rope_theta: float,
                 dropout: float, attn_impl: str, layer_idx: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)  # residual projection (scaled init)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def _use_flash(self, q: torch.Tensor) -> bool:
        usable = FLASH_AVAILABLE and q.is_cuda and q.dtype in FLASH_DTYPES
        if self.attn_impl == "flash" and not usable:
            raise RuntimeError("attn_impl='flash' needs flash-attn installed and CUDA fp16/bf16 "
                               f"tensors (got device={q.device}, dtype={q.dtype}); use attn_impl='auto'")
        return usable and self.attn_impl != "sdpa"

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, T, D)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, Dh), S = start + T
        p = self.dropout if self.training else 0.0
        if self._use_flash(q):
            # flash-attn wants (B, T, H, Dh); causal=True aligns the mask bottom-right, which is
            # what a query block at the end of a longer key block needs (flash-attn >= 2.1).
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                dropout_p=p, causal=True).transpose(1, 2)  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(start, T, x.device),
                                               dropout_p=p, is_causal=start == 0)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


def _cached_mask(start: int, T: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (T, start+T) mask for T new queries after `start` cached keys: query i (absolute
    position start+i) sees keys 0..start+i. None when SDPA's own causal mask or no mask is right:
    start == 0 (plain causal) or T == 1 (one query sees every key)."""
    if start == 0 or T == 1:
        return None
    q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]  # (1, S)
    return k_pos <= q_pos  # (T, S)


class MLP(nn.Module):
    """D -> F -> D with tanh-GELU (GPT-2)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)  # residual projection (scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class ParallelBlock(nn.Module):
    """PaLM / GPT-J parallel block: attention and MLP read the SAME normalised input and their
    outputs are added to the residual together. One norm per block.

        x ──────────────────────────────┬──────────────(+)──> y
        │                               │               ^
        └─> Norm ──┬──> Attn ───────────│──────────────>│
                   │                    │               │
                   └──> MLP ────────────│──────────────>┘

        y = x + Attn(Norm(x)) + MLP(Norm(x))

    The two matmul chains are independent, so they can be fused / overlapped; PaLM reports
    ~15% faster training at large scale with no quality loss above ~8B (small loss below).
    """

    def __init__(self, norm: str, d_model: int, d_ff: int, attn: nn.Module, dropout: float,
                 mlp: nn.Module | None = None):
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.attn = attn
        self.mlp = mlp if mlp is not None else MLP(d_model, d_ff)  # or an MoE (amtrain.models.moe)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = self.norm(x)  # (B, T, D)
        return x + self.drop(self.attn(h, cache)) + self.drop(self.mlp(h))


class SerialBlock(nn.Module):
    """GPT-2 pre-norm serial block, for comparison: two norms, MLP reads the attention output.

        y = x + Attn(Norm1(x));  y = y + MLP(Norm2(y))
    """

    def __init__(self, norm: str, d_model: int, d_ff: int, attn: nn.Module, dropout: float,
                 mlp: nn.Module | None = None):
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = attn
        self.norm2 = make_norm(norm, d_model)
        self.mlp = mlp if mlp is not None else MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.mlp(self.norm2(x)))


def residual_init_std(num_layers: int, base: float = 0.02) -> float:
    """GPT-2 scaled init for projections that write into the residual stream: each layer adds
    two branches, so std = base / sqrt(2 L) keeps the residual's variance O(1) with depth."""
    return base / math.sqrt(2 * num_layers)
