"""amtrain.generate on tiny CPU fp32 models: each logits processor and the order of a list; the
one decode loop driving the decoder, the LSTM and T5 (cached == uncached token for token, greedy ==
a step-by-step argmax over full forwards); T5's preallocated cache (the full forward's logits at
every step, written in place); forced ids through the one `ForcedTokens` in window continuation
and T5 in-filling; the layering (models never import generate)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import amtrain
from amtrain.data.span_corruption import T5Vocab
from amtrain.errors import UserError
from amtrain.generate.grammar import IdsBelow, MidiConstraint
from amtrain.generate.loop import Sampler, decode, generate, t5_generate
from amtrain.generate.processors import (
    ForcedTokens,
    LogitsProcessorList,
    Temperature,
    TopK,
    TopP,
    sampling_processors,
    top_k_filter,
    top_p_filter,
)
from amtrain.generate.steps import LMStep, T5Step
from amtrain.generate.t5 import t5_infill
from amtrain.generate.window import generate_long
from amtrain.models.decoder import Decoder, DecoderConfig
from amtrain.models.lstm import LSTMLM, LSTMConfig
from amtrain.models.t5 import T5, T5Config

torch.set_num_threads(1)
VOCAB = 70  # pads to 128
PROMPT = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [0, 0, 1, 1, 2]])
NONE = torch.zeros(2, 0, dtype=torch.long)  # `generated` for processors that do not read it


def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_seq_len=48)).eval()


def tiny_lstm() -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(vocab_size=VOCAB, num_layers=2, d_model=32)).eval()


def tiny_t5(vocab_size: int = VOCAB, parallel: bool = False, start: int = 0) -> T5:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                   num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   parallel_decoder=parallel, pad_token_id=start, decoder_start_token_id=start)
    return T5(cfg).eval()


# --------------------------------------------------------------------------- processors
def test_processor_list_runs_in_list_order():
    add = lambda logits, _: logits + 1  # noqa: E731
    double = lambda logits, _: logits * 2  # noqa: E731
    x = torch.zeros(2, 5)
    assert (LogitsProcessorList([add, double])(x, NONE) == 2).all()
    assert (LogitsProcessorList([double, add])(x, NONE) == 1).all()
    assert LogitsProcessorList()(x, NONE) is x
    nested = LogitsProcessorList([LogitsProcessorList([add]), double])  # a list is a processor
    assert (nested(x, NONE) == 2).all()


def test_sampling_processors_are_temperature_then_top_k_then_top_p():
    warpers = sampling_processors(0.5, 3, 0.9)
    assert [type(p) for p in warpers] == [Temperature, TopK, TopP]
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(warpers(logits, NONE), top_p_filter(top_k_filter(logits / 0.5, 3), 0.9))
    assert sampling_processors(0, 3, 0.9) == []  # greedy: argmax of the caller's logits
    assert [type(p) for p in sampling_processors(1.0, None, None)] == [Temperature]
    for bad, match in (((-1, None, None), "temperature"), ((1, 0, None), "top_k"), ((1, None, 0.0), "top_p"),
                       ((1, None, 1.5), "top_p")):
        with pytest.raises(UserError, match=match):
            sampling_processors(*bad)


def test_top_k_keeps_ties_and_top_p_one_keeps_everything():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(TopK(1)(logits, NONE)).tolist() == [[False, True, True, False, False]]  # tie kept
    assert torch.isfinite(TopK(3)(logits, NONE)).tolist() == [[False, True, True, True, False]]
    assert torch.isfinite(TopK(99)(logits, NONE)).all()
    assert TopP(1.0)(logits, NONE) is logits
    probs = logits.softmax(-1)[0]  # 3, 3 hold ~0.61 of the mass; with 2 ~0.84
    assert torch.isfinite(TopP(0.6)(logits, NONE)).tolist() == [[False, True, True, False, False]]
    assert float(probs[1] + probs[2]) > 0.6
    assert torch.equal(Temperature(2.0)(logits, NONE), logits / 2.0)


def test_forced_tokens_one_hot_at_their_index_only():
    forced = ForcedTokens({0: 3, 2: 5}, start=4)
    logits = torch.randn(2, 8)
    logits[:, 3] = float("-inf")  # a mask before it does not matter: forced wins
    at = lambda t: forced(logits, torch.zeros(2, t, dtype=torch.long))  # noqa: E731
    want = torch.full((2, 8), float("-inf"))
    want[:, 3] = 0.0
    assert torch.equal(at(4), want)
    assert at(5) is logits and at(3) is logits and at(7) is logits
    assert at(6).argmax(-1).tolist() == [5, 5] and torch.isfinite(at(6)).sum() == 2
    assert ForcedTokens({1: 2}, start=-3)(logits, torch.zeros(2, 0, dtype=torch.long)) is logits
    assert ForcedTokens({3: 2}, start=-3)(logits, torch.zeros(2, 0, dtype=torch.long)).argmax(-1).tolist() == [2, 2]


def test_grammar_masks_and_forced_override():
    logits = torch.zeros(2, 12_000)
    below = IdsBelow(5)(logits, NONE)
    assert torch.isfinite(below).sum(-1).tolist() == [5, 5]
    prompt = torch.tensor([[0], [0]])  # header only: the next id is an onset
    grammar = LogitsProcessorList([MidiConstraint(header=1, floor=10), ForcedTokens({0: 11_000}, start=1)])
    assert grammar(logits, prompt).argmax(-1).tolist() == [11_000, 11_000]  # forced beats the grammar
    later = torch.zeros(2, 2, dtype=torch.long)  # the next index is not forced: the grammar alone
    assert torch.equal(grammar(logits, later), MidiConstraint(header=1, floor=10)(logits, later))


def test_sampler_greedy_seeded_and_global_rng_untouched():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(Sampler(temperature=0, top_k=2)(logits, NONE), logits.argmax(-1, keepdim=True))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = Sampler(seed=5), Sampler(seed=5)
    draws_a = [a(logits, NONE) for _ in range(5)]
    assert all(torch.equal(x, b(logits, NONE)) for x in draws_a)  # same seed: same draws, call after call
    assert torch.equal(torch.get_rng_state(), before)
    assert not all(torch.equal(draws_a[0], d) for d in draws_a[1:])  # a sampler's draws move on


# --------------------------------------------------------------------------- one loop, three families
def _steps(family: str, use_cache: bool):
    """(model, step, prompt) for one family: the loop itself never knows which."""
    if family == "t5":
        model = tiny_t5()
        return model, T5Step(model, PROMPT, use_cache=use_cache), PROMPT[:, :0]
    model = tiny_decoder() if family == "decoder" else tiny_lstm()
    return model, LMStep(model, use_cache), PROMPT


def _reference_greedy(family: str, model, n: int) -> torch.Tensor:
    """Step-by-step argmax over full forwards, no cache, no loop."""
    if family == "t5":
        seq = torch.full((3, 1), model.cfg.decoder_start_token_id)
        for _ in range(n):
            logits = model(PROMPT, decoder_input_ids=seq)[0][:, -1, :VOCAB]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        return seq[:, 1:]
    seq = PROMPT
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[0][:, -1, :VOCAB].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("family", ["decoder", "lstm", "t5"])
@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 0.8, "top_k": 20, "seed": 3},
                                {"top_p": 0.9, "seed": 4}])
def test_one_loop_drives_every_family_cached_equals_uncached(family, kw):
    runs = []
    for use_cache in (True, False):
        model, step, prompt = _steps(family, use_cache)
        model.train()
        with torch.no_grad():
            runs.append(decode(step, prompt, 20, Sampler(**kw)))
        assert model.training  # eval inside the loop, training mode restored
    cached, uncached = runs
    assert cached.shape == (3, prompt.shape[1] + 20) and torch.equal(cached, uncached)
    assert int(cached.max()) < VOCAB
    if kw.get("temperature") == 0:
        with torch.no_grad():
            assert torch.equal(cached, _reference_greedy(family, model.eval(), 20))


def test_entry_points_are_the_one_loop():
    """generate / t5_generate are decode with the family's step and a sampler, nothing more."""
    dec, t5 = tiny_decoder(), tiny_t5()
    kw = {"temperature": 0.7, "top_k": 10, "seed": 9}
    assert torch.equal(generate(dec, PROMPT, 12, **kw), decode(LMStep(dec), PROMPT, 12, Sampler(**kw)))
    assert torch.equal(t5_generate(t5, PROMPT, 12, **kw), decode(T5Step(t5, PROMPT), PROMPT[:, :0], 12, Sampler(**kw)))


def test_t5_eos_pads_finished_rows_and_stops_early():
    model = tiny_t5()
    greedy = t5_generate(model, PROMPT, 20, temperature=0)
    eos = int(greedy[0, 2])
    out = t5_generate(model, PROMPT, 20, temperature=0, eos_id=eos)
    stops = []
    for row, ref in zip(out, greedy, strict=True):  # each row: greedy up to its first eos, then eos
        hits = (ref == eos).nonzero()
        stops.append(int(hits[0]) + 1 if hits.numel() else len(ref))
        assert torch.equal(row[:stops[-1]], ref[:stops[-1]]) and (row[stops[-1]:] == eos).all()
    assert out.shape[1] == max(stops)  # stopped once every row had finished
    assert t5_generate(model, PROMPT[:1], 20, temperature=0, eos_id=eos).shape == (1, stops[0])


# --------------------------------------------------------------------------- T5 cache
@pytest.mark.parametrize("parallel", [False, True])
def test_t5_preallocated_cache_matches_full_forward_every_step_in_place(parallel):
    model = tiny_t5(128, parallel)
    x = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    dec = torch.randint(0, 128, (2, 26), generator=torch.Generator().manual_seed(1))  # > max_distance 20
    with torch.no_grad():
        full, _ = model(x, mask, decoder_input_ids=dec)
        enc = model.encode(x, mask)
        cache = model.new_cache(2, 26)
        assert cache.k.shape == (3, 2, 4, 26, 8) and cache.pos == 0
        buffers = (cache.k.data_ptr(), cache.v.data_ptr())
        first = model.decode(dec[:, :4], enc, mask, cache=cache)  # a prefill of 4, then one by one
        torch.testing.assert_close(first, full[:, :4], rtol=1e-5, atol=1e-5)
        cross = [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.cross_k, cache.cross_v, strict=True)]
        assert len(cross) == 3
        for t in range(4, 26):
            step = model.decode(dec[:, t:t + 1], enc, mask, cache=cache)
            torch.testing.assert_close(step, full[:, t:t + 1], rtol=1e-5, atol=1e-5)
            assert cache.pos == t + 1 and (cache.k.data_ptr(), cache.v.data_ptr()) == buffers  # written in place
            assert [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.cross_k, cache.cross_v, strict=True)] == cross
        with pytest.raises(ValueError, match="KV cache full"):
            model.decode(dec[:, :1], enc, mask, cache=cache)


def test_t5_step_cache_is_allocated_once_per_decode():
    model = tiny_t5()
    step = T5Step(model, PROMPT)
    seq = PROMPT[:, :0]
    with torch.no_grad():
        logits = step.prefill(seq, 10)
        ptr = step.cache.k.data_ptr()
        for _ in range(10):
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            logits = step.step(seq)
            assert step.cache.k.data_ptr() == ptr
    assert step.cache.pos == 11 and step.cache.max_len == 11  # start token + 10 targets


# --------------------------------------------------------------------------- forced ids
def test_forced_ids_in_window_continuation_across_stitches():
    model = tiny_decoder()  # 48-token context: 100 new ids take several windows
    forced = {0: 7, 30: 8, 31: 9, 64: 10, 99: 11}

    def forbid(logits, _generated):  # a grammar that forbids the forced ids: forced wins anyway
        return logits.index_fill(-1, torch.tensor([7, 8, 9, 10, 11]), float("-inf"))

    for kw in ({"temperature": 0}, {"seed": 0, "top_k": 30}):
        runs = [generate_long(model, PROMPT, 100, stride=10, header=1, forced=forced, logits_processor=forbid,
                              use_cache=c, **kw) for c in (True, False)]
        assert torch.equal(*runs)
        new = runs[0][:, PROMPT.shape[1]:]
        assert new.shape == (3, 100)
        for i, tok in forced.items():
            assert (new[:, i] == tok).all(), i
        others = [i for i in range(100) if i not in forced]
        assert not torch.isin(new[:, others], torch.tensor([7, 8, 9, 10, 11])).any()


def test_forced_ids_in_t5_infill_across_two_gaps():
    vocab = T5Vocab(40, 4)
    model = tiny_t5(vocab.size, start=vocab.pad_id)
    segments = [np.arange(3), np.arange(5, 8), np.arange(10, 12)]
    forced = {0: 20, 3: 21, 4: 22, 6: 23}  # the first and last id of each gap (lengths 4 and 3)
    for kw in ({"temperature": 0}, {"seed": 1, "temperature": 1.5}):
        runs = [t5_infill(model, vocab, segments, 2, lengths=[4, 3], forced=forced, use_cache=c, **kw)
                for c in (True, False)]
        for tape, other in zip(*runs, strict=True):
            assert np.array_equal(tape, other) and len(tape) == 3 + 4 + 3 + 3 + 2
            assert np.array_equal(tape[:3], segments[0]) and np.array_equal(tape[7:10], segments[1])
            assert np.array_equal(tape[13:], segments[2])
            assert tape[[3, 6, 10, 12]].tolist() == [20, 21, 22, 23]
            assert tape.max() < vocab.base_vocab_size


# --------------------------------------------------------------------------- layering
def _amtrain_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("amtrain.")}


def test_models_never_import_generate_and_generate_imports_only_below_it():
    root = Path(amtrain.__file__).parent
    for f in (root / "models").rglob("*.py"):
        assert "generate" not in _amtrain_imports(f), f
    for f in (root / "generate").rglob("*.py"):
        assert _amtrain_imports(f) <= {"models", "tokens", "errors", "generate"}, f
