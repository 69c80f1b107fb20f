"""Priority sampler: matches the priorities (chi-square), deterministic, disjoint across ranks,
resumable."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from amtrain.data.priority import PrioritySampler, chunk_probabilities


def _priorities():
    return np.random.default_rng(7).uniform(0.001, 1.0, size=50)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_priorities(temperature):
    pri = _priorities()
    n = 200_000
    draws = PrioritySampler(pri, temperature=temperature, seed=3).take(n)
    expected = pri ** (1 / temperature)
    expected = expected / expected.sum() * n
    observed = np.bincount(draws, minlength=pri.size)
    mask = expected >= 5  # chi-square validity: pool the rare cells
    obs = np.append(observed[mask], observed[~mask].sum())
    exp = np.append(expected[mask], expected[~mask].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    _, p = stats.chisquare(obs, exp)
    assert p > 0.001, f"sampler deviates from priority^(1/T) (p={p:.2e})"
    # and it is not just uniform: the most and least likely chunks differ as predicted
    hi, lo = np.argmax(pri), np.argmin(pri)
    assert observed[hi] > observed[lo]


def test_detects_a_wrong_distribution():
    """The test above can fail: draws from T=1 do not pass as T=0.5."""
    pri = _priorities()
    n = 200_000
    observed = np.bincount(PrioritySampler(pri, temperature=1.0, seed=3).take(n), minlength=pri.size)
    wrong = pri ** 2 / (pri ** 2).sum() * n
    mask = wrong >= 5
    obs = np.append(observed[mask], observed[~mask].sum())
    exp = np.append(wrong[mask], wrong[~mask].sum())
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum())[1] < 1e-6


def test_deterministic_per_seed():
    pri = _priorities()
    a = PrioritySampler(pri, seed=1).take(5000)
    assert np.array_equal(a, PrioritySampler(pri, seed=1).take(5000))
    assert not np.array_equal(a, PrioritySampler(pri, seed=2).take(5000))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_union_is_single_stream(world):
    pri = _priorities()
    n = 9000
    single = PrioritySampler(pri, seed=5).take(n)
    per_rank = [PrioritySampler(pri, seed=5, rank=r, world_size=world).take(n // world) for r in range(world)]
    merged = np.empty(n, np.int64)
    for r, d in enumerate(per_rank):
        merged[r::world] = d  # rank r owns global draws r, r+W, ...
    assert np.array_equal(merged, single)


def test_resume_equals_uninterrupted_and_across_world_sizes():
    pri = _priorities()
    full = PrioritySampler(pri, seed=9).take(10_000)
    s = PrioritySampler(pri, seed=9)
    head = s.take(4321)
    state = s.state_dict()
    r = PrioritySampler(pri, seed=9)
    r.load_state_dict(state)
    assert np.array_equal(np.concatenate([head, r.take(10_000 - 4321)]), full)
    # world 2 resumes from a single-process state at the next whole round
    ranks = [PrioritySampler(pri, seed=9, rank=k, world_size=2) for k in range(2)]
    for k in ranks:
        k.load_state_dict(state)
    start = ranks[0].position
    assert np.array_equal(ranks[1].take(100), full[start + 1:start + 200:2])
    with pytest.raises(ValueError):
        PrioritySampler(pri[:10], seed=9).load_state_dict(state)


def test_probability_validation_and_temperature_limits():
    pri = np.array([0.1, 0.2, 0.7])
    assert np.allclose(chunk_probabilities(pri, 1.0), pri / pri.sum())
    assert chunk_probabilities(pri, 0.01)[2] > 0.999
    assert np.allclose(chunk_probabilities(pri, 1e6), 1 / 3, atol=1e-5)
    for bad in ([0.0, 1.0], [np.nan, 1.0], []):
        with pytest.raises(ValueError):
            chunk_probabilities(np.array(bad), 1.0)
