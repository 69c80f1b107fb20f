"""Scaling-law fits recover known parameters from data drawn from the law with noise."""

from __future__ import annotations

import numpy as np
import pytest

from amtrain.scaling.fit import PowerLaw, fit_data_power_law, fit_power_law, fit_with_bootstrap


def test_exact_law_is_recovered():
    n = np.logspace(5, 9, 7)
    true = PowerLaw(a=400.0, alpha=0.34, c=1.7)
    law = fit_power_law(n, true(n))
    assert law.alpha == pytest.approx(0.34, rel=1e-3)
    assert law.a == pytest.approx(400.0, rel=2e-2)
    assert law.c == pytest.approx(1.7, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_law_alpha_inside_bootstrap_interval(seed):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(5, 8.5, 8), 2)
    true = PowerLaw(a=60.0, alpha=0.28, c=2.1)
    loss = true(n) * np.exp(rng.normal(0, 0.01, n.size))  # 1% multiplicative noise
    res = fit_with_bootstrap(n, loss, num_boot=100, level=0.95, seed=seed)
    lo, hi = res.alpha_ci
    assert lo < 0.28 < hi
    assert hi - lo < 0.2  # informative, not a vacuous interval
    assert res.law.alpha == pytest.approx(0.28, abs=0.05)


def test_huber_fit_shrugs_off_one_bad_run():
    n = np.logspace(5, 9, 9)
    true = PowerLaw(a=100.0, alpha=0.3, c=1.5)
    loss = true(n)
    loss[4] *= 1.5  # one diverged run
    assert fit_power_law(n, loss).alpha == pytest.approx(0.3, abs=0.02)


def test_data_law_is_recovered():
    rng = np.random.default_rng(3)
    n = 10 ** rng.uniform(6, 9, 40)
    d = 10 ** rng.uniform(8, 11, 40)
    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28  # Chinchilla's fitted values
    loss = E + A / n**alpha + B / d**beta
    law = fit_data_power_law(n, d, loss)
    assert law.alpha == pytest.approx(alpha, abs=0.01)
    assert law.beta == pytest.approx(beta, abs=0.01)
    assert law.E == pytest.approx(E, abs=0.01)


def test_too_few_runs_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3 runs"):
        fit_power_law([1e6, 1e7], [3.0, 2.5])


def test_three_sizes_give_no_interval_rather_than_a_false_one():
    n = np.array([1e5, 1e6, 1e7])
    res = fit_with_bootstrap(n, PowerLaw(50.0, 0.3, 2.0)(n), num_boot=10)
    assert res.law.alpha == pytest.approx(0.3, rel=1e-2)
    assert np.isnan(res.alpha_ci[0]) and np.isnan(res.alpha_ci[1]) and res.num_boot == 0


def test_non_monotone_data_is_flagged_with_residuals_and_a_signed_exponent():
    """Loss that rises with size: the fit cannot pass through the points (residuals reported,
    not 'fitted exactly'), the rise and a negative exponent are flagged, and the law prints
    its exponent's sign once."""
    from amtrain.scaling.fit import format_law

    n = np.array([1e5, 1e6, 1e7])
    loss = np.array([3.0, 3.3, 2.9])
    res = fit_with_bootstrap(n, loss, num_boot=10)
    assert len(res.residuals) == 3
    assert res.residuals == pytest.approx(tuple(loss - res.law(n)))
    assert res.max_abs_residual > 0.05
    assert any("loss does not fall with size" in w and "N=100,000 -> 1,000,000" in w for w in res.warnings)
    rising = fit_with_bootstrap(n, np.array([2.5, 2.8, 3.2]), num_boot=10)
    assert rising.law.alpha < 0 and any("exponent" in w and "< 0" in w for w in rising.warnings)
    text = format_law(rising.law)
    assert "N^(+" in text and "−-" not in text and "--" not in text
    assert "N^(−0.300)" in format_law(PowerLaw(50.0, 0.3, 2.0))


def test_a_clean_law_has_no_warnings():
    n = np.array([1e5, 1e6, 1e7, 1e8])
    res = fit_with_bootstrap(n, PowerLaw(50.0, 0.3, 2.0)(n), num_boot=10)
    assert res.warnings == () and res.max_abs_residual < 1e-3
