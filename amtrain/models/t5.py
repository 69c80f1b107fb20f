"""T5 v1.1-style encoder-decoder denoiser: config + size table, model, KV-cached decoding
(transformers' `T5ForConditionalGeneration` <-> this: `amtrain.hf.t5`).

Shape legend: B batch, S encoder (input) length, T decoder (target) length, D width (d_model),
H heads, Dh head width (d_kv), F FFN width (d_ff), V padded vocabulary, L layers.

Architecture (T5 v1.1, as google/t5-v1_1-* and HF `T5ForConditionalGeneration` with
`feed_forward_proj="gated-gelu"`, `tie_word_embeddings=False`):
  - pre-norm residual blocks with RMSNorm (T5LayerNorm: no mean subtraction, no bias, eps 1e-6);
  - gated-GELU FFN  wo(gelu_tanh(wi_0 x) * wi_1 x);
  - no bias terms anywhere; attention logits are NOT scaled by 1/sqrt(Dh) (T5 folds the scale
    into the initialisation);
  - bucketed relative position bias (Mesh TensorFlow / T5), one table per stack, owned by the
    first layer and shared by all layers; bidirectional buckets in the encoder, causal buckets in
    the decoder; cross-attention has no position bias;
  - one token embedding shared by encoder and decoder; an untied LM head; no output rescaling.

Parallel sub-blocks (the attn_demo seed; GPT-J / PaLM blocks applied to an encoder-decoder):
`parallel_decoder=True` replaces the decoder's three sequential sub-blocks by one norm feeding
self-attention, cross-attention and the FFN side by side, `parallel_encoder=True` the encoder's
two by one norm feeding self-attention and the FFN. Norms per layer: encoder 2 -> 1, decoder
3 -> 1; every weight matrix stays (the `*-parallel` rows of `T5_SIZES`).

        x ──┬──────────────────────────────────────────────(+)── x'   decoder: x' = x + SA(n) + CA(n) + FFN(n)
            └─ RMSNorm ─┬─ causal self-attn ──────────────┐ │        encoder: x' = x + SA(n) + FFN(n)
             (n)        ├─ cross-attn (encoder states) ───┤─┘        (n = RMSNorm(x), one norm)
                        └─ gated-GELU FFN ────────────────┘

Model code is single-device torch only (no ranks, no deepspeed); the trainer wraps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.base import SequenceModel
from amtrain.models.layers import KVCache
from amtrain.registry import ModelFamily, register_family
from amtrain.tokens import IGNORE_INDEX

VOCAB_MULTIPLE = 64


@dataclass
class T5Config:
    vocab_size: int = 32128
    """Ids the data uses (base vocabulary + T5 specials + sentinels); embeddings and LM head are
    padded up to a multiple of 64 (`padded_vocab_size`)."""
    d_model: int = 512
    """Residual width D."""
    d_kv: int = 64
    """Width of one attention head Dh (T5 does not tie it to d_model / num_heads)."""
    d_ff: int = 1024
    """Hidden width F of the gated-GELU FFN."""
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    """Number of relative-position buckets (half for each direction in the encoder)."""
    relative_attention_max_distance: int = 128
    """Distance beyond which all relative positions share the last bucket."""
    dropout_rate: float = 0.0
    """Dropout on embeddings, sub-block outputs and the final norm (nanoT5 pretrains with 0)."""
    layer_norm_epsilon: float = 1e-6
    parallel_encoder: bool = False
    """Encoder self-attention and FFN side by side on one norm: x + SA(n) + FFN(n), n = norm(x)
    (one norm per encoder layer instead of two; no HF equivalent)."""
    parallel_decoder: bool = False
    """Decoder self-attention, cross-attention and FFN side by side on one norm:
    x + SA(n) + CA(n) + FFN(n) (one norm per decoder layer instead of three; no HF equivalent)."""
    pad_token_id: int = 0
    """Id used to pad decoder inputs (labels of -100 become this id when shifted right)."""
    decoder_start_token_id: int = 0
    """First decoder input (T5 uses the pad id)."""

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets % 2:
            raise ValueError("T5Config.relative_attention_num_buckets must be even (half per direction)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        for name in ("pad_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"T5Config.{name}={getattr(self, name)} is outside the vocabulary "
                                 f"[0, {self.vocab_size}); set it to an id of the T5 specials")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# Sizes follow google/t5-v1_1-{small,base,large} (param counts pinned in tests/test_t5.py) and
# google/t5-efficient-tiny; `debug` is for tests and CI. The t5 family's spec holds this table:
# `family("t5").config(size, vocab_size=V, ...)`.
T5_SIZES: dict[str, dict] = {
    "debug": dict(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2),
    "tiny": dict(d_model=256, d_kv=64, d_ff=1024, num_heads=4, num_encoder_layers=4, num_decoder_layers=4),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_encoder_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12, num_decoder_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_encoder_layers=24, num_decoder_layers=24),
}
# Each size with parallel sub-blocks in both stacks: the same weight matrices, 3 x L x D norm
# weights fewer (one norm per layer instead of 2 in the encoder and 3 in the decoder).
T5_SIZES.update({f"{name}-parallel": {**row, "parallel_encoder": True, "parallel_decoder": True}
                 for name, row in list(T5_SIZES.items())})


# ---------------------------------------------------------------------------------------------
# Layers


def rms_norm(cfg: T5Config) -> nn.RMSNorm:
    """T5LayerNorm = RMSNorm: scale only, no mean subtraction, no bias (torch's own module)."""
    return nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)


class GatedGeluFFN(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, T, F); HF "gelu_new"
        return self.wo(self.dropout(h))


class Attention(nn.Module):
    """Multi-head attention without scaling; the additive `bias` carries position bias and masks."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.dropout_p = cfg.dropout_rate

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*Dh) -> (B, H, T, Dh)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(source)), self.heads(self.v(source))  # 2 x (B, H, S, Dh)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.q(x))  # (B, H, T, Dh)
        dropout_p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H*Dh)
        return self.o(y)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of `memory_position - query_position`, as Mesh TensorFlow's
    `_relative_position_bucket` (transformer_layers.py) and HF T5Attention: exact buckets for
    small distances, logarithmic ones up to `max_distance`; the decoder (unidirectional) only
    distinguishes distances into the past."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def forward(self, query_length: int, key_length: int, offset: int = 0) -> torch.Tensor:
        """(1, H, Tq, Tk) bias for queries at positions offset..offset+Tq-1 and keys 0..Tk-1."""
        device = self.embedding.weight.device
        query_pos = torch.arange(offset, offset + query_length, device=device)[:, None]
        key_pos = torch.arange(key_length, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (Tq, Tk)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    """(B, S) 1 = attend / 0 = padding  ->  additive (B, 1, 1, S) bias (0 or dtype min)."""
    if mask is None:
        return 0.0
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_bias(query_length: int, key_length: int, offset: int, dtype, device) -> torch.Tensor:
    """(1, 1, Tq, Tk): query at offset+i may see keys 0..offset+i."""
    query_pos = torch.arange(offset, offset + query_length, device=device)[:, None]
    key_pos = torch.arange(key_length, device=device)[None, :]
    return ((key_pos > query_pos).to(dtype) * torch.finfo(dtype).min)[None, None]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.parallel = cfg.parallel_encoder
        self.attn_norm = rms_norm(cfg)  # parallel: the one norm both branches read
        self.attn = Attention(cfg)
        self.ffn = GatedGeluFFN(cfg)
        if not self.parallel:
            self.ffn_norm = rms_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        h = self.attn_norm(x)
        sa = self.attn(h, *self.attn.kv(h), bias)
        if self.parallel:  # one norm, two branches summed into the residual
            return x + self.dropout(sa + self.ffn(h))
        x = x + self.dropout(sa)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


@dataclass
class DecoderCache(KVCache):
    """The decoder's keys/values for generation (`T5.new_cache`). Self-attention: `k`, `v`
    (L, B, H, max_len, Dh) preallocated and written in place, `pos` positions filled (as the
    decoder-only `KVCache`). Cross-attention: L x (B, H, S, Dh) keys/values of the encoder
    output, computed by the first decode call and reused by every later one."""

    cross_k: list[torch.Tensor] = field(default_factory=list)
    cross_v: list[torch.Tensor] = field(default_factory=list)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.parallel = cfg.parallel_decoder
        self.self_norm = rms_norm(cfg)  # parallel: the one norm all three branches read
        self.self_attn = Attention(cfg)
        self.cross_attn = Attention(cfg)
        self.ffn = GatedGeluFFN(cfg)
        if not self.parallel:
            self.cross_norm = rms_norm(cfg)
            self.ffn_norm = rms_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def self_kv(self, h: torch.Tensor, cache: DecoderCache | None, index: int):
        k, v = self.self_attn.kv(h)  # (B, H, t, Dh)
        if cache is None:
            return k, v
        return cache.update(index, k, v)  # (B, H, pos + t, Dh), views of the preallocated buffer

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, cross_k: torch.Tensor,
                cross_v: torch.Tensor, cross_bias, cache: DecoderCache | None = None,
                index: int = 0) -> torch.Tensor:  # (B, T, D)
        h = self.self_norm(x)
        sa = self.self_attn(h, *self.self_kv(h, cache, index), self_bias)
        if self.parallel:  # one norm, three branches summed into the residual
            ca = self.cross_attn(h, cross_k, cross_v, cross_bias)
            return x + self.dropout(sa + ca + self.ffn(h))
        x = x + self.dropout(sa)
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_k, cross_v, cross_bias))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.rel_bias = RelativePositionBias(cfg, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.final_norm = rms_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        S = x.shape[1]
        bias = self.rel_bias(S, S) + padding_bias(attention_mask, x.dtype)  # (B|1, H, S, S)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, bias)
        return self.dropout(self.final_norm(x))  # (B, S, D)


class T5Decoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.rel_bias = RelativePositionBias(cfg, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.final_norm = rms_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor,
                attention_mask: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        T, offset = x.shape[1], (cache.pos if cache is not None else 0)
        key_length = offset + T
        self_bias = (self.rel_bias(T, key_length, offset)
                     + causal_bias(T, key_length, offset, x.dtype, x.device)
                     + padding_bias(decoder_attention_mask, x.dtype))  # (B|1, H, T, offset+T)
        cross_bias: torch.Tensor | float | None = padding_bias(attention_mask, x.dtype)
        if isinstance(cross_bias, float):
            cross_bias = None
        x = self.dropout(x)
        for i, module in enumerate(self.layers):
            layer = cast(DecoderLayer, module)
            if cache is not None and i < len(cache.cross_k):
                ck, cv = cache.cross_k[i], cache.cross_v[i]
            else:
                ck, cv = layer.cross_attn.kv(encoder_out)  # (B, H, S, Dh)
                if cache is not None:
                    cache.cross_k.append(ck)
                    cache.cross_v.append(cv)
            x = layer(x, self_bias, ck, cv, cross_bias, cache, i)
        if cache is not None:
            cache.pos = key_length
        return self.dropout(self.final_norm(x))  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# Model


class T5(SequenceModel):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)  # shared by both stacks
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Mesh-TF / HF T5 initialisation (HF `T5PreTrainedModel._init_weights`), except the
        untied LM head: std d_model**-0.5 instead of 1.0 so that initial logits are O(1) (the
        reasoning of huggingface/transformers#26441)."""
        cfg = self.cfg
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention):
            nn.init.normal_(module.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
            nn.init.normal_(module.k.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(module.v.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=cfg.inner_dim ** -0.5)
        elif isinstance(module, GatedGeluFFN):
            nn.init.normal_(module.wi_0.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(module.wi_1.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=cfg.d_ff ** -0.5)
        elif isinstance(module, RelativePositionBias):
            nn.init.normal_(module.embedding.weight, std=cfg.d_model ** -0.5)
        elif module is self:
            nn.init.normal_(self.embed.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model ** -0.5)

    # -- counting ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; `non_embedding` leaves out the token embedding and the LM head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + self.lm_head.weight.numel()
        return n

    def flops_per_example(self, inputs, targets):
        """Training FLOPs (forward + backward = 3 x forward) of one example of `inputs` encoder
        tokens and `targets` decoder tokens (ints, or arrays of them for many examples), from the
        config alone: a ZeRO-3-partitioned model counts the same. Matmuls cost 2 FLOPs per weight
        per token (PaLM appendix B): an encoder token passes self-attention (q, k, v, o) and the
        FFN of every encoder layer; a decoder token self-attention, cross-attention's q and o,
        the FFN and the LM head; cross-attention's k and v project each encoder token once per
        decoder layer. Attention scores and the weighted sum cost 2 x 2 x context x (H*Dh) per
        layer per token (encoder S x S, decoder T x T as a full square, cross T x S). Norms,
        softmax and the position-bias gathers are left out."""
        c = self.cfg
        S, T, D, A = inputs, targets, c.d_model, c.inner_dim
        attn, ffn = 4 * D * A, 3 * D * c.d_ff  # (q, k, v, o), (wi_0, wi_1, wo) weights
        encoder = c.num_encoder_layers * S * (2 * (attn + ffn) + 4 * S * A)
        decoder = c.num_decoder_layers * (T * (2 * (attn + 2 * D * A + ffn) + 4 * T * A + 4 * S * A)
                                          + S * 2 * (2 * D * A))
        head = T * 2 * D * c.padded_vocab_size
        return 3.0 * (encoder + decoder + head)

    def flops_per_token(self, inputs_length: int, targets_length: int) -> float:
        """`flops_per_example` per input-or-target token of full-length examples."""
        return self.flops_per_example(inputs_length, targets_length) / (inputs_length + targets_length)

    # -- forward ----------------------------------------------------------------------------

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, T) labels -> decoder inputs: start token, then labels[:-1] with -100 -> pad."""
        shifted = labels.new_full(labels.shape, self.cfg.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.cfg.pad_token_id)

    def encode(self, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), attention_mask)  # (B, S, D)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None,
               cache: DecoderCache | None = None) -> torch.Tensor:
        """Logits (B, t, V) for decoder inputs (B, t). With a `cache` (`new_cache`), the inputs
        are the next t positions after the `cache.pos` already decoded, and the cache is written
        in place; `decoder_attention_mask` then covers all cache.pos + t positions."""
        h = self.decoder(self.embed(decoder_input_ids), encoder_out, attention_mask,
                         decoder_attention_mask, cache)
        return self.lm_head(h)  # (B, t, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, return_logits: bool = True,
                reduction: str = "mean") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids (B, S), labels (B, T) with -100 = ignore (or decoder_input_ids (B, T)).

        Returns (logits (B, T, V) or None, loss or None). The loss is the cross-entropy over
        labels != IGNORE_INDEX: their mean (`reduction="mean"`) or per position (B, T) with 0 where
        ignored (`reduction="none"`, e.g. for loss per denoising task). `return_logits=False`
        (training) applies the LM head only at labelled positions: padded targets cost nothing."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        encoder_out = self.encode(input_ids, attention_mask)
        h = self.decoder(self.embed(decoder_input_ids), encoder_out, attention_mask,
                         decoder_attention_mask)  # (B, T, D)
        if return_logits:
            logits = self.lm_head(h)  # (B, T, V)
            return logits, (None if labels is None else token_loss(logits, labels, reduction))
        if labels is None:
            raise ValueError("T5.forward with return_logits=False needs labels")
        keep = labels != IGNORE_INDEX  # (B, T)
        nll = F.cross_entropy(self.lm_head(h[keep]).float(), labels[keep], reduction="none")  # (N,)
        if reduction == "mean":
            return None, nll.mean()
        return None, torch.zeros(labels.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> DecoderCache:
        """An empty decoder cache for `batch_size` sequences of up to `max_len` decoder positions
        (start token included); default device/dtype: the model's. The decode loop and the
        sampling policy live outside the model, in `amtrain.generate`."""
        c, w = self.cfg, self.embed.weight
        return DecoderCache.empty(c.num_decoder_layers, batch_size, c.num_heads, max_len, c.d_kv,
                                  device or w.device, dtype or w.dtype)



def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) labels, -100 ignored: the mean over
    labelled positions, or (B, T) per position with 0 where ignored (reduction="none")."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B, T), 0 where ignored
    if reduction == "none":
        return nll
    return nll.sum() / (labels != IGNORE_INDEX).sum()


def per_example_loss(token_nll: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) per-position loss (reduction="none") -> (B,) mean over each example's labelled
    positions (0 for an example without labels): loss per denoising task."""
    count = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return token_nll.sum(1) / count


register_family(ModelFamily(
    name="t5", config_cls=T5Config, model_cls=T5, sizes=T5_SIZES, left_to_right=False,
    objective="amtrain.train.objective:DenoiseObjective", adapters={"hf": "amtrain.hf.t5:T5HF"},
    description="T5 encoder-decoder denoiser (span corruption / UL2 under a curriculum)"))
