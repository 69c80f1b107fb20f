"""The t5 family <-> transformers' `T5ForConditionalGeneration` (T5 v1.1: gated-GELU FFN,
untied LM head, RMSNorm, bucketed relative position bias), weight for weight.

HF key <-> our key: HF {encoder,decoder}.block.{i}.layer.{j}.<sub>; encoder j: 0 attention,
1 FFN; decoder j: 0 self-attention, 1 cross-attention, 2 FFN; the relative position bias lives in
block 0 of each stack. The shared embedding is written as shared / encoder.embed_tokens /
decoder.embed_tokens, as transformers saves it. `parallel_decoder=True` (three sub-blocks on one
norm) has no transformers equivalent and is refused by the generic field check.
"""

from __future__ import annotations

import torch

from amtrain.errors import UserError
from amtrain.hf.common import HFWeights, refuse_unmapped, require_transformers
from amtrain.models.t5 import T5, T5Config

MAPPED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
          "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
          "layer_norm_epsilon", "pad_token_id", "decoder_start_token_id")

_HF_SUBLAYERS = {
    "encoder": {"0.SelfAttention": "attn", "0.layer_norm": "attn_norm",
                "1.DenseReluDense": "ffn", "1.layer_norm": "ffn_norm"},
    "decoder": {"0.SelfAttention": "self_attn", "0.layer_norm": "self_norm",
                "1.EncDecAttention": "cross_attn", "1.layer_norm": "cross_norm",
                "2.DenseReluDense": "ffn", "2.layer_norm": "ffn_norm"},
}
_HF_TOP = {"shared.weight": "embed.weight", "lm_head.weight": "lm_head.weight",
           "encoder.final_layer_norm.weight": "encoder.final_norm.weight",
           "decoder.final_layer_norm.weight": "decoder.final_norm.weight",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               "encoder.rel_bias.embedding.weight",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               "decoder.rel_bias.embedding.weight"}
_OURS_TOP = {v: k for k, v in _HF_TOP.items()}
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_key_to_ours(key: str) -> str | None:
    """None for transformers' aliases of the shared embedding."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    if key.endswith("embed_tokens.weight"):
        return None
    stack, _, block, rest = key.split(".", 3)  # encoder, block, 3, layer.0.SelfAttention.q.weight
    _, j, sub, tail = rest.split(".", 3)
    return f"{stack}.layers.{block}.{_HF_SUBLAYERS[stack][f'{j}.{sub}']}.{tail}"


def ours_key_to_hf(key: str) -> str:
    if key in _OURS_TOP:
        return _OURS_TOP[key]
    stack, _, block, name, tail = key.split(".", 4)  # decoder, layers, 3, cross_attn, q.weight
    inverse = {v: k for k, v in _HF_SUBLAYERS[stack].items()}
    return f"{stack}.block.{block}.layer.{inverse[name]}.{tail}"


def hf_config(cfg: T5Config):
    """The transformers `T5Config` of the same shapes (vocabulary: the padded one)."""
    tf = require_transformers()
    return tf.T5Config(vocab_size=cfg.padded_vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
                       d_ff=cfg.d_ff, num_layers=cfg.num_encoder_layers,
                       num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                       relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                       relative_attention_max_distance=cfg.relative_attention_max_distance,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                       layer_norm_epsilon=cfg.layer_norm_epsilon, pad_token_id=cfg.pad_token_id,
                       decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=None,
                       architectures=["T5ForConditionalGeneration"])


def to_hf_state_dict(model: T5) -> dict[str, torch.Tensor]:
    """The weights under `T5ForConditionalGeneration` names."""
    refuse_unmapped(model.cfg, MAPPED, "T5ForConditionalGeneration")
    sd = {ours_key_to_hf(k): v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    for alias in _ALIASES:
        sd[alias] = sd["shared.weight"].clone()
    return sd


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: T5Config, where: str = "state dict") -> T5:
    """A T5 holding the weights of a `T5ForConditionalGeneration` v1.1 state dict; `cfg` gives the
    shapes (its padded vocabulary = the HF vocabulary)."""
    refuse_unmapped(cfg, MAPPED, "T5ForConditionalGeneration")  # e.g. parallel sub-blocks: HF's T5 is serial
    model = T5(cfg)
    ours = {key: v.float() for k, v in sd.items() if (key := hf_key_to_ours(k)) is not None}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the T5 config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.eval()


class T5HF:
    """The t5 family's "hf" adapter."""

    model_types = ("t5",)

    @staticmethod
    def to_hf(model: T5) -> HFWeights:
        c = model.cfg
        return HFWeights(hf_config(c), to_hf_state_dict(model), list(range(c.vocab_size, c.padded_vocab_size)))

    @staticmethod
    def from_hf(config: dict, state: dict[str, torch.Tensor], where: str, amtrain: dict | None = None) -> T5:
        if amtrain and amtrain.get("arch") == "t5":
            return from_hf_state_dict(state, T5Config(**amtrain["model"]), where)
        for key, ok in (("feed_forward_proj", "gated-gelu"), ("tie_word_embeddings", False)):
            if config.get(key) != ok:
                raise UserError(f"{where}: {key}={config.get(key)!r}; amtrain's T5 is v1.1 ({key}={ok!r})")
        cfg = T5Config(vocab_size=config["vocab_size"], d_model=config["d_model"], d_kv=config["d_kv"],
                       d_ff=config["d_ff"], num_heads=config["num_heads"], num_encoder_layers=config["num_layers"],
                       num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
                       relative_attention_num_buckets=config["relative_attention_num_buckets"],
                       relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
                       layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
                       pad_token_id=config.get("pad_token_id") or 0,
                       decoder_start_token_id=config.get("decoder_start_token_id") or 0)
        if cfg.padded_vocab_size != config["vocab_size"]:
            raise UserError(f"{where}: vocab_size {config['vocab_size']} is not a multiple of 64; amtrain's T5 "
                            "pads its vocabulary to one")
        return from_hf_state_dict(state, cfg, where)
