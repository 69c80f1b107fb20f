"""The decoder family <-> transformers causal LMs, weight for weight (docs/hf.md says why each).

    amtrain block / norm        transformers family          how it is exact
    parallel / layernorm        PhiForCausalLM               one shared LayerNorm feeding attention
                                                             and MLP (Phi's block), rotate-half
                                                             RoPE on the full head
                                                             (partial_rotary_factor 1), biases 0
    serial / layernorm          Starcoder2ForCausalLM        two LayerNorms, non-gated tanh-GELU
                                                             MLP, rotate-half RoPE, use_bias=False
                                                             (LayerNorm biases 0)
    serial / rmsnorm            ArceeForCausalLM             Llama with a non-gated MLP: two
                                                             RMSNorms (eps 1e-6), tanh-GELU
    gpt2                        GPT2LMHeadModel              the same block (amtrain.models.gpt2)
    parallel / rmsnorm          refused: no transformers family has a shared-RMSNorm parallel block

All four tie the output projection to the token embedding, as amtrain does; the HF vocabulary is
amtrain's padded one (`padded_vocab_size`) and the padded rows are listed as `suppress_tokens` in
generation_config.json. Imports accept these four model types; GPT-2 checkpoints (OpenAI's,
the Anticipatory Music Transformer's) become `block="gpt2"` decoders.
"""

from __future__ import annotations

from typing import Any

import torch

from amtrain.errors import UserError
from amtrain.hf.common import (
    HFWeights,
    Pair,
    from_hf_state,
    layer_table,
    refuse_unmapped,
    require_transformers,
    to_hf_state,
)
from amtrain.models.decoder import Decoder, DecoderConfig

MAPPED = ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_seq_len", "block", "norm",
          "rope_theta", "pad_vocab_multiple", "scale_attn_by_inverse_layer_idx",
          "dropout", "attn_impl")  # the last two: training / kernel choices, not the function
ACT = "gelu_pytorch_tanh"  # torch's tanh-GELU, what amtrain's MLP calls
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LN_EPS, RMS_EPS = 1e-5, 1e-6  # nn.LayerNorm's default; amtrain.models.layers.make_norm's RMSNorm


def _qkv(b: str, h: str, names: str = "q_proj k_proj v_proj", bias: bool = False) -> list[Pair]:
    out = []
    for j, n in enumerate(names.split()):
        out.append(Pair(f"{b}.attn.qkv.weight", f"{h}.self_attn.{n}.weight", part=j))
        if bias:
            out.append(Pair(f"{b}.attn.qkv.weight", f"{h}.self_attn.{n}.bias", part=j, zero=True))
    return out


def _lin(ours: str, hf: str, bias: bool) -> list[Pair]:
    return [Pair(f"{ours}.weight", f"{hf}.weight")] + ([Pair(f"{ours}.weight", f"{hf}.bias", zero=True)] if bias else [])


def _phi(i: int) -> list[Pair]:
    b, h = f"blocks.{i}", f"model.layers.{i}"
    return (_lin(f"{b}.norm", f"{h}.input_layernorm", True) + _qkv(b, h, bias=True)
            + _lin(f"{b}.attn.proj", f"{h}.self_attn.dense", True)
            + _lin(f"{b}.mlp.up", f"{h}.mlp.fc1", True) + _lin(f"{b}.mlp.down", f"{h}.mlp.fc2", True))


def _starcoder2(i: int) -> list[Pair]:
    b, h = f"blocks.{i}", f"model.layers.{i}"
    return (_lin(f"{b}.norm1", f"{h}.input_layernorm", True) + _qkv(b, h)
            + _lin(f"{b}.attn.proj", f"{h}.self_attn.o_proj", False)
            + _lin(f"{b}.norm2", f"{h}.post_attention_layernorm", True)
            + _lin(f"{b}.mlp.up", f"{h}.mlp.c_fc", False) + _lin(f"{b}.mlp.down", f"{h}.mlp.c_proj", False))


def _arcee(i: int) -> list[Pair]:
    b, h = f"blocks.{i}", f"model.layers.{i}"
    return (_lin(f"{b}.norm1", f"{h}.input_layernorm", False) + _qkv(b, h)
            + _lin(f"{b}.attn.proj", f"{h}.self_attn.o_proj", False)
            + _lin(f"{b}.norm2", f"{h}.post_attention_layernorm", False)
            + _lin(f"{b}.mlp.up", f"{h}.mlp.up_proj", False) + _lin(f"{b}.mlp.down", f"{h}.mlp.down_proj", False))


def _gpt2(i: int) -> list[Pair]:
    b, h = f"blocks.{i}", f"transformer.h.{i}"
    pairs = []
    for ours, hf, conv in (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                           ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                           ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
        pairs += [Pair(f"{b}.{ours}.weight", f"{h}.{hf}.weight", transpose=conv),
                  Pair(f"{b}.{ours}.bias", f"{h}.{hf}.bias")]
    return pairs


# model_type -> (layer table, top-level pairs)
TABLES = {
    "phi": (_phi, _lin("norm", "model.final_layernorm", True) + [
        Pair("embed.weight", "model.embed_tokens.weight"), Pair("embed.weight", "lm_head.bias", zero=True)]),
    "starcoder2": (_starcoder2, _lin("norm", "model.norm", True) + [Pair("embed.weight", "model.embed_tokens.weight")]),
    "arcee": (_arcee, _lin("norm", "model.norm", False) + [Pair("embed.weight", "model.embed_tokens.weight")]),
    "gpt2": (_gpt2, [Pair("embed.weight", "transformer.wte.weight"), Pair("pos_embed.weight", "transformer.wpe.weight"),
                     Pair("norm.weight", "transformer.ln_f.weight"), Pair("norm.bias", "transformer.ln_f.bias")]),
}
TARGETS = {("parallel", "layernorm"): "phi", ("serial", "layernorm"): "starcoder2",
           ("serial", "rmsnorm"): "arcee", ("gpt2", "layernorm"): "gpt2"}


def _table(model_type: str, num_layers: int) -> list[Pair]:
    layer, top = TABLES[model_type]
    return layer_table(num_layers, layer, top)


def _hf_config(model_type: str, c: DecoderConfig):
    tf = require_transformers()
    V, D, L, H, F = c.padded_vocab_size, c.d_model, c.num_layers, c.num_heads, c.d_ff
    rope = {"rope_type": "default", "rope_theta": float(c.rope_theta)}
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=H, hidden_act=ACT,
                  max_position_embeddings=c.max_seq_len, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type == "phi":
        return tf.PhiConfig(**common, layer_norm_eps=LN_EPS, qk_layernorm=False,
                            rope_parameters={**rope, "partial_rotary_factor": 1.0},
                            architectures=["PhiForCausalLM"])
    if model_type == "starcoder2":
        return tf.Starcoder2Config(**common, norm_epsilon=LN_EPS, use_bias=False, sliding_window=None,
                                   rope_parameters=rope, architectures=["Starcoder2ForCausalLM"])
    if model_type == "arcee":
        return tf.ArceeConfig(**common, rms_norm_eps=RMS_EPS, attention_bias=False, mlp_bias=False,
                              head_dim=c.head_dim, rope_parameters=rope, architectures=["ArceeForCausalLM"])
    return tf.GPT2Config(vocab_size=V, n_positions=c.max_seq_len, n_embd=D, n_layer=L, n_head=H, n_inner=F,
                         activation_function=ACT, layer_norm_epsilon=LN_EPS, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, scale_attn_weights=True, tie_word_embeddings=True,
                         scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
                         bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"])


class DecoderHF:
    """The decoder family's "hf" adapter (see the module docstring)."""

    model_types = tuple(TABLES)

    @staticmethod
    def to_hf(model: Decoder) -> HFWeights:
        c = model.cfg
        key = (c.block, c.norm)
        if key == ("parallel", "rmsnorm"):
            raise UserError(f"model.norm={c.norm!r} with model.block={c.block!r}: no transformers family has a "
                            "parallel block on one RMSNorm; export a layernorm parallel or an rmsnorm serial decoder")
        if key not in TARGETS:
            raise UserError(f"model.block={c.block!r} with model.norm={c.norm!r} has no equivalent in transformers; "
                            f"--format hf exports {', '.join(f'{b}/{n}' for b, n in TARGETS)}")
        model_type = TARGETS[key]
        hf_config = _hf_config(model_type, c)
        mapped = MAPPED if c.block == "gpt2" else tuple(m for m in MAPPED if m != "scale_attn_by_inverse_layer_idx")
        refuse_unmapped(c, mapped, type(hf_config).__name__.replace("Config", "ForCausalLM"))
        state = to_hf_state(dict(model.state_dict()), _table(model_type, c.num_layers))
        return HFWeights(hf_config, state, list(range(c.vocab_size, c.padded_vocab_size)))

    @staticmethod
    def from_hf(config: dict, state: dict[str, torch.Tensor], where: str, amtrain: dict | None = None) -> Decoder:
        model_type = config["model_type"]
        if model_type == "gpt2":
            state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
                     for k, v in state.items()}
        cfg = _decoder_config(model_type, config, where, amtrain)
        ours = from_hf_state(state, _table(model_type, cfg.num_layers), where)
        head = state.get("lm_head.weight")
        if head is not None and not torch.equal(head.float(), ours["embed.weight"]):
            raise UserError(f"{where}: lm_head.weight differs from the token embedding; amtrain ties them "
                            "(tie_word_embeddings must be true)")
        if cfg.padded_vocab_size != ours["embed.weight"].shape[0]:
            raise UserError(f"{where}: embedding has {ours['embed.weight'].shape[0]} rows, config vocab_size "
                            f"{config.get('vocab_size')}; the folder is inconsistent")
        model = Decoder(cfg)
        missing, unexpected = model.load_state_dict(ours, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied
        return model.eval()


def _need(config: dict, key: str, ok, where: str, why: str) -> Any:
    value = config.get(key)
    if not ok(value):
        raise UserError(f"{where}: {key}={value!r} cannot be represented by an amtrain decoder ({why})")
    return value


def _decoder_config(model_type: str, config: dict, where: str, amtrain: dict | None) -> DecoderConfig:
    """The DecoderConfig of a transformers config.json; any setting amtrain does not compute is
    refused naming the key."""
    if amtrain and amtrain.get("arch") == "decoder":  # our own export: the exact config back
        return DecoderConfig(**amtrain["model"])
    tied = lambda v: v in (None, True)  # noqa: E731
    if model_type == "gpt2":
        _need(config, "activation_function", lambda v: v in TANH_GELUS, where, "tanh-GELU only")
        _need(config, "layer_norm_epsilon", lambda v: v in (None, LN_EPS), where, "LayerNorm eps 1e-5")
        _need(config, "scale_attn_weights", lambda v: v in (None, True), where, "scaled dot-product")
        _need(config, "add_cross_attention", lambda v: not v, where, "no cross-attention")
        _need(config, "tie_word_embeddings", tied, where, "tied embeddings")
        D = config["n_embd"]
        return DecoderConfig(vocab_size=config["vocab_size"], num_layers=config["n_layer"],
                             num_heads=config["n_head"], d_model=D, d_ff=config.get("n_inner") or 4 * D,
                             max_seq_len=config["n_positions"], block="gpt2", pad_vocab_multiple=1,
                             scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx")))
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0),
                                             "partial_rotary_factor": config.get("partial_rotary_factor", 1.0)}
    _need({"rope_type": rope.get("rope_type", "default")}, "rope_type", lambda v: v == "default", where,
          "plain RoPE")
    _need({"partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}, "partial_rotary_factor",
          lambda v: v in (None, 1.0), where, "RoPE on the full head")
    _need(config, "hidden_act", lambda v: v in TANH_GELUS, where, "tanh-GELU MLP")
    _need(config, "tie_word_embeddings", tied, where, "tied embeddings")
    H = config["num_attention_heads"]
    _need(config, "num_key_value_heads", lambda v: v in (None, H), where, "no grouped-query attention")
    block, norm = {"phi": ("parallel", "layernorm"), "starcoder2": ("serial", "layernorm"),
                   "arcee": ("serial", "rmsnorm")}[model_type]
    if model_type == "phi":
        _need(config, "qk_layernorm", lambda v: not v, where, "no q/k norm")
        _need(config, "layer_norm_eps", lambda v: v in (None, LN_EPS), where, "LayerNorm eps 1e-5")
    elif model_type == "starcoder2":
        _need(config, "sliding_window", lambda v: v is None, where, "full attention")
        _need(config, "norm_epsilon", lambda v: v in (None, LN_EPS), where, "LayerNorm eps 1e-5")
    else:
        _need(config, "rms_norm_eps", lambda v: v == RMS_EPS, where, "RMSNorm eps 1e-6")
        _need(config, "head_dim", lambda v: v in (None, config["hidden_size"] // H), where, "head_dim = D / H")
    return DecoderConfig(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"], num_heads=H,
                         d_model=config["hidden_size"], d_ff=config["intermediate_size"],
                         max_seq_len=config["max_position_embeddings"], block=block, norm=norm,
                         rope_theta=float(rope.get("rope_theta", 10000.0)), pad_vocab_multiple=1)

