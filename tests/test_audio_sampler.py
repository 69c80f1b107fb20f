"""Priority sampler (the document choice of `denoise.priority` training): matches the
priorities (chi-square), never draws a document too short for the chunk, deterministic per
generator; priority-drawn batches are a function of (seed, step, rank), so a resumed run draws
exactly what the uninterrupted one drew."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from amtrain.data.priority import PrioritySampler, chunk_probabilities
from amtrain.data.span_corruption import (
    Denoiser,
    DenoisingBatcher,
    DenoisingLoader,
    T5Vocab,
    required_targets_length,
)


def _priorities():
    return np.random.default_rng(7).uniform(0.001, 1.0, size=50)


def _draws(sampler: PrioritySampler, n: int, seed: int, num_windows=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if num_windows is None:
        num_windows = np.ones(sampler.num_documents, np.int64)
    return np.array([sampler.choose(rng, num_windows) for _ in range(n)])


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    mask = expected >= 5  # chi-square validity: pool the rare cells
    obs = np.append(observed[mask], observed[~mask].sum())
    exp = np.append(expected[mask], expected[~mask].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum())[1]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_priorities(temperature):
    pri = _priorities()
    n = 200_000
    draws = _draws(PrioritySampler(pri, temperature=temperature), n, seed=3)
    expected = pri ** (1 / temperature)
    expected = expected / expected.sum() * n
    observed = np.bincount(draws, minlength=pri.size)
    p = _chi_square_p(observed, expected)
    assert p > 0.001, f"sampler deviates from priority^(1/T) (p={p:.2e})"
    # and it is not just uniform: the most and least likely chunks differ as predicted
    hi, lo = np.argmax(pri), np.argmin(pri)
    assert observed[hi] > observed[lo]


def test_detects_a_wrong_distribution():
    """The test above can fail: draws from T=1 do not pass as T=0.5."""
    pri = _priorities()
    n = 200_000
    observed = np.bincount(_draws(PrioritySampler(pri, temperature=1.0), n, seed=3), minlength=pri.size)
    assert _chi_square_p(observed, pri ** 2 / (pri ** 2).sum() * n) < 1e-6


def test_documents_too_short_are_never_drawn_and_the_rest_renormalize():
    pri = _priorities()
    num_windows = np.where(np.arange(pri.size) % 3 == 0, 0, 5)  # every third document too short
    n = 100_000
    observed = np.bincount(_draws(PrioritySampler(pri), n, seed=4, num_windows=num_windows), minlength=pri.size)
    assert observed[num_windows == 0].sum() == 0
    expected = pri * (num_windows > 0)
    assert _chi_square_p(observed[num_windows > 0], (expected / expected.sum() * n)[num_windows > 0]) > 0.001


def test_deterministic_per_generator():
    sampler = PrioritySampler(_priorities())
    a = _draws(sampler, 5000, seed=1)
    assert np.array_equal(a, _draws(sampler, 5000, seed=1))
    assert not np.array_equal(a, _draws(sampler, 5000, seed=2))


def test_priority_batches_resume_exactly():
    """Through the hook training uses (`DenoisingBatcher(document_sampler=...)` in a
    `DenoisingLoader`): step 5 drawn alone, as a resumed run draws it, equals step 5 drawn after
    steps 0-4; another rank draws other chunks; every chunk lies inside one document."""
    lengths = np.random.default_rng(0).integers(40, 200, size=30)
    docs = [1000 * (d + 1) + np.arange(n) for d, n in enumerate(lengths)]  # document d: ids (d+1)000...
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    vocab = T5Vocab(base_vocab_size=40_000, num_sentinels=50)
    denoisers, weights = [Denoiser("R", 0.15, 3.0), Denoiser("X", 0.5, 8.0)], [0.5, 0.5]
    targets_length = required_targets_length(48, denoisers)

    def loader(rank: int) -> DenoisingLoader:
        batcher = DenoisingBatcher([np.concatenate(docs)], vocab, 48, targets_length, doc_starts=[starts],
                                   document_sampler=PrioritySampler(np.linspace(0.1, 1.0, len(docs)), 0.5))
        return DenoisingLoader(batcher, micro_batch=8, grad_accum=2, seed=11, rank=rank)

    full = loader(0)
    steps = [full.next_step(s, denoisers, weights) for s in range(6)]
    resumed = loader(0)
    resumed.load_state_dict(full.state_dict())
    for a, b in zip(steps[5], resumed.next_step(5, denoisers, weights), strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(loader(1).next_step(5, denoisers, weights)[0].input_ids, steps[5][0].input_ids)
    for batch in steps[5]:
        for row in batch.input_ids:
            kept = row[row < vocab.base_vocab_size]
            assert np.unique(kept // 1000).size == 1


def test_probability_validation_and_temperature_limits():
    pri = np.array([0.1, 0.2, 0.7])
    assert np.allclose(chunk_probabilities(pri, 1.0), pri / pri.sum())
    assert chunk_probabilities(pri, 0.01)[2] > 0.999
    assert np.allclose(chunk_probabilities(pri, 1e6), 1 / 3, atol=1e-5)
    for bad in ([0.0, 1.0], [np.nan, 1.0], []):
        with pytest.raises(ValueError):
            chunk_probabilities(np.array(bad), 1.0)
