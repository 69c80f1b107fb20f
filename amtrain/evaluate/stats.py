"""Statistics of generated sequences, pure functions on numpy arrays (docs/evaluation.md).

Sequence statistics (any units: token ids, words, notes, audio frames):

  repetition_share(seq, n)  seq-rep-n of Welleck et al. 2019 ("Neural text generation with
                            unlikelihood training", Sec. 5): 1 - |distinct n-grams| / |n-grams| of
                            one sequence — the share of its n-grams that repeat an earlier one
  distinct_n(seqs, n)       distinct-n of Li et al. 2016 ("A diversity-promoting objective for
                            neural conversation models"): distinct n-grams / all n-grams, pooled
                            over a set of sequences

Comparing two distributions (samples vs held-out), on histograms over the same bins:

  overlap     histogram intersection sum_i min(p_i, q_i) of the normalised histograms (Swain &
              Ballard 1991); 1 = identical, 0 = disjoint. mgeval (Yang & Lerch 2020, "On the
              evaluation of generative models in music") reports the overlapping area of two
              distributions the same way, on kernel density estimates
  kl          KL(held-out || samples) in bits, both smoothed by EPS per bin so it stays finite
              (mgeval's second figure)
  emd         earth mover's distance between the two histograms over the bin centres
              (scipy.stats.wasserstein_distance), in the bins' unit; for ordered bins only
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

EPS = 1e-6


def ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def repetition_share(seq: Sequence[Hashable], n: int) -> float:
    """1 - distinct n-grams / n-grams of one sequence (0 for a sequence with no repeat, and
    for one shorter than n)."""
    grams = ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(seqs: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams / all n-grams over every sequence of the set (0 when none has n units)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def entropy_bits(counts) -> float:
    """Shannon entropy (bits) of a histogram of counts (0 for an empty one)."""
    c = np.asarray(counts, np.float64).ravel()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log2(p)).sum())


def normalise(counts) -> np.ndarray:
    c = np.asarray(counts, np.float64)
    total = c.sum()
    return c / total if total > 0 else c


def overlap(p, q) -> float:
    """Histogram intersection of the two normalised histograms (0 if either is empty)."""
    p, q = normalise(p), normalise(q)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    return float(np.minimum(p, q).sum())


def kl_bits(p, q) -> float:
    """KL(p || q) in bits of the two histograms, each normalised after adding EPS to every bin."""
    p = normalise(np.asarray(p, np.float64) + EPS)
    q = normalise(np.asarray(q, np.float64) + EPS)
    return float((p * np.log2(p / q)).sum())


def emd(p, q, centres) -> float:
    """Earth mover's distance between two histograms over the same bin centres (nan if either
    is empty)."""
    from scipy.stats import wasserstein_distance

    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    c = np.asarray(centres, np.float64)
    return float(wasserstein_distance(c, c, p, q))


def compare(samples, heldout, centres=None) -> dict[str, float]:
    """{"overlap", "kl_bits"[, "emd"]} of a sample histogram against a held-out one (emd when the
    bins are ordered and `centres` given)."""
    out = {"overlap": overlap(samples, heldout), "kl_bits": kl_bits(heldout, samples)}
    if centres is not None:
        out["emd"] = emd(samples, heldout, centres)
    return out


def histogram(values, edges) -> np.ndarray:
    """Counts of values over bins [edges[i], edges[i+1]); values past the last edge go in the
    last bin, values before the first in the first (so nothing is dropped)."""
    v = np.asarray(values, np.float64).ravel()
    e = np.asarray(edges, np.float64)
    idx = np.clip(np.searchsorted(e, v, side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1).astype(np.int64)


def centres_of(edges) -> np.ndarray:
    e = np.asarray(edges, np.float64)
    return (e[:-1] + e[1:]) / 2


def summary(values) -> dict[str, float]:
    """{"mean", "std"} of per-sample values (nan for none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std())}
