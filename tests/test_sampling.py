"""Sampling from the decoder on tiny CPU fp32 models: cached decoding gives the same tokens as
recomputing the whole sequence, greedy equals a step-by-step argmax, seeds reproduce, padded
vocabulary ids are never produced, top-k / top-p keep only allowed tokens, EOS handling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amtrain.errors import UserError
from amtrain.generate.loop import generate
from amtrain.generate.processors import top_k_filter, top_p_filter
from amtrain.models.decoder import Decoder, DecoderConfig

VOCAB = 70  # pads to 128: 58 padded rows


def tiny(block: str = "parallel", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_seq_len=48, block=block)
    return Decoder(cfg).eval()


PROMPT = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [0, 0, 1, 1, 2]])


@pytest.mark.parametrize("block", ["parallel", "serial"])
def test_greedy_equals_stepwise_argmax_and_cache_matches(block):
    model = tiny(block)
    seq = PROMPT
    for _ in range(20):  # reference: full forward each step, argmax over real ids
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    cached = generate(model, PROMPT, 20, temperature=0, use_cache=True)
    uncached = generate(model, PROMPT, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, seq) and torch.equal(uncached, seq)


@pytest.mark.parametrize("kw", [{}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_seeded_sampling_same_with_and_without_cache(kw):
    model = tiny()
    with_cache = generate(model, PROMPT, 30, seed=123, use_cache=True, **kw)
    without = generate(model, PROMPT, 30, seed=123, use_cache=False, **kw)
    assert with_cache.shape == (3, 35)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], PROMPT)


def test_seed_reproduces_and_leaves_global_rng_alone():
    model = tiny()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = generate(model, PROMPT, 25, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(generate(model, PROMPT, 25, seed=1), a)
    assert not torch.equal(generate(model, PROMPT, 25, seed=2), a)


def _model_favouring_padding() -> Decoder:
    """A model whose padded output rows win by a mile: without masking, greedy and sampling
    would pick ids >= vocab_size almost always."""
    model = tiny()

    def boost(_module, _inputs, logits):
        logits[..., VOCAB:] += 1e4
        return logits

    model.lm_head.register_forward_hook(boost)
    return model


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       use_cache=st.booleans())
def test_padded_vocab_ids_never_sampled(seed, temperature, use_cache):
    model = _model_favouring_padding()
    assert model(PROMPT)[0][:, -1].argmax(-1).min() >= VOCAB  # the hook does what it says
    out = generate(model, PROMPT, 8, temperature=temperature, seed=seed, use_cache=use_cache)
    assert int(out.max()) < VOCAB


def test_sampled_tokens_lie_in_top_k_and_top_p_sets():
    model = tiny()
    seen = []

    def record(logits, generated):  # the processor sees (B, V) logits and the (B, t) sequence
        assert logits.shape == (3, VOCAB) and generated.shape[0] == 3
        seen.append(logits.clone())
        return logits

    for kw in ({"top_k": 3}, {"top_p": 0.5}):
        seen.clear()
        out = generate(model, PROMPT, 15, seed=7, temperature=1.0, logits_processor=record, **kw)
        new = out[:, 5:]
        for step, logits in enumerate(seen):
            allowed = top_k_filter(logits, 3) if "top_k" in kw else top_p_filter(logits, 0.5)
            chosen = allowed.gather(-1, new[:, step:step + 1])
            assert torch.isfinite(chosen).all(), f"{kw}: step {step} chose a filtered-out token"


def test_logits_processor_can_forbid_tokens():
    model = tiny()

    def forbid_even(logits, _generated):
        logits[:, ::2] = float("-inf")
        return logits

    out = generate(model, PROMPT, 20, seed=0, logits_processor=forbid_even)
    assert (out[:, 5:] % 2 == 1).all()


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_top_k_filter_keeps_exactly_the_k_largest(k, seed):
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(top_k_filter(logits, k))
    assert (kept.sum(-1) == k).all()  # continuous random logits: no ties
    smallest_kept = logits.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = logits.masked_fill(kept, float("-inf")).max(-1).values
    assert (smallest_kept > largest_dropped).all()


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.01, 1.0), seed=st.integers(0, 10_000), scale=st.floats(0.1, 5.0))
def test_top_p_filter_keeps_the_smallest_nucleus(p, seed, scale):
    logits = scale * torch.randn(4, 50, generator=torch.Generator().manual_seed(seed))
    probs = logits.double().softmax(-1)
    kept = torch.isfinite(top_p_filter(logits, p))
    if p == 1.0:
        assert kept.all()
    eps = 1e-6  # the filter sums probabilities in fp32
    for row in range(4):
        kept_probs = probs[row][kept[row]]
        dropped = probs[row][~kept[row]]
        assert kept_probs.sum() >= p - eps  # enough mass ...
        assert kept_probs.sum() - kept_probs.min() < p + eps  # ... and minimal
        if dropped.numel():
            assert kept_probs.min() >= dropped.max()  # the most likely tokens


def test_top_k_one_is_greedy():
    model = tiny()
    assert torch.equal(generate(model, PROMPT, 10, top_k=1, seed=3), generate(model, PROMPT, 10, temperature=0))


def test_eos_pads_finished_rows_and_stops_early():
    model = tiny()
    greedy = generate(model, PROMPT, 30, temperature=0)
    eos = int(greedy[0, 5])  # row 0's first generated token
    out = generate(model, PROMPT, 30, temperature=0, eos_id=eos)
    for row, ref in zip(out, greedy, strict=True):  # each row: greedy up to its first eos, then eos
        hits = (ref[5:] == eos).nonzero()
        stop = 5 + int(hits[0]) if hits.numel() else len(ref)
        assert torch.equal(row[:stop], ref[:stop]) and (row[stop:] == eos).all()
    finished_all = generate(model, PROMPT[:1], 30, temperature=0, eos_id=eos)
    assert finished_all.shape == (1, 6)  # stopped right after the only row's eos


def test_too_long_or_bad_requests_are_user_errors():
    model = tiny()
    with pytest.raises(UserError, match="exceeds the model's context max_seq_len=48"):
        generate(model, PROMPT, 44)
    with pytest.raises(UserError, match="token ids must lie in"):
        generate(model, torch.tensor([[VOCAB]]), 2)
    with pytest.raises(UserError, match="top_p"):
        generate(model, PROMPT, 2, top_p=0.0)
    with pytest.raises(UserError, match="top_k"):
        generate(model, PROMPT, 2, top_k=0)


def test_generate_restores_training_mode():
    model = tiny().train()
    generate(model, PROMPT, 3, seed=0)
    assert model.training


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "use_cache": False}])
def test_one_seed_per_row_draws_what_each_row_draws_alone(kw):
    """A batch with one seed per row (the serve worker's batches of jobs): row i is exactly
    the batch of one with seed[i]; one int seed keeps one generator for the batch."""
    model = tiny()
    seeds = [7, 1337, 7]
    batched = generate(model, PROMPT, 30, seed=seeds, **kw)
    alone = [generate(model, PROMPT[i:i + 1], 30, seed=s, **kw) for i, s in enumerate(seeds)]
    assert torch.equal(batched, torch.cat(alone))
    assert not torch.equal(generate(model, PROMPT, 30, seed=7, **kw), batched)
    with pytest.raises(UserError, match="2 seeds for a batch of 3 rows"):
        generate(model, PROMPT, 5, seed=[1, 2], **kw)
