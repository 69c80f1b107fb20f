"""T5 model: size table, attention directions by gradient, cached decoding, HF parity both ways."""

from __future__ import annotations

import json

import pytest
import torch

from amtrain.errors import UserError
from amtrain.generate.loop import t5_generate
from amtrain.hf.t5 import from_hf_state_dict, hf_config, to_hf_state_dict
from amtrain.models.t5 import (
    T5,
    T5_SIZES,
    T5Config,
    per_example_loss,
    relative_position_bucket,
)
from amtrain.registry import family

torch.set_num_threads(1)


def tiny_cfg(**overrides) -> T5Config:
    base = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=3, relative_attention_num_buckets=8,
                relative_attention_max_distance=20)
    return T5Config(**{**base, **overrides})


# --- sizes -----------------------------------------------------------------------------------

# google/t5-v1_1-{small,base,large} at their vocabulary of 32128: the published parameter counts.
HF_V1_1_COUNTS = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080}
PINNED = {"debug": 4_310_016, "tiny": 25_892_608, **HF_V1_1_COUNTS,
          # parallel sub-blocks: 3 x L x D norm weights fewer (tests/test_t5_parallel.py)
          "debug-parallel": 4_309_632, "tiny-parallel": 25_889_536, "small-parallel": 76_948_864,
          "base-parallel": 247_550_208, "large-parallel": 783_076_352}


@pytest.mark.parametrize("size", sorted(T5_SIZES))
def test_size_table_param_counts(size):
    cfg = family("t5").config(size, vocab_size=32128)
    with torch.device("meta"):
        model = T5(cfg)
    assert model.num_params() == PINNED[size]
    if size in ("debug", "tiny", "small"):  # and a HF model of the same shapes agrees
        from transformers import T5Config as HFConfig
        from transformers import T5ForConditionalGeneration

        with torch.device("meta"):
            hf = T5ForConditionalGeneration(hf_config(cfg))
        hf_count = sum(p.numel() for p in hf.parameters()) + hf.shared.weight.numel()  # + untied head
        assert model.num_params() == hf_count
        assert isinstance(hf.config, HFConfig)


def test_vocab_padding_and_config_errors():
    cfg = family("t5").config("debug", vocab_size=50362)
    assert cfg.padded_vocab_size == 50368
    with pytest.raises(UserError, match="model.size: unknown t5 size 'huge'; valid sizes: debug"):
        family("t5").config("huge")
    with pytest.raises(ValueError, match="pad_token_id"):
        T5Config(vocab_size=10, pad_token_id=10)


def test_flops_per_token_is_about_six_times_params_for_short_sequences():
    model = T5(family("t5").config("debug", vocab_size=512))
    # With S = T and tiny attention contexts, FLOPs/token -> 6 * (params used per token) where an
    # input token uses the encoder layers and a target token the decoder layers + head.
    enc = sum(p.numel() for p in model.encoder.layers.parameters())
    dec = sum(p.numel() for p in model.decoder.layers.parameters()) + model.lm_head.weight.numel()
    expected = 6 * (enc + dec) / 2
    assert model.flops_per_token(1, 1) == pytest.approx(expected, rel=0.01)
    assert model.flops_per_token(512, 128) > model.flops_per_token(64, 16)


@pytest.mark.parametrize("inputs, targets", [(24, 10), (10, 24)])
def test_flops_per_example_equals_the_measured_count(inputs, targets):
    """flops_per_example(S, T) is the matmul FLOPs torch counts in one forward + backward (math
    SDPA kernel), encoder and decoder lengths apart; a model on the meta device counts the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = family("t5").config("debug", vocab_size=500)
    model = T5(cfg)
    x, y = torch.randint(0, 500, (2, inputs)), torch.randint(0, 500, (2, targets))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, labels=y)[1].backward()
    assert counter.get_total_flops() / 2 == model.flops_per_example(inputs, targets)
    with torch.device("meta"):
        assert T5(cfg).flops_per_example(inputs, targets) == model.flops_per_example(inputs, targets)


# --- attention directions by gradient -----------------------------------------------------------


def test_encoder_bidirectional_decoder_causal_by_gradient():
    for parallel in (False, True):
        torch.manual_seed(0)
        model = T5(tiny_cfg(parallel_decoder=parallel)).double()
        S, T = 12, 10
        src = model.embed(torch.randint(0, 128, (1, S))).detach().requires_grad_(True)
        enc = model.encoder(src, None)  # (1, S, D)
        enc[0, 0].sum().backward(retain_graph=True)
        assert (src.grad[0].abs().sum(-1) > 0).all()  # first position sees every position
        src.grad = None
        enc[0, -1].sum().backward()
        assert (src.grad[0].abs().sum(-1) > 0).all()  # last sees every position too

        tgt = model.embed(torch.randint(0, 128, (1, T))).detach().requires_grad_(True)
        enc_out = model.encode(torch.randint(0, 128, (1, S)))
        out = model.decoder(tgt, enc_out, None, None)  # (1, T, D)
        for t in range(T):
            tgt.grad = None
            out[0, t].sum().backward(retain_graph=True)
            reach = tgt.grad[0].abs().sum(-1) > 0
            assert reach[: t + 1].all() and not reach[t + 1:].any(), (parallel, t)


def test_encoder_padding_is_ignored():
    torch.manual_seed(0)
    model = T5(tiny_cfg()).eval()
    x = torch.randint(0, 128, (1, 9))
    y = torch.randint(0, 128, (1, 6))
    padded = torch.cat([x, torch.randint(0, 128, (1, 5))], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        a, loss_a = model(x, labels=y)
        b, loss_b = model(padded, mask, labels=y)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss_a, loss_b)


def test_loss_ignores_minus_100_and_per_example_loss():
    torch.manual_seed(0)
    model = T5(tiny_cfg()).eval()
    x = torch.randint(0, 128, (2, 9))
    y = torch.randint(0, 128, (2, 6))
    y[1, 4:] = -100
    with torch.no_grad():
        logits, loss = model(x, labels=y)
        _, token_nll = model(x, labels=y, reduction="none")
    per = per_example_loss(token_nll, y)
    assert (token_nll[1, 4:] == 0).all()
    torch.testing.assert_close(per[0], torch.nn.functional.cross_entropy(logits[0], y[0]))
    torch.testing.assert_close(per[1], torch.nn.functional.cross_entropy(logits[1, :4], y[1, :4]))
    torch.testing.assert_close(loss, (per[0] * 6 + per[1] * 4) / 10)


def test_training_path_without_logits_matches():
    """return_logits=False (LM head at labelled positions only) gives the same loss and grads."""
    torch.manual_seed(0)
    model = T5(tiny_cfg())
    x = torch.randint(0, 128, (3, 9))
    y = torch.randint(0, 128, (3, 7))
    y[0, 2:] = -100
    y[2, 5:] = -100
    _, full = model(x, labels=y)
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, fast = model(x, labels=y, return_logits=False)
    fast.backward()
    assert logits is None
    torch.testing.assert_close(fast, full)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    _, per_token = model(x, labels=y, return_logits=False, reduction="none")
    _, per_token_full = model(x, labels=y, reduction="none")
    torch.testing.assert_close(per_token, per_token_full)


# --- KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_cached_decoding_equals_full_forward(parallel):
    torch.manual_seed(0)
    model = T5(tiny_cfg(parallel_decoder=parallel)).eval()
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
    assert cache.pos == 25 and cache.k[0].shape == (2, 4, 25, 8)


# --- Hugging Face parity -----------------------------------------------------------------------


def hf_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (3, 40), generator=g)  # 40 > max_distance 20: log buckets used
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 30:] = 0
    mask[2, 5:] = 0
    labels = torch.randint(0, 128, (3, 30), generator=g)
    labels[2, 20:] = -100
    return x, mask, labels


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 7)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ours = relative_position_bucket(rel, bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(ours, theirs)


def test_hf_state_dict_loads_and_gives_same_logits(tmp_path):
    from transformers import T5ForConditionalGeneration

    cfg = tiny_cfg()
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(hf_config(cfg))
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(128, 32) * 0.2)  # untie (v1.1)
    hf.eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    model = from_hf_state_dict(hf.state_dict(), cfg).eval()
    x, mask, labels = hf_inputs()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels)
        logits, loss = model(x, mask, labels=labels)
    torch.testing.assert_close(logits, ref.logits)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    torch.testing.assert_close(loss, ref.loss)


def test_export_to_hf_loads_through_from_pretrained(tmp_path):
    """Our weights -> HF names -> safetensors + config.json -> from_pretrained -> same logits."""
    from safetensors.torch import save_file
    from transformers import T5ForConditionalGeneration

    cfg = tiny_cfg()
    torch.manual_seed(3)
    model = T5(cfg).eval()
    sd = to_hf_state_dict(model)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    hf_config(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["feed_forward_proj"] == "gated-gelu"
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    hf_sd = hf.state_dict()
    for key, value in sd.items():
        assert torch.equal(hf_sd[key], value), key
    x, mask, labels = hf_inputs()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels)
        logits, loss = model(x, mask, labels=labels)
    torch.testing.assert_close(ref.logits, logits)
    torch.testing.assert_close(ref.loss, loss)
    back = from_hf_state_dict(sd, cfg).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_parallel_decoder_has_no_hf_form():
    model = T5(tiny_cfg(parallel_decoder=True))
    with pytest.raises(UserError, match="model.parallel_decoder=True has no equivalent in transformers' T5"):
        to_hf_state_dict(model)
    assert model.num_params() < T5(tiny_cfg()).num_params()  # two norms fewer per layer


def test_save_and_load_pretrained_folder(tmp_path):
    from amtrain.models.io import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = T5(tiny_cfg(parallel_decoder=True)).eval()
    save_pretrained(model, tmp_path / "t5", meta={"tokenizer": "ascii"})
    loaded, meta = load_pretrained(tmp_path / "t5")
    assert isinstance(loaded, T5) and loaded.cfg == model.cfg and meta["tokenizer"] == "ascii"
    x, mask, labels = hf_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask, labels=labels)[0], model(x, mask, labels=labels)[0],
                                   rtol=0, atol=0)


def test_greedy_generate_matches_hf_generate():
    from transformers import T5ForConditionalGeneration

    cfg = tiny_cfg(num_decoder_layers=2)  # HF's generation cache assumes equal stack depths
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(hf_config(cfg))
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(128, 32) * 0.5)
    hf.eval()
    model = from_hf_state_dict(hf.state_dict(), cfg)
    x, mask, _ = hf_inputs()

    def greedy(n, **kw):  # the start token, then the generated targets, as HF returns them
        start = torch.full((x.shape[0], 1), cfg.decoder_start_token_id)
        return torch.cat([start, t5_generate(model, x, n, temperature=0, attention_mask=mask, **kw)], 1)

    ours = greedy(24)
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=24, do_sample=False,
                      num_beams=1, eos_token_id=None, min_new_tokens=24)
    assert torch.equal(ours, ref)
    # EOS: rows stop and repeat eos; a logits processor (here: forbid the best, so second best) is used
    eos = int(ours[0, 3])
    stopped = greedy(24, eos_id=eos)
    assert (stopped[0, 3:] == eos).all() and stopped.shape[1] <= 25
    second = greedy(5, logits_processor=lambda logits, _: logits.scatter(-1, logits.argmax(-1, keepdim=True),
                                                                         float("-inf")))
    assert not torch.equal(second, ours[:, :6])
