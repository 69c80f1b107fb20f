"""prep-audio's chunk features (`amtrain.prep.audio_features`: flux, rms_db, novelty, stability,
priority) of generated audio, against the held-out chunks' rows of the dataset's score tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.evaluate.stats import compare, histogram, summary

FEATURES = ("flux", "rms_db", "novelty", "stability", "priority")


def wave_chunk_features(wave: np.ndarray, sample_rate: int, hop: int, chunk_frames: int) -> dict[str, np.ndarray]:
    """wave (C, N) or (N,) -> per chunk of `chunk_frames` codec frames: the features prep-audio
    scores its chunks with (the same frame features, chunking and priority formula)."""
    from amtrain.prep.audio_features import FeatureParams, chunk_features, frame_features

    y = np.asarray(wave, np.float32)
    y = y.mean(axis=0) if y.ndim == 2 else y
    p = FeatureParams(sample_rate=sample_rate, codec_hop=hop)
    frames = -(-y.size // hop)
    bounds = [(a, min(a + chunk_frames, frames)) for a in range(0, frames, chunk_frames)]
    if not bounds:
        return {k: np.zeros(0) for k in FEATURES}
    feats = chunk_features(frame_features(y, p), p, bounds, 0)
    return {k: np.asarray(feats[k], np.float64) for k in FEATURES}


def heldout_chunk_features(dataset_folder: Path, scores_dir: str, split: str) -> dict[str, np.ndarray]:
    """The score tables' rows of `split` (all rows when no row is of it)."""
    from amtrain.data.priority import read_scores

    rows: dict[str, list[float]] = {k: [] for k in FEATURES}
    every: dict[str, list[float]] = {k: [] for k in FEATURES}
    for path in sorted((Path(dataset_folder) / scores_dir).glob("*.parquet")):
        t = read_scores(path).to_pydict()
        for i, s in enumerate(t["split"]):
            for k in FEATURES:
                every[k].append(float(t[k][i]))
                if s == split:
                    rows[k].append(float(t[k][i]))
    use = rows if rows["priority"] else every
    return {k: np.asarray(v, np.float64) for k, v in use.items()}


def compare_features(samples: dict[str, np.ndarray], heldout: dict[str, np.ndarray], bins: int = 12) -> dict:
    """Per feature: mean/std of each side and overlap, KL and EMD of their histograms over
    shared bins spanning both."""
    out = {}
    for k in FEATURES:
        a, b = samples.get(k, np.zeros(0)), heldout.get(k, np.zeros(0))
        both = np.concatenate([a, b])
        entry: dict[str, object] = {"samples": summary(a), "heldout": summary(b), "chunks": [int(a.size), int(b.size)]}
        if a.size and b.size:
            lo, hi = float(both.min()), float(both.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
            ha, hb = histogram(a, edges), histogram(b, edges)
            entry |= compare(ha, hb, (edges[:-1] + edges[1:]) / 2)
            entry |= {"edges": edges.tolist(), "samples_hist": ha.tolist(), "heldout_hist": hb.tolist()}
        out[k] = entry
    return out
