"""The decoder-only transformer: `DecoderConfig` (typed, validated) and `Decoder` (token
embedding -> L parallel or serial blocks -> final norm -> tied output projection), with a KV
cache for generation and the FLOP count used for MFU. torch only, single-device code.

Shape legend:
    B  batch       T  positions in this call     D  d_model     H  heads    Dh  D // H
    L  layers      V  padded vocab (multiple of `pad_vocab_multiple`)      F  d_ff

Decisions:
- Parallel blocks (PaLM / GPT-J) by default, `block="serial"` for the GPT-2 pre-norm layout;
  see `amtrain.models.layers.ParallelBlock` for the diagram. `block="gpt2"` is GPT-2 itself
  (learned positions, biases: `amtrain.models.gpt2`), for imported GPT-2 / AMT checkpoints.
- RoPE, no learned position embeddings; no bias terms anywhere.
- Input and output embeddings are tied (one (V, D) matrix, counted once).
- The vocabulary is padded up to a multiple of 64 for matmul efficiency. Padded ids never
  occur in data, get trained only towards "never", and are cut off before sampling
  (`amtrain.generate.steps`); `forward` itself returns all V columns.
- Init as GPT-2 / nanoGPT: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2L)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.base import SequenceModel
from amtrain.models.gpt2 import GPT2Attention, GPT2Block, LearnedPositions, init_gpt2_extras
from amtrain.models.layers import (
    FLASH_AVAILABLE,
    CausalSelfAttention,
    KVCache,
    ParallelBlock,
    SerialBlock,
    make_norm,
    residual_init_std,
)
from amtrain.models.mla import LatentCache, MultiHeadLatentAttention, resolve_mla_fields
from amtrain.models.moe import MoEFeedForward, resolve_moe_fields
from amtrain.models.sizes import DECODER_SIZES, SEED_DECODER_SIZES
from amtrain.registry import ModelFamily, register_family
from amtrain.tokens import IGNORE_INDEX

__all__ = ["DecoderConfig", "Decoder", "KVCache"]

BLOCKS = ("parallel", "serial", "gpt2")
ATTENTIONS = ("mha", "mla")
NORMS = ("layernorm", "rmsnorm")
ATTN_IMPLS = ("auto", "sdpa", "flash")


@dataclass
class DecoderConfig:
    vocab_size: int
    """Ids the tokenizer can produce (the dataset manifest's `vocab_size`)."""
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int | None = None
    """MLP hidden width; None -> 4 * d_model."""
    max_seq_len: int = 1024
    """Longest sequence (context) the model is trained and sampled at; sizes the RoPE tables."""
    block: str = "parallel"
    """"parallel": y = x + Attn(Norm(x)) + MLP(Norm(x)); "serial": GPT-2 pre-norm; "gpt2": GPT-2
    exactly (learned positions, biases, no RoPE; `amtrain.models.gpt2`, `norm` must be layernorm)."""
    norm: str = "layernorm"
    """"layernorm" (no bias) or "rmsnorm"."""
    rope_theta: float = 10000.0
    """RoPE base; larger values stretch the longest wavelength for long contexts."""
    dropout: float = 0.0
    """Dropout on attention weights and on each residual branch (training only)."""
    attn_impl: str = "auto"
    """"auto": flash-attn when installed and on CUDA fp16/bf16, else SDPA; "sdpa"; "flash" (required)."""
    pad_vocab_multiple: int = 64
    """Output/embedding rows are padded to a multiple of this."""
    # Mixture of experts (amtrain.models.moe; DeepSeek-V3): n_routed_experts 0 = dense MLP
    n_routed_experts: int = 0
    """Routed experts per MoE layer; 0: every layer has the dense MLP (d_ff)."""
    n_shared_experts: int = 1
    """Always-active experts per MoE layer (each moe_d_ff wide)."""
    top_k_experts: int = 1
    """Routed experts each token goes to."""
    moe_d_ff: int | None = None
    """Width of one expert (fine-grained experts: smaller than d_ff); None -> d_ff."""
    first_dense_layers: int = 0
    """The first this many layers keep the dense MLP (DeepSeek-V3: 3)."""
    bias_update_speed: float = 0.001
    """Step of the per-expert selection bias after each optimizer step (0: no balancing bias)."""
    balance_factor: float = 0.0001
    """Weight of the sequence-wise balance loss (0: none)."""
    # attention (amtrain.models.mla; DeepSeek-V2/V3)
    attention: str = "mha"
    """"mha": multi-head attention, RoPE on full heads; "mla": multi-head latent attention."""
    q_lora_rank: int = 0
    """MLA: rank of the query latent; 0 -> queries straight from x."""
    kv_lora_rank: int | None = None
    """MLA: rank of the key/value latent (what the cache holds); None -> 4 * head_dim."""
    qk_nope_head_dim: int | None = None
    """MLA: per-head query/key width without RoPE; None -> head_dim."""
    qk_rope_head_dim: int | None = None
    """MLA: width of the RoPE query part and of the one RoPE key shared by all heads; None -> head_dim / 2."""
    v_head_dim: int | None = None
    """MLA: per-head value width; None -> head_dim."""
    scale_attn_by_inverse_layer_idx: bool = False
    """block "gpt2" only: attention logits also divided by layer_idx + 1 (Levanter / AMT)."""

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_seq_len",
                     "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.num_heads={self.num_heads}")
        if self.block != "gpt2" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"model.d_model: head width d_model/num_heads = {self.d_model // self.num_heads} "
                             "must be even for RoPE; change model.d_model or model.num_heads")
        _check_choice("block", self.block, BLOCKS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("attention", self.attention, ATTENTIONS)
        if self.block == "gpt2" and self.norm != "layernorm":
            raise ValueError("model.norm: block 'gpt2' uses LayerNorm with bias; set model.norm layernorm")
        if self.scale_attn_by_inverse_layer_idx and self.block != "gpt2":
            raise ValueError("model.scale_attn_by_inverse_layer_idx: only block 'gpt2' has it")
        if self.block == "gpt2" and (self.n_routed_experts or self.attention != "mha"):
            raise ValueError("model.block: 'gpt2' is GPT-2's own block (dense MLP, multi-head attention); "
                             "MoE and MLA need block parallel or serial")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta: must be > 0, got {self.rope_theta}")
        resolve_moe_fields(self)
        resolve_mla_fields(self)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{name}: unknown value {value!r}; choose one of {', '.join(choices)}")


class Decoder(SequenceModel):
    """Decoder-only transformer language model. See the module docstring for the decisions."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.attn_impl == "flash" and not FLASH_AVAILABLE:
            raise ValueError("model.attn_impl: 'flash' but flash-attn is not installed "
                             "(pip install 'amtrain[gpu]'); use 'auto' to fall back to SDPA")
        self.cfg = cfg
        V, D = cfg.padded_vocab_size, cfg.d_model
        self.embed = nn.Embedding(V, D)
        assert cfg.d_ff is not None  # DecoderConfig.__post_init__ resolves it
        gpt2 = cfg.block == "gpt2"
        self.pos_embed = LearnedPositions(cfg.max_seq_len, D) if gpt2 else None
        block_cls = ParallelBlock if cfg.block == "parallel" else SerialBlock
        self.blocks = nn.ModuleList(
            GPT2Block(D, cfg.d_ff, self._gpt2_attention(i), cfg.dropout) if gpt2 else
            block_cls(cfg.norm, D, cfg.d_ff, self._attention(i), cfg.dropout, self._ffn(i))
            for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D) if gpt2 else make_norm(cfg.norm, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one (V, D) parameter
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _attention(self, layer_idx: int) -> nn.Module:
        c = self.cfg
        if c.attention == "mla":
            assert c.kv_lora_rank and c.qk_nope_head_dim and c.qk_rope_head_dim and c.v_head_dim  # resolved
            return MultiHeadLatentAttention(c.d_model, c.num_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                                            c.qk_rope_head_dim, c.v_head_dim, c.max_seq_len, c.rope_theta, c.dropout,
                                            layer_idx)
        return CausalSelfAttention(c.d_model, c.num_heads, c.max_seq_len, c.rope_theta, c.dropout,
                                   c.attn_impl, layer_idx)

    def _ffn(self, layer_idx: int) -> nn.Module | None:
        """An MoE FFN past the first dense layers when experts are configured; None: the dense MLP."""
        c = self.cfg
        if not c.n_routed_experts or layer_idx < c.first_dense_layers:
            return None
        assert c.moe_d_ff is not None  # resolved
        return MoEFeedForward(c.d_model, c.moe_d_ff, c.n_shared_experts, c.n_routed_experts, c.top_k_experts,
                              c.balance_factor, c.bias_update_speed)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def balance_state(self) -> torch.Tensor | None:
        """Tokens routed to each expert since the last bias update, (MoE layers, E), or None
        without MoE layers. The trainer sums it over ranks and hands it to `apply_bias_update`."""
        layers = self.moe_layers()
        return torch.stack([m.load for m in layers]) if layers else None

    def apply_bias_update(self, load: torch.Tensor) -> torch.Tensor:
        """Move every MoE layer's selection bias toward equal load (`MoEFeedForward.apply_bias_update`)
        from the summed counts (MoE layers, E). -> the biases now, (MoE layers, E)."""
        layers = self.moe_layers()
        for m, row in zip(layers, load, strict=True):
            m.apply_bias_update(row)
        return torch.stack([m.expert_bias for m in layers])

    def _gpt2_attention(self, layer_idx: int) -> GPT2Attention:
        c = self.cfg
        return GPT2Attention(c.d_model, c.num_heads, c.dropout, c.attn_impl, layer_idx,
                             c.scale_attn_by_inverse_layer_idx)

    def _init_weights(self) -> None:
        # GPT-2 / nanoGPT (karpathy/nanoGPT model.py `_init_weights` and the c_proj rescale).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for block in self.blocks:  # projections that write into the residual stream
            assert isinstance(block, ParallelBlock | SerialBlock | GPT2Block)
            std = residual_init_std(self.cfg.num_layers)
            attn, mlp = block.attn, block.mlp
            assert isinstance(attn.proj, nn.Linear)
            nn.init.normal_(attn.proj.weight, mean=0.0, std=std)
            if isinstance(mlp, MoEFeedForward):
                mlp.init_weights(0.02, std)
            else:
                assert isinstance(mlp.down, nn.Linear)
                nn.init.normal_(mlp.down.weight, mean=0.0, std=std)
        init_gpt2_extras(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean
        cross-entropy over positions whose target is not -100. With a cache, idx holds the T
        positions after the cache's `pos` and the cache advances by T. `last_only` (generation)
        projects only the last position onto the vocabulary: logits (B, 1, V), the same values
        as the last row of the full forward, without the (B, T, V) prefill logits."""
        B, T = idx.shape
        if last_only and targets is not None:
            raise ValueError("last_only gives no loss: pass targets or last_only, not both")
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed(start, T)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cache)  # (B, T, D)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        logits = self.lm_head(self.norm(x))  # (B, T or 1, V)
        if cache is not None:
            cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                                   ignore_index=IGNORE_INDEX)
            balance = [m.balance for m in self.moe_layers() if m.balance is not None]
            if self.training and balance:  # MoE: the sequence-wise balance loss of every layer
                loss = loss + torch.stack(balance).sum()
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache | LatentCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions (default
        device/dtype: the model's)."""
        c = self.cfg
        if max_len > c.max_seq_len:
            raise ValueError(f"cache of {max_len} positions exceeds model.max_seq_len={c.max_seq_len}")
        w = self.embed.weight
        if c.attention == "mla":
            assert c.kv_lora_rank and c.qk_rope_head_dim
            return LatentCache.empty(c.num_layers, batch_size, max_len, c.kv_lora_rank, c.qk_rope_head_dim,
                                     device or w.device, dtype or w.dtype)
        return KVCache.empty(c.num_layers, batch_size, c.num_heads, max_len, c.head_dim,
                             device or w.device, dtype or w.dtype)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Unique parameters (the tied embedding counted once); `non_embedding` leaves out the
        (V, D) embedding / output matrix (Kaplan et al. 2020 convention); `active` counts only
        the routed experts a token uses (top_k of n_routed_experts per MoE layer)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= sum(m.routed_params() * (m.n_routed - m.top_k) // m.n_routed for m in self.moe_layers())
        return n - self.embed.weight.numel() if non_embedding else n

    def num_active_params(self) -> int:
        return self.num_params(active=True)
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context `seq_len`, PaLM appendix B:

            6 N + 12 L H Dh T   (= 6 N + 12 L D T)

        N = every parameter that is a matmul weight, the tied (V, D) matrix included once
        because the output projection multiplies by it (the input lookup costs no FLOPs); the
        norm gains are in N too (negligible). The second term is the attention scores and
        the weighted sum of values (2 matmuls of T x Dh per head, x3 for backward), counted
        for the full T x T square as PaLM does, i.e. ignoring the causal half.
        MFU = tokens/s * flops_per_token(T) / peak FLOP/s.
        With MoE, N counts the ACTIVE parameters (`num_params(active=True)`); with MLA the second
        term is 6 L H (Dqk + Dv) T for its query/key and value head widths (12 L D T for MHA).
        """
        c = self.cfg
        attn = 12.0 * c.num_layers * c.d_model * seq_len
        if c.attention == "mla":
            assert c.qk_nope_head_dim and c.qk_rope_head_dim and c.v_head_dim
            attn = 6.0 * c.num_layers * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
        return 6.0 * self.num_params(active=True) + attn


register_family(ModelFamily(
    name="decoder", config_cls=DecoderConfig, model_cls=Decoder, sizes={**DECODER_SIZES, **SEED_DECODER_SIZES}, left_to_right=True,
    objective="amtrain.train.objective:LMObjective", study_name="transformer",
    adapters={"hf": "amtrain.hf.decoder:DecoderHF"},
    description="parallel-block decoder (PaLM / GPT-J blocks; serial blocks as an option)"))
