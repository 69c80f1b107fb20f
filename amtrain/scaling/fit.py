"""Scaling-law fits: L(N) = a·N^(−α) + c and L(N, D) = E + A/N^α + B/D^β.

Fitted as the Chinchilla paper does (Hoffmann et al. 2022, appendix D.2): in log space, the
prediction log L̂ = LSE(log a − α log N, log c) is compared with log L through a Huber loss
(δ = 1e-3), minimised with L-BFGS from every point of a grid of starting values; the best
optimum wins. The Huber loss keeps one bad run from dragging the fit. Uncertainty: a bootstrap
over runs (resample with replacement, refit) gives a percentile interval for α.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class PowerLaw:
    """L(N) = a·N^(−alpha) + c."""

    a: float
    alpha: float
    c: float

    def __call__(self, n):
        return self.a * np.asarray(n, dtype=float) ** -self.alpha + self.c


@dataclass(frozen=True)
class DataPowerLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.clip(r, -delta, delta)


def _lse_fit(features: list[np.ndarray], log_loss: np.ndarray, starts) -> np.ndarray:
    """Minimise Σ huber(LSE_k(θ_k0 − θ_k1·f_k) − log L) over θ; `features` are log N, log D, ...
    (the last LSE term is a constant). θ = [a0, e0, (b0, e1), ..., c]; `starts` are the initial
    θ tried. Returns the best θ."""
    from scipy.optimize import minimize

    def objective(theta):
        terms, grads = _terms(theta, features)
        m = terms.max(axis=0)
        w = np.exp(terms - m)
        pred = m + np.log(w.sum(axis=0))
        r = pred - log_loss
        g = _huber_grad(r)
        soft = w / w.sum(axis=0)  # d pred / d term_k
        grad = np.array([np.sum(g * soft[k] * dk) for k, dk in grads])
        return float(np.sum(_huber(r))), grad

    results = [minimize(objective, np.array(start, float), jac=True, method="L-BFGS-B") for start in starts]
    return min(results, key=lambda res: res.fun).x


def _terms(theta: np.ndarray, features: list[np.ndarray]):
    """Each LSE term and d term / d θ_i as (term index, derivative) pairs in θ order."""
    terms, grads = [], []
    for k, f in enumerate(features):
        coef, expo = theta[2 * k], theta[2 * k + 1]
        terms.append(coef - expo * f)
        grads += [(k, np.ones_like(f)), (k, -f)]
    terms.append(np.full_like(features[0], theta[-1]))
    grads.append((len(features), np.ones_like(features[0])))
    return np.array(terms), grads


POWER_LAW_GRID = list(itertools.product(np.linspace(0, 20, 5), np.linspace(0, 2, 5), np.linspace(-1, 1.5, 4)))


def fit_power_law(n, loss, starts=None) -> PowerLaw:
    """Fit from every start of POWER_LAW_GRID (log a, α, log c) unless `starts` are given."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if n.size < 3:
        raise ValueError(f"a power law with an offset needs at least 3 runs, got {n.size}")
    la, alpha, lc = _lse_fit([np.log(n)], np.log(loss), starts or POWER_LAW_GRID)
    return PowerLaw(float(np.exp(la)), float(alpha), float(np.exp(lc)))


def fit_data_power_law(n, d, loss) -> DataPowerLaw:
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    if n.size < 5:
        raise ValueError(f"L(N, D) has 5 parameters: needs at least 5 runs, got {n.size}")
    grid = [np.linspace(0, 20, 3), np.linspace(0, 2, 3), np.linspace(0, 20, 3), np.linspace(0, 2, 3), np.linspace(-1, 1, 3)]
    la, alpha, lb, beta, le = _lse_fit([np.log(n), np.log(d)], np.log(loss), list(itertools.product(*grid)))
    return DataPowerLaw(float(np.exp(le)), float(np.exp(la)), float(alpha), float(np.exp(lb)), float(beta))


@dataclass(frozen=True)
class FitResult:
    law: PowerLaw
    alpha_ci: tuple[float, float]
    num_runs: int
    num_boot: int
    residuals: tuple[float, ...] = ()
    """loss - law(N) per run (nats), in the order given."""
    warnings: tuple[str, ...] = ()
    """What makes the fit untrustworthy: loss not falling with size, a negative exponent."""

    @property
    def max_abs_residual(self) -> float:
        return max((abs(r) for r in self.residuals), default=float("nan"))


def fit_warnings(n, loss, law: PowerLaw) -> tuple[str, ...]:
    """Plain-words flags on data that a power law cannot describe."""
    order = np.argsort(n, kind="stable")
    n, loss = np.asarray(n, float)[order], np.asarray(loss, float)[order]
    out = []
    rises = [(int(a), int(b)) for a, b, la, lb in zip(n[:-1], n[1:], loss[:-1], loss[1:], strict=True) if lb > la]
    if rises:
        a, b = rises[0]
        out.append(f"loss does not fall with size ({len(rises)} rise(s), e.g. N={a:,} -> {b:,})")
    if law.alpha < 0:
        out.append(f"exponent α = {law.alpha:.3f} < 0: the fitted loss grows with size; not a scaling law "
                   "(larger runs undertrained or diverged?)")
    return tuple(out)


def format_law(law: PowerLaw) -> str:
    """a·N^(−α) + c with the exponent's sign shown once (α < 0 prints as N^(+|α|))."""
    sign = "−" if law.alpha >= 0 else "+"
    return f"{law.a:.3g}·N^({sign}{abs(law.alpha):.3f}) + {law.c:.3f}"


def fit_with_bootstrap(n, loss, num_boot: int = 200, level: float = 0.9, seed: int = 0) -> FitResult:
    """Point fit plus a percentile bootstrap interval for α (resampling runs with replacement;
    resamples with fewer than 3 distinct sizes are drawn again). Each refit starts from the
    point fit (and from half its α), not the full grid, to stay cheap.

    With runs at only 3 sizes every admissible resample is the same set of points: there is no
    spread to measure, so the interval is (nan, nan) — run a 4th size or repeat sizes with other
    seeds. (Three points need not be fitted exactly: the law is monotone, so data that is not
    leaves residuals; they are reported, with `fit_warnings`.)"""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    law = fit_power_law(n, loss)
    residuals = tuple(float(r) for r in loss - law(n))
    warnings = fit_warnings(n, loss, law)
    if np.unique(n).size <= 3:
        return FitResult(law, (float("nan"), float("nan")), int(n.size), 0, residuals, warnings)
    starts = [(np.log(law.a), law.alpha, np.log(law.c)), (np.log(law.a), 0.5 * law.alpha, np.log(law.c))]
    rng = np.random.default_rng(seed)
    alphas: list[float] = []
    while len(alphas) < num_boot:
        idx = rng.integers(0, n.size, n.size)
        if np.unique(n[idx]).size < 3:
            continue
        alphas.append(fit_power_law(n[idx], loss[idx], starts).alpha)
    lo, hi = np.quantile(alphas, [(1 - level) / 2, (1 + level) / 2])
    return FitResult(law, (float(lo), float(hi)), int(n.size), num_boot, residuals, warnings)
