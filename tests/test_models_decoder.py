"""Decoder model properties on tiny CPU fp32 models: causality by gradient, KV-cache decoding
equals the full forward, no leakage across the batch, parallel vs serial blocks both train on
real text, the size table's pinned parameter counts, vocab padding, FLOP count vs a measured
count, save/load round trip, torch.compile without graph breaks, flash-attn vs SDPA (GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from amtrain.errors import UserError
from amtrain.models import layers
from amtrain.models.decoder import Decoder, DecoderConfig
from amtrain.models.io import load_pretrained, save_pretrained
from amtrain.models.sizes import DECODER_SIZES
from amtrain.registry import family

BLOCKS = ["parallel", "serial"]


def tiny(block: str = "parallel", vocab_size: int = 101, seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab_size, num_layers=2, num_heads=4, d_model=32,
                        max_seq_len=64, block=block, **kw)
    return Decoder(cfg).eval()


def random_ids(B: int, T: int, vocab_size: int = 101, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, kw", [
    ("num_heads", {"d_model": 30, "num_heads": 4}),
    ("d_model", {"d_model": 36, "num_heads": 4}),  # head width 9: odd, no RoPE
    ("block", {"block": "sandwich"}),
    ("norm", {"norm": "batchnorm"}),
    ("attn_impl", {"attn_impl": "xformers"}),
    ("num_layers", {"num_layers": 0}),
    ("dropout", {"dropout": 1.5}),
])
def test_config_validation_names_the_field(field, kw):
    args = {"vocab_size": 100, "num_layers": 2, "num_heads": 4, "d_model": 32} | kw
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**args)


def test_d_ff_defaults_to_four_times_width():
    assert DecoderConfig(vocab_size=10, num_layers=1, num_heads=2, d_model=48).d_ff == 192


@pytest.mark.parametrize("vocab_size", [1, 63, 64, 65, 256 + 3, 50257, 55028])
def test_vocab_padded_to_multiple_of_64(vocab_size):
    cfg = DecoderConfig(vocab_size=vocab_size, num_layers=1, num_heads=2, d_model=16)
    V = cfg.padded_vocab_size
    assert V % 64 == 0 and vocab_size <= V < vocab_size + 64
    with torch.device("meta"):
        model = Decoder(cfg)
    assert model.embed.weight.shape == (V, 16)
    assert model.lm_head.weight is model.embed.weight  # tied


@pytest.mark.skipif(layers.FLASH_AVAILABLE, reason="flash-attn is installed here")
def test_flash_required_but_missing_names_the_field():
    with pytest.raises(ValueError, match="attn_impl"):
        tiny(attn_impl="flash")


def test_param_groups_cover_every_parameter_once():
    from amtrain.train.engine import param_groups

    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) and sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    assert all(p.dim() == 1 for p in no_decay["params"]) and any(p is model.embed.weight for p in decay["params"])


# --- causality --------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
def test_causality_by_gradient(block):
    """d logits[t] / d embedding[t'] is exactly 0 for t' > t and non-zero for t' <= t."""
    model = tiny(block)
    idx = random_ids(2, 12)
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["emb"] = out

    model.embed.register_forward_hook(keep)
    T = idx.shape[1]
    for t in (0, 5, T - 1):
        model.zero_grad()
        logits, _ = model(idx)
        logits[:, t].sum().backward()
        grad = captured["emb"].grad.abs().sum(dim=(0, 2))  # (T,)
        assert torch.all(grad[t + 1:] == 0), f"position {t} depends on the future"
        assert torch.all(grad[: t + 1] > 0), f"position {t} ignores its past"


# --- RoPE -------------------------------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
    rope = layers.RotaryEmbedding(head_dim=16, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 8, 16, generator=g), torch.randn(1, 1, 8, 16, generator=g)  # (B, H, T, Dh)
    scores = rope(q) @ rope(k).transpose(-1, -2)  # (1, 1, T, T)
    shifted = rope(q, start=37) @ rope(k, start=37).transpose(-1, -2)
    torch.testing.assert_close(shifted, scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))  # a rotation
    assert (scores - q @ k.transpose(-1, -2)).abs().max() > 1e-2  # positions do change scores


# --- KV cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
def test_kv_cache_token_by_token_equals_full_forward(block):
    model = tiny(block)
    idx = random_ids(3, 20)
    full, _ = model(idx)
    cache = model.new_cache(3, 20)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", BLOCKS)
def test_kv_cache_prefill_and_chunks_equal_full_forward(block):
    model = tiny(block)
    idx = random_ids(2, 30)
    full, _ = model(idx)
    cache = model.new_cache(2, 32)
    pieces = [(0, 7), (7, 8), (8, 9), (9, 14), (14, 30)]  # multi-token prefill, single steps, chunks
    out = [model(idx[:, a:b], cache=cache)[0] for a, b in pieces]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", BLOCKS)
def test_last_only_logits_are_the_full_forwards_last_row(block):
    """Generation projects only the last position; the values are the full forward's."""
    model = tiny(block)
    idx = random_ids(2, 24)
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and loss is None
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    cache = model.new_cache(2, 24)
    prefill, _ = model(idx[:, :20], cache=cache, last_only=True)
    step, _ = model(idx[:, 20:], cache=cache, last_only=True)  # a 4-token chunk on the cache
    torch.testing.assert_close(prefill, full[:, 19:20], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, -1:], atol=1e-5, rtol=0)
    assert cache.pos == 24
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_kv_cache_overflow_is_an_error():
    model = tiny()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(random_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 65)


def test_sequence_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        tiny()(random_ids(1, 65))


# --- batch independence -----------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
def test_no_leakage_across_batch_or_padding(block):
    """A sequence's logits do not depend on what else is in the batch, nor on padding after it."""
    model = tiny(block)
    a, b = random_ids(1, 16, seed=3), random_ids(1, 16, seed=4)
    alone, _ = model(a)
    batched, _ = model(torch.cat([b, a, b]))
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)
    padded = torch.cat([a[:, :10], torch.zeros(1, 6, dtype=torch.long)], dim=1)
    prefix_logits, _ = model(torch.cat([padded, b]))
    torch.testing.assert_close(prefix_logits[:1, :10], alone[:, :10], atol=1e-5, rtol=0)


def test_loss_ignores_minus_100_targets():
    model = tiny()
    idx = random_ids(2, 10)
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -100
    logits, loss = model(idx, targets)
    logp = logits[:, :-3].log_softmax(-1).gather(-1, targets[:, :-3, None])
    torch.testing.assert_close(loss, -logp.mean(), atol=1e-6, rtol=0)


# --- training on real text --------------------------------------------------------------------

def _kjv_batches(folder, num_batches: int, B: int, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from amtrain.store.dataset import Dataset

    tokens = np.concatenate([np.asarray(t) for t in Dataset(folder).tokens("train")]).astype(np.int64)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(num_batches):
        starts = rng.integers(0, len(tokens) - T - 1, size=B)
        chunk = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]))  # (B, T+1)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


def test_parallel_and_serial_differ_and_both_train(kjv_gpt2):
    vocab_size = json.loads((kjv_gpt2 / "manifest.json").read_text())["vocab_size"]
    batches = _kjv_batches(kjv_gpt2, num_batches=25, B=8, T=32)
    probe = batches[0][0][:2]
    final_logits = {}
    for block in BLOCKS:
        model = tiny(block, vocab_size=vocab_size, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for x, y in batches:
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(np.log(model.cfg.padded_vocab_size), abs=0.2)  # ~uniform at init
        assert np.mean(losses[-5:]) < losses[0] - 2.0, f"{block}: loss did not fall: {losses}"
        final_logits[block] = model.eval()(probe)[0]
    assert (final_logits["parallel"] - final_logits["serial"]).abs().max() > 1e-2


# --- sizes, FLOPs -----------------------------------------------------------------------------

# size: (non-embedding, total at gpt2 vocab 50257, total at midi vocab 55028); parallel block
PINNED = {
    "debug": (98_496, 3_317_952, 3_621_056),
    "tiny": (983_808, 7_422_720, 8_028_928),
    "small": (4_720_384, 17_598_208, 18_810_624),
    "medium": (21_238_656, 40_555_392, 42_374_016),
    "large": (50_340_352, 76_096_000, 78_520_832),
    "xl": (113_259_264, 151_892_736, 155_529_984),
    "amt-gpt2": (84_944_640, 123_578_112, 127_215_360),
}


@pytest.mark.parametrize("size", list(DECODER_SIZES))
def test_size_table_param_counts_pinned(size):
    non_emb, gpt2_total, midi_total = PINNED[size]
    with torch.device("meta"):  # shapes only: no memory, no init time
        gpt2 = Decoder(family("decoder").config(size, vocab_size=50257))
        midi = Decoder(family("decoder").config(size, vocab_size=55028))
    assert gpt2.num_params(non_embedding=True) == non_emb
    assert (gpt2.num_params(), midi.num_params()) == (gpt2_total, midi_total)


def test_size_names_match_their_scale():
    def non_emb(size):
        with torch.device("meta"):
            return Decoder(family("decoder").config(size, vocab_size=256)).num_params(non_embedding=True)
    assert non_emb("debug") < 1e6
    assert 0.8e6 <= non_emb("tiny") <= 1.5e6
    assert 4e6 <= non_emb("small") <= 6e6
    assert 16e6 <= non_emb("medium") <= 24e6
    assert 40e6 <= non_emb("large") <= 60e6
    assert non_emb("xl") >= 100e6
    amt = family("decoder").config("amt-gpt2", vocab_size=55028)
    assert (amt.d_model, amt.num_layers, amt.num_heads, amt.max_seq_len) == (768, 12, 12, 1024)


def test_unknown_size_lists_valid_sizes():
    with pytest.raises(UserError, match="debug, tiny, small"):
        family("decoder").config("huge", vocab_size=256)


def test_decoder_config_overrides():
    cfg = family("decoder").config("debug", vocab_size=256, block="serial", max_seq_len=128)
    assert (cfg.block, cfg.max_seq_len, cfg.d_model) == ("serial", 128, 64)


@pytest.mark.parametrize("block", BLOCKS)
def test_flops_per_token_matches_measured_count(block):
    """6N + 12 L D T equals the matmul FLOPs torch counts for one forward+backward (math SDPA
    kernel, so attention shows up as matmuls); the norm gains are the only difference."""
    model = tiny(block).train()
    B, T = 2, 64
    idx = random_ids(B, T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert counter.get_total_flops() / (B * T) == model.flops_per_token(T) - 6 * norm_params


# --- save / load ------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
def test_save_load_round_trip(tmp_path, block):
    model = tiny(block, norm="rmsnorm")
    idx = random_ids(2, 16)
    out = save_pretrained(model, tmp_path / "m", {"tokenizer": "gpt2", "step": 7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "decoder" and config["model"]["block"] == block
    loaded, meta = load_pretrained(out)
    assert meta == {"tokenizer": "gpt2", "step": 7}
    assert loaded.cfg == model.cfg
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_save_writes_fp32_from_bf16(tmp_path):
    from safetensors.torch import load_file

    model = tiny().to(torch.bfloat16)
    save_pretrained(model, tmp_path, {})
    state = load_file(str(tmp_path / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    assert "lm_head.weight" not in state and "embed.weight" in state  # tied: stored once


def test_load_missing_or_broken_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        load_pretrained(tmp_path)
    save_pretrained(tiny(), tmp_path, {})
    (tmp_path / "config.json").write_text(json.dumps({"arch": "lstm9", "model": {}}))
    with pytest.raises(UserError, match="unknown arch 'lstm9'"):
        load_pretrained(tmp_path)
    save_pretrained(tiny(), tmp_path, {})
    save_pretrained(Decoder(DecoderConfig(vocab_size=101, num_layers=3, num_heads=4, d_model=32)),
                    tmp_path / "other", {})
    (tmp_path / "model.safetensors").replace(tmp_path / "x")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="weights do not match"):
        load_pretrained(tmp_path)


# --- compile ----------------------------------------------------------------------------------

def test_training_path_compiles_without_graph_breaks():
    model = tiny().train()
    idx = random_ids(2, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: breaks raise
    logits, loss = compiled(idx, idx)
    loss.backward()
    ref_logits, _ = model(idx, idx)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)


# --- flash-attn (GPU) -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and layers.FLASH_AVAILABLE),
                    reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("block", BLOCKS)
def test_flash_attn_agrees_with_sdpa(block):
    """Same bf16 weights and inputs through flash-attn and through SDPA: logits agree within
    bf16 resolution, for a full forward and for cached decoding."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=1000, num_layers=2, num_heads=4, d_model=256, max_seq_len=256, block=block)
    flash = Decoder(DecoderConfig(**cfg, attn_impl="flash")).cuda().to(torch.bfloat16).eval()
    sdpa = Decoder(DecoderConfig(**cfg, attn_impl="sdpa")).cuda().to(torch.bfloat16).eval()
    sdpa.load_state_dict(flash.state_dict())
    idx = random_ids(2, 200, vocab_size=1000).cuda()
    with torch.no_grad():
        ref = sdpa(idx)[0].float()
        torch.testing.assert_close(flash(idx)[0].float(), ref, atol=2e-2, rtol=2e-2)
        cache = flash.new_cache(2, 200)
        steps = [flash(idx[:, :150], cache=cache)[0]] + [flash(idx[:, t:t + 1], cache=cache)[0]
                                                          for t in range(150, 200)]
        torch.testing.assert_close(torch.cat(steps, 1).float(), ref, atol=2e-2, rtol=2e-2)
