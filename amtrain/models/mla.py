"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1; DeepSeek-V3 §2.1.1), causal,
with a KV cache that holds only the compressed latent and the shared RoPE key. torch only.

Shape legend:
    B batch   T new positions   S cached + new positions   D d_model   H heads
    Rq q_lora_rank (0: queries straight from x)   Rkv kv_lora_rank
    Dn qk_nope_head_dim   Dr qk_rope_head_dim   Dv v_head_dim

    x ─> [Wq_a ─> RMSNorm ─>] Wq_b ─> q (B, H, T, Dn + Dr)      RoPE on the last Dr of q
    x ─> Wkv_a ─┬─> c_kv (B, T, Rkv) ─> RMSNorm ─> Wkv_b ─> k_nope (B, H, T, Dn), v (B, H, T, Dv)
                └─> k_rope (B, T, Dr) ─> RoPE  (ONE rope key shared by all heads)
    k = [k_nope, k_rope], scores = q k^T / sqrt(Dn + Dr), y = softmax(scores) v ─> Wo (H Dv -> D)

Cache layout (`LatentCache`): per layer the normalised latent c_kv (B, S, Rkv) and the rotated
rope key (B, S, Dr): (Rkv + Dr) numbers per token per layer, against 2 H Dh for standard
attention. Cached calls absorb the up-projections (V2 §2.1.2): q_nope Wuk^T becomes a query in
latent space, scores are read straight off the cache, and Wuv is applied after the weighted sum
of latents, so decoding never expands the cache to per-head keys and values. The same function
as the full forward up to float rounding (tests/test_mla.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.layers import RotaryEmbedding, _cached_mask


@dataclass
class LatentCache:
    """MLA's generation cache, preallocated to `max_len` positions. `c_kv` (L, B, max_len, Rkv),
    `k_rope` (L, B, max_len, Dr); `pos` advances as `KVCache.pos` does (by the model)."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor
    pos: int = 0

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
              device: torch.device | str, dtype: torch.dtype) -> Self:
        return cls(torch.zeros(num_layers, batch_size, max_len, kv_lora_rank, device=device, dtype=dtype),
                   torch.zeros(num_layers, batch_size, max_len, rope_dim, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[2]

    def bytes_per_token(self) -> int:
        """Cache bytes one position takes over all layers."""
        L, _, _, R = self.c_kv.shape
        return L * (R + self.k_rope.shape[-1]) * self.c_kv.element_size()

    def update(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, T, Rkv) and (B, T, Dr) of one layer; return all so far (B, S, Rkv), (B, S, Dr)."""
        end = self.pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated; "
                             "make a larger cache with model.new_cache(batch_size, max_len, ...)")
        self.c_kv[layer, :, self.pos:end] = c_kv
        self.k_rope[layer, :, self.pos:end] = k_rope
        return self.c_kv[layer, :, :end], self.k_rope[layer, :, :end]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, max_seq_len: int, rope_theta: float, dropout: float,
                 layer_idx: int):
        super().__init__()
        H = self.num_heads = num_heads
        self.dn, self.dr, self.dv, self.kv_rank = qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
        self.dropout, self.layer_idx = dropout, layer_idx
        self.scale = 1.0 / math.sqrt(self.dn + self.dr)
        q_dim = H * (self.dn + self.dr)
        if q_lora_rank:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(q_lora_rank, q_dim, bias=False)
        else:
            self.wq = nn.Linear(d_model, q_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + self.dr, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.proj = nn.Linear(H * self.dv, d_model, bias=False)  # residual projection (scaled init)
        self.rope = RotaryEmbedding(self.dr, max_seq_len, rope_theta)

    def queries(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q_nope (B, H, T, Dn), q_rope (B, H, T, Dr) rotated."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.num_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        return q_nope, self.rope(q_rope, start)

    def latents(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> c_kv (B, T, Rkv) normalised, k_rope (B, T, Dr) rotated (what the cache holds)."""
        c, k_rope = self.wkv_a(x).split([self.kv_rank, self.dr], dim=-1)
        return self.kv_norm(c), self.rope(k_rope.unsqueeze(1), start).squeeze(1)

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        start = 0 if cache is None else cache.pos
        q_nope, q_rope = self.queries(x, start)
        c_kv, k_rope = self.latents(x, start)
        if cache is not None:
            return self.proj(self._absorbed(q_nope, q_rope, *cache.update(self.layer_idx, c_kv, k_rope), start))
        H = self.num_heads
        kv = self.wkv_b(c_kv).view(B, T, H, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, H, T, Dn), (B, H, T, Dv)
        q = torch.cat([q_nope, q_rope], -1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, T, self.dr)], -1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * self.dv))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                  start: int) -> torch.Tensor:
        """Attention read off the latent cache: c_kv (B, S, Rkv), k_rope (B, S, Dr) -> (B, T, H Dv)."""
        B, H, T, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.dn + self.dv, self.kv_rank)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # (H, Dn, Rkv), (H, Dv, Rkv)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, Rkv)
        scores = (q_lat @ c_kv.unsqueeze(1).transpose(-1, -2) + q_rope @ k_rope.unsqueeze(1).transpose(-1, -2))
        scores = scores * self.scale  # (B, H, T, S)
        mask = _cached_mask(start, T, q_nope.device)
        if mask is None and T > 1:  # start == 0: plain causal
            mask = torch.ones(T, T, dtype=torch.bool, device=q_nope.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
        if self.training and self.dropout:
            attn = F.dropout(attn, self.dropout)
        o_lat = attn @ c_kv.unsqueeze(1)  # (B, H, T, Rkv)
        y = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (B, H, T, Dv)
        return y.transpose(1, 2).reshape(B, T, H * self.dv)


def resolve_mla_fields(cfg) -> None:
    """Fill and check a `DecoderConfig`'s MLA widths when attention == "mla" (None -> the
    defaults named on each field); an "mha" config keeps them as given."""
    if cfg.attention != "mla":
        return
    dh = cfg.d_model // cfg.num_heads
    defaults = {"kv_lora_rank": 4 * dh, "qk_nope_head_dim": dh, "qk_rope_head_dim": max(2, dh // 2), "v_head_dim": dh}
    for name, default in defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, default)
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")
    if cfg.qk_rope_head_dim % 2:
        raise ValueError(f"model.qk_rope_head_dim: must be even for RoPE, got {cfg.qk_rope_head_dim}")
    if not isinstance(cfg.q_lora_rank, int) or cfg.q_lora_rank < 0:
        raise ValueError(f"model.q_lora_rank: must be an integer >= 0 (0: no query latent), got {cfg.q_lora_rank!r}")
