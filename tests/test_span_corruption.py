"""Span corruption: T5 lengths, mask statistics, the corruption round trip, UL2 layouts, batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amtrain.data.span_corruption import (
    IGNORE_INDEX,
    TASKS,
    Denoiser,
    DenoisingBatcher,
    DenoisingLoader,
    T5Vocab,
    compute_input_and_target_lengths,
    corrupt_spans,
    denoise_example,
    merge_inputs_targets,
    random_spans_noise_mask,
    required_targets_length,
    span_exact_match,
    span_lengths_after,
)

VOCAB = T5Vocab(base_vocab_size=1000, num_sentinels=300)


def spans_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the True runs of a bool mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts, ends - starts


def test_vocab_layout():
    v = T5Vocab(base_vocab_size=50257, num_sentinels=100)
    ids = [v.pad_id, v.eos_id, *(v.mode_id(t) for t in TASKS), v.sentinel(0), v.sentinel(99)]
    assert ids == list(range(50257, 50257 + 5)) + [50262, 50361]
    assert v.size == 50362 and v.padded_size == 50368 and v.padded_size % 64 == 0
    assert v.is_sentinel(np.array([50261, 50262, 50361, 50362])).tolist() == [False, True, True, False]


def test_lengths_match_nanot5_and_t5():
    # nanoT5 / T5 at inputs 512, density 0.15, span 3 (no mode token): 568 raw tokens, 114 targets.
    assert compute_input_and_target_lengths(512, 0.15, 3.0, num_prefix=0) == (568, 114)
    # With the UL2 mode token one raw token fewer fits.
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (567, 114)


@pytest.mark.parametrize("denoiser", [Denoiser("R", 0.15, 3), Denoiser("R", 0.15, 8),
                                      Denoiser("X", 0.5, 3), Denoiser("X", 0.15, 32),
                                      Denoiser("X", 0.5, 64), Denoiser("S", 0.25)])
def test_lengths_fill_inputs_and_targets(denoiser):
    """unit=1: every inputs_length in 16..599 is filled exactly; unit>1: the gap is < unit.
    Targets are filled exactly by construction: check it on real corruptions too."""
    rng = np.random.default_rng(0)
    for unit in (1, 3, 4):
        for inputs_length in range(16, 600, 1 if unit == 1 else 7):
            raw, num_targets = compute_input_and_target_lengths(
                inputs_length, denoiser.noise_density, denoiser.mean_span_length, unit, denoiser.task)
            num_inputs = span_lengths_after(raw // unit, denoiser, unit)[0]
            assert raw % unit == 0
            assert (num_inputs == inputs_length) if unit == 1 else (0 <= inputs_length - num_inputs < unit)
            if inputs_length % 97 == 0 or inputs_length == 16:
                x, y = denoise_example(np.arange(raw), denoiser, VOCAB, rng, unit)
                assert (len(x), len(y)) == (num_inputs, num_targets)


@pytest.mark.parametrize("density,mean_span,unit", [(0.15, 3.0, 1), (0.5, 8.0, 1), (0.15, 3.0, 3),
                                                    (0.3, 12.0, 4)])
def test_masks_hit_density_and_mean_span_length_on_average(density, mean_span, unit):
    """T5's mask has round(L*density) noise units in round(noise/mean_span) spans. Per draw the
    rounding bounds the error (|noise - L d| <= 1/2, |noise/m - spans| <= 1/2); over many draws
    with random L the rounding errors are ~uniform and cancel: the average sits within 5 standard
    errors of the target, sigma estimated from the draws themselves (a CLT bound, not a fudge)."""
    rng = np.random.default_rng(1234)
    num_draws = 1500
    densities, span_means, all_spans = [], [], []
    for _ in range(num_draws):
        num_units = int(rng.integers(100, 1000))
        mask = random_spans_noise_mask(num_units * unit, density, mean_span, rng, unit)
        units = mask.reshape(num_units, unit)
        assert (units.all(1) | ~units.any(1)).all()  # spans cover whole units
        units = units[:, 0]
        starts, lengths = spans_of(units)
        densities.append(units.mean())
        span_means.append(lengths.mean())
        all_spans.append(lengths)
        assert abs(units.sum() - num_units * density) <= 0.5 + 1e-9  # per-draw rounding bound
        assert abs(units.sum() / mean_span - len(lengths)) <= 0.5 + 1e-9
    for values, target in ((np.array(densities), density), (np.array(span_means), mean_span)):
        standard_error = values.std(ddof=1) / math.sqrt(num_draws)
        assert abs(values.mean() - target) < 5 * standard_error + 1e-12, (values.mean(), target)
    pooled = np.concatenate(all_spans)
    assert abs(pooled.mean() - mean_span) < 0.02 * mean_span  # pooled over ~50k spans


def test_span_lengths_follow_random_composition():
    """Noise spans are a uniformly random composition of the noise units into k parts, whose
    marginal is P(len=j) = C(n-j-1, k-2) / C(n-1, k-1). Chi-square over 3000 masks (n=30, k=10);
    threshold df + 6 sqrt(2 df) ~ a p-value far below 1e-6 (Wilson-Hilferty)."""
    rng = np.random.default_rng(7)
    lengths = np.concatenate([spans_of(random_spans_noise_mask(200, 0.15, 3.0, rng))[1]
                              for _ in range(3000)])
    n, k = 30, 10
    assert len(lengths) == 3000 * k and lengths.sum() == 3000 * n
    expected_p = np.array([math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
                           for j in range(1, n - k + 2)])
    observed = np.bincount(lengths, minlength=n - k + 2)[1:]
    expected = expected_p * len(lengths)
    big = expected >= 5  # pool the tail into one cell
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), num_units=st.integers(2, 400),
       density=st.floats(0.01, 0.95), mean_span=st.floats(1.0, 40.0),
       unit=st.sampled_from([1, 3, 4, 8]))
def test_corruption_round_trip(seed, num_units, density, mean_span, unit):
    """Every input token is kept or a sentinel standing for exactly one span; sentinels appear in
    order, once in the inputs and once in the targets; merging gives back the original."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB.base_vocab_size, num_units * unit)
    mask = random_spans_noise_mask(len(tokens), density, mean_span, rng, unit)
    inputs, targets = corrupt_spans(tokens, mask, VOCAB)
    starts, lengths = spans_of(mask)
    assert (starts % unit == 0).all() and (lengths % unit == 0).all()
    sent_in = inputs[VOCAB.is_sentinel(inputs)]
    sent_out = targets[VOCAB.is_sentinel(targets)]
    assert sent_in.tolist() == sent_out.tolist() == VOCAB.sentinel(np.arange(len(starts))).tolist()
    assert inputs[~VOCAB.is_sentinel(inputs)].tolist() == tokens[~mask].tolist()
    assert targets[~VOCAB.is_sentinel(targets)].tolist() == tokens[mask].tolist()
    assert len(inputs) + len(targets) == len(tokens) + 2 * len(starts)
    assert merge_inputs_targets(inputs, targets, VOCAB).tolist() == tokens.tolist()


def test_denoise_example_layouts():
    rng = np.random.default_rng(0)
    chunk = np.arange(40)
    for task in ("R", "X"):
        x, y = denoise_example(chunk, Denoiser(task, 0.3, 4), VOCAB, rng)
        assert x[0] == VOCAB.mode_id(task) and x[-1] == VOCAB.eos_id and y[-1] == VOCAB.eos_id
        assert merge_inputs_targets(x[1:-1], y[:-1], VOCAB).tolist() == chunk.tolist()
    x, y = denoise_example(np.arange(60), Denoiser("S", 0.25), VOCAB, rng, unit=3)
    assert x.tolist() == [VOCAB.mode_id("S"), *range(45), VOCAB.eos_id]
    assert y.tolist() == [*range(45, 60), VOCAB.eos_id]


def test_too_many_spans_is_an_error():
    small = T5Vocab(base_vocab_size=100, num_sentinels=4)
    mask = np.tile([False, True], 10)
    with pytest.raises(ValueError, match="num_sentinels"):
        corrupt_spans(np.arange(20), mask, small)


def make_batcher(seed=0, unit=1, targets_length=None):
    tokens = [np.arange(5000, dtype=np.uint16) % 997, np.arange(3000, dtype=np.uint16) % 991]
    denoisers = [Denoiser("R", 0.15, 3), Denoiser("X", 0.5, 3), Denoiser("S", 0.25)]
    targets_length = targets_length or required_targets_length(64, denoisers, unit)
    return DenoisingBatcher(tokens, VOCAB, 64, targets_length, unit, seed), denoisers


def test_batches_shapes_tasks_and_resume():
    batcher, denoisers = make_batcher(unit=3)
    b = batcher.batch(32, denoisers, [0.5, 0.25, 0.25])
    assert b.input_ids.shape == (32, 64) and b.labels.shape == (32, batcher.targets_length)
    assert set(b.task_ids.tolist()) == {0, 1, 2}
    for x, m, y, t in zip(b.input_ids, b.attention_mask, b.labels, b.task_ids, strict=True):
        n = int(m.sum())
        assert x[0] == VOCAB.mode_id(TASKS[t]) and x[n - 1] == VOCAB.eos_id
        assert (x[n:] == VOCAB.pad_id).all() and 64 - n < 3  # gap below one unit
        real = y[y != IGNORE_INDEX]
        assert real[-1] == VOCAB.eos_id and (y[len(real):] == IGNORE_INDEX).all()
        if TASKS[t] != "S":
            merged = merge_inputs_targets(x[1:n - 1], real[:-1], VOCAB)
            assert len(merged) == batcher.raw_length(denoisers[t])
    # a loader's batches are a function of (seed, step, rank): step 3 alone (a resumed run)
    # equals step 3 after steps 0-2, whatever the batcher drew before
    loader = DenoisingLoader(batcher, micro_batch=8, grad_accum=2, seed=7, rank=0)
    after = [loader.next_step(s, denoisers, [0.5, 0.25, 0.25]) for s in range(4)]
    resumed = DenoisingLoader(make_batcher(seed=99, unit=3)[0], micro_batch=8, grad_accum=2, seed=7, rank=0)
    resumed.load_state_dict(loader.state_dict())
    again = resumed.next_step(3, denoisers, [0.5, 0.25, 0.25])
    for a, c in zip(after[3], again, strict=True):
        assert np.array_equal(a.input_ids, c.input_ids) and np.array_equal(a.labels, c.labels)
    assert not np.array_equal(after[3][0].input_ids, after[3][1].input_ids)  # micro-batches differ
    for other in (DenoisingLoader(batcher, 8, 2, seed=8, rank=0), DenoisingLoader(batcher, 8, 2, seed=7, rank=1)):
        assert not np.array_equal(other.next_step(3, denoisers, [0.5, 0.25, 0.25])[0].input_ids,
                                  after[3][0].input_ids)


def test_batch_chunks_are_unit_aligned_windows():
    tokens = [np.arange(6000, dtype=np.int64)]
    batcher = DenoisingBatcher(tokens, VOCAB, 64, 40, unit=3, seed=5)
    denoiser = Denoiser("R", 0.15, 2)
    b = batcher.batch(16, [denoiser])
    for x, m, y in zip(b.input_ids, b.attention_mask, b.labels, strict=True):
        n = int(m.sum())
        merged = merge_inputs_targets(x[1:n - 1], y[y != IGNORE_INDEX][:-1], VOCAB)
        assert merged[0] % 3 == 0 and np.array_equal(merged, np.arange(merged[0], merged[0] + len(merged)))


def test_targets_length_too_short_names_the_denoiser():
    batcher, denoisers = make_batcher(targets_length=20)
    with pytest.raises(ValueError, match="targets_length"):
        batcher.batch(4, denoisers)


def test_binary_search_equals_t5_linear_search():
    """compute_input_and_target_lengths finds what T5's grow-while-it-fits loop finds."""
    for unit in (1, 3):
        for denoiser in (Denoiser("R", 0.15, 3), Denoiser("X", 0.5, 32), Denoiser("S", 0.4)):
            for inputs_length in (20, 63, 128, 257, 512):
                n = 2
                while span_lengths_after(n + 1, denoiser, unit)[0] <= inputs_length:
                    n += 1
                expected = (n * unit, span_lengths_after(n, denoiser, unit)[1])
                assert compute_input_and_target_lengths(
                    inputs_length, denoiser.noise_density, denoiser.mean_span_length, unit,
                    denoiser.task) == expected


def test_document_windows_cover_whole_events():
    """AMT-like documents: a flag token then triples. With doc_starts and unit_offset=1 every
    chunk lies inside one document and starts on a triple; spans cover whole triples."""
    rng = np.random.default_rng(0)
    docs, starts, pos = [], [], 0
    for d in range(6):
        num_triples = int(rng.integers(20, 60))
        docs.append(np.concatenate([[999], 10_000 * (d + 1) + np.arange(num_triples * 3)]))
        starts.append(pos)
        pos += len(docs[-1])
    vocab = T5Vocab(base_vocab_size=70_000, num_sentinels=100)
    batcher = DenoisingBatcher([np.concatenate(docs)], vocab, 48, 40, unit=3, seed=2,
                               doc_starts=[np.array(starts)], unit_offset=1)
    b = batcher.batch(64, [Denoiser("R", 0.3, 2.0)])
    for x, m, y in zip(b.input_ids, b.attention_mask, b.labels, strict=True):
        n = int(m.sum())
        targets = y[y != IGNORE_INDEX][:-1]
        chunk = merge_inputs_targets(x[1:n - 1], targets, vocab)
        assert chunk[0] % 10_000 % 3 == 0  # starts on a triple (never on the flag 999)
        assert np.array_equal(chunk, np.arange(chunk[0], chunk[0] + len(chunk)))  # one document
        bounds = np.append(np.flatnonzero(vocab.is_sentinel(targets)), len(targets))
        for a, c in zip(bounds[:-1], bounds[1:], strict=True):
            span = targets[a + 1:c]
            assert len(span) % 3 == 0 and span[0] % 10_000 % 3 == 0  # whole triples


def test_span_exact_match():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 1000, 60)
    x, y = denoise_example(tokens, Denoiser("R", 0.3, 3.0), VOCAB, rng)
    num_spans = int(VOCAB.is_sentinel(y).sum())
    padded = np.concatenate([y, [IGNORE_INDEX] * 5])
    assert span_exact_match(y, padded, VOCAB) == (num_spans, num_spans)
    wrong = y.copy()
    wrong[1] = (wrong[1] + 1) % 1000  # first token of span 0
    assert span_exact_match(wrong, y, VOCAB) == (num_spans - 1, num_spans)
    truncated = np.concatenate([y[:np.flatnonzero(VOCAB.is_sentinel(y))[-1]], [VOCAB.eos_id]])
    assert span_exact_match(truncated, y, VOCAB) == (num_spans - 1, num_spans)
    assert span_exact_match(np.array([VOCAB.eos_id]), y, VOCAB) == (0, num_spans)
