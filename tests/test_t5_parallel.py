"""T5 with parallel sub-blocks (`parallel_encoder`, `parallel_decoder`, the `*-parallel` sizes):
each block equals its formula on one norm, written out by hand; attention directions by
gradient; cached decoding equals the full forward; the HF adapter refuses it in one line; the
shipped config (ds_configs/t5_parallel.yaml) trains under the trainer and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from amtrain.errors import UserError
from amtrain.generate.loop import t5_generate
from amtrain.models.t5 import T5, T5_SIZES, T5Config, causal_bias, padding_bias
from amtrain.registry import family

torch.set_num_threads(1)


def tiny_cfg(**overrides) -> T5Config:
    base = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                parallel_encoder=True, parallel_decoder=True)
    return T5Config(**{**base, **overrides})


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights away from 1, so a branch reading an unnormalised or differently scaled input shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))


# --- the formula, by hand -------------------------------------------------------------------------


def ref_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_attention(attn, x, source, bias):
    """Unscaled multi-head attention (T5), softmax over keys, from the module's weights."""
    H, Dh = attn.num_heads, attn.d_kv

    def split(t):  # (B, N, H*Dh) -> (B, H, N, Dh)
        return t.view(t.shape[0], t.shape[1], H, Dh).transpose(1, 2)

    q, k, v = split(x @ attn.q.weight.T), split(source @ attn.k.weight.T), split(source @ attn.v.weight.T)
    p = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # (B, H, T, S), no 1/sqrt(Dh)
    return (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H * Dh) @ attn.o.weight.T


def ref_ffn(ffn, x):
    a = x @ ffn.wi_0.weight.T
    gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    return (gelu * (x @ ffn.wi_1.weight.T)) @ ffn.wo.weight.T


def norms_in(module) -> int:
    return sum(isinstance(m, torch.nn.RMSNorm) for m in module.modules())


def test_parallel_encoder_layer_is_x_plus_sa_plus_ffn_of_one_norm():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = T5(cfg).double().eval()
    randomize_norms(model)
    layer = model.encoder.layers[0]
    assert norms_in(layer) == 1 and norms_in(T5(tiny_cfg(parallel_encoder=False)).encoder.layers[0]) == 2
    B, S = 2, 9
    x = torch.randn(B, S, cfg.d_model, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    bias = model.encoder.rel_bias(S, S) + padding_bias(mask, x.dtype)  # position bias + padding, as the stack
    with torch.no_grad():
        n = ref_norm(x, layer.attn_norm.weight, cfg.layer_norm_epsilon)
        want = x + ref_attention(layer.attn, n, n, bias) + ref_ffn(layer.ffn, n)
        got = layer(x, bias)
        torch.testing.assert_close(got, want)
        # and the serial block (attention, then a second norm before the FFN) is another function
        serial = T5(tiny_cfg(parallel_encoder=False)).double().encoder.layers[0]
        serial.load_state_dict({**layer.state_dict(), "ffn_norm.weight": layer.attn_norm.weight.clone()})
        assert (serial(x, bias) - got).abs().max() > 1e-3


def test_parallel_decoder_layer_is_x_plus_sa_plus_ca_plus_ffn_of_one_norm():
    torch.manual_seed(1)
    cfg = tiny_cfg()
    model = T5(cfg).double().eval()
    randomize_norms(model, seed=1)
    layer = model.decoder.layers[1]
    assert norms_in(layer) == 1 and norms_in(T5(tiny_cfg(parallel_decoder=False)).decoder.layers[1]) == 3
    B, S, T = 2, 7, 6
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    enc = torch.randn(B, S, cfg.d_model, dtype=torch.float64)
    enc_mask = torch.ones(B, S, dtype=torch.long)
    enc_mask[0, 5:] = 0
    self_bias = model.decoder.rel_bias(T, T) + causal_bias(T, T, 0, x.dtype, x.device)
    cross_bias = padding_bias(enc_mask, x.dtype)
    with torch.no_grad():
        n = ref_norm(x, layer.self_norm.weight, cfg.layer_norm_epsilon)
        want = (x + ref_attention(layer.self_attn, n, n, self_bias)
                + ref_attention(layer.cross_attn, n, enc, cross_bias) + ref_ffn(layer.ffn, n))
        got = layer(x, self_bias, *layer.cross_attn.kv(enc), cross_bias)
    torch.testing.assert_close(got, want)


def test_parallel_sizes_are_the_serial_weights_less_the_norms():
    """`amtrain models` lists the `*-parallel` rows from the same table: each has every weight
    matrix of its serial size and 3 x L x D fewer norm weights (encoder 2 -> 1 norm per layer,
    decoder 3 -> 1)."""
    for name, row in T5_SIZES.items():
        if not name.endswith("-parallel"):
            continue
        serial = name.removesuffix("-parallel")
        with torch.device("meta"):
            par = T5(family("t5").config(name, vocab_size=32128))
            ser = T5(family("t5").config(serial, vocab_size=32128))
        assert row["parallel_encoder"] and row["parallel_decoder"]
        c = par.cfg
        fewer = (c.num_encoder_layers + 2 * c.num_decoder_layers) * c.d_model
        assert ser.num_params() - par.num_params() == fewer, name
        assert {k for k in ser.state_dict() if "norm" not in k} == {k for k in par.state_dict() if "norm" not in k}
    with torch.device("meta"):
        assert T5(family("t5").config("debug-parallel", vocab_size=32128)).num_params() == 4_309_632


# --- attention directions, cache ---------------------------------------------------------------


def test_parallel_encoder_sees_both_ways_decoder_only_backwards_by_gradient():
    torch.manual_seed(0)
    model = T5(tiny_cfg()).double()
    S, T = 12, 10
    src = model.embed(torch.randint(0, 128, (1, S))).detach().requires_grad_(True)
    enc = model.encoder(src, None)  # (1, S, D)
    for s in (0, S - 1):
        src.grad = None
        enc[0, s].sum().backward(retain_graph=True)
        assert (src.grad[0].abs().sum(-1) > 0).all(), s
    enc_out = model.encode(torch.randint(0, 128, (1, S))).detach().requires_grad_(True)
    tgt = model.embed(torch.randint(0, 128, (1, T))).detach().requires_grad_(True)
    out = model.decoder(tgt, enc_out, None, None)  # (1, T, D)
    for t in range(T):
        tgt.grad = enc_out.grad = None
        out[0, t].sum().backward(retain_graph=True)
        reach = tgt.grad[0].abs().sum(-1) > 0
        assert reach[: t + 1].all() and not reach[t + 1:].any(), t
        assert (enc_out.grad[0].abs().sum(-1) > 0).all(), t  # cross-attention reads every input


def test_parallel_cached_decoding_and_generation_equal_the_full_forward():
    torch.manual_seed(0)
    model = T5(tiny_cfg()).eval()
    randomize_norms(model)
    x = torch.randint(0, 128, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    dec = torch.randint(0, 128, (2, 25))  # longer than max_distance: the far buckets are used
    with torch.no_grad():
        full, _ = model(x, mask, decoder_input_ids=dec)
        enc = model.encode(x, mask)
        cache = model.new_cache(2, 25)
        steps = [model.decode(dec[:, :3], enc, mask, cache=cache)]  # a prompt, then one by one
        steps += [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(3, 25)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # greedy generation with the cache = argmax of the full forward, position by position
    with torch.no_grad():
        ours = t5_generate(model, x, 12, temperature=0, attention_mask=mask)
        ids = torch.full((2, 1), model.cfg.decoder_start_token_id)
        for _ in range(12):
            logits, _ = model(x, mask, decoder_input_ids=ids)
            ids = torch.cat([ids, logits[:, -1, :model.cfg.vocab_size].argmax(-1, keepdim=True)], 1)
        sampled = [t5_generate(model, x, 12, temperature=1.0, seed=5, attention_mask=mask, use_cache=c)
                   for c in (True, False)]
    assert torch.equal(ours, ids[:, 1:])
    assert torch.equal(sampled[0], sampled[1])


def test_hf_adapter_refuses_a_parallel_t5_in_one_line():
    from amtrain.hf.t5 import from_hf_state_dict, to_hf_state_dict

    hf = family("t5").adapter("hf")
    serial = to_hf_state_dict(T5(tiny_cfg(parallel_encoder=False, parallel_decoder=False)))
    for over in ({"parallel_decoder": False}, {"parallel_encoder": False}, {}):
        cfg = tiny_cfg(**over)
        with pytest.raises(UserError, match="has no equivalent in transformers' T5") as err:
            hf.to_hf(T5(cfg))
        assert "\n" not in str(err.value)
        assert all(f"{k}=" not in str(err.value) or getattr(cfg, k) for k in ("parallel_encoder", "parallel_decoder"))
        with pytest.raises(UserError, match="has no equivalent in transformers' T5"):
            from_hf_state_dict(serial, cfg)


# --- the shipped config under the trainer ----------------------------------------------------------


@pytest.fixture(scope="module")
def parallel_run(kjv_gpt2, tmp_path_factory):
    """The shipped YAML through the launcher's config path, cut to the few-step test run."""
    from amtrain.config import parse_args
    from amtrain.train.loop import train
    from tests.test_t5_trainer import t5_args
    from tests.train_helpers import REPO, argv

    def cfg(out, **over):
        args = t5_args(kjv_gpt2, out, **{"train.eval_every": 0, "train.rollout_every": 0, **over})
        del args["model.size"]  # the YAML's: debug-parallel
        return parse_args(["--config", str(REPO / "ds_configs" / "t5_parallel.yaml"), *argv(args)])

    out = tmp_path_factory.mktemp("t5par")
    return cfg, train(cfg(out))


@pytest.mark.slow
def test_shipped_parallel_config_trains_and_resumes_exactly(parallel_run, tmp_path):
    from amtrain.train import checkpoint
    from amtrain.train.export import load_checkpoint_model
    from amtrain.train.loop import train

    cfg, result = parallel_run
    assert cfg(tmp_path).model.size == "debug-parallel"
    model, _ = load_checkpoint_model(result.run_dir)
    assert isinstance(model, T5) and model.cfg.parallel_encoder and model.cfg.parallel_decoder
    assert norms_in(model.encoder.layers[0]) == 1 and norms_in(model.decoder.layers[0]) == 1
    print(f"debug-parallel under the trainer: loss {result.losses[1]:.3f} -> {result.losses[8]:.3f}")
    steps = sorted(result.losses)
    assert steps == list(range(1, 9))
    late = sum(result.losses[s] for s in (6, 7, 8)) / 3
    assert late < result.losses[1] - 0.8, result.losses  # 11.44 -> 10.28 (steps 6-8), 4 examples/step
    step4 = result.run_dir / "checkpoints" / "step_00000004"
    resumed = train(cfg(tmp_path / "resumed", **{"train.resume": str(step4)}))
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed.losses[step] == pytest.approx(result.losses[step], rel=1e-6, abs=0), step
    a = checkpoint.consolidated_state_dict(result.checkpoint)
    b = checkpoint.consolidated_state_dict(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
