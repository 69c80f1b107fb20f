"""The statistics of a set of sequences (generated samples, or held-out excerpts), read through
the modality (`Modality.units`, `notes`, `codes`, `grammar`), and their comparison.

`set_stats(modality, tokenizer, ids_list)` -> SetStats: per-sequence values (`per_item`), pooled
histograms (`hists`: name -> (counts, bin centres or None)) and set-level values (`pooled`).
`flat(stats)` is the cheap one-line form rollouts during training log; `compare_sets(samples,
heldout)` is what `amtrain evaluate` writes. Definitions: `amtrain.evaluate.stats`,
`amtrain.evaluate.music`, docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from amtrain.evaluate import music
from amtrain.evaluate.stats import (
    centres_of,
    compare,
    distinct_n,
    entropy_bits,
    histogram,
    overlap,
    repetition_share,
    summary,
)

REP_N = 4  # seq-rep-4 (Welleck et al. 2019)
DISTINCT_N = (1, 2)  # distinct-1, distinct-2 (Li et al. 2016)
WORD_EDGES = list(range(1, 22))


@dataclass
class SetStats:
    units: str
    per_item: dict[str, list[float]] = field(default_factory=dict)
    hists: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.per_item.get("tokens", []))


def set_stats(modality, tokenizer, ids_list: Sequence[np.ndarray], validity: bool = True) -> SetStats:
    units_name = "tokens"
    per: dict[str, list[float]] = {"tokens": [], f"token_rep_{REP_N}": [], "units": [], f"rep_{REP_N}": []}
    if validity:
        per["invalid_share"] = []
    unit_seqs, token_seqs, pieces, code_grids = [], [], [], []
    for ids in ids_list:
        ids = np.asarray(ids, np.int64)
        units_name, units = modality.units(tokenizer, ids)
        per["tokens"].append(float(ids.size))
        per[f"token_rep_{REP_N}"].append(repetition_share(ids.tolist(), REP_N))
        per["units"].append(float(len(units)))
        per[f"rep_{REP_N}"].append(repetition_share(units, REP_N))
        if validity:
            per["invalid_share"].append(float(modality.invalid_ids(tokenizer, ids).mean()) if ids.size else 0.0)
        unit_seqs.append(units)
        token_seqs.append(ids.tolist())
        notes = modality.notes(tokenizer, ids)
        if notes is not None:
            pieces.append(notes)
            for k, v in music.piece_scalars(notes).items():
                per.setdefault(k, []).append(v)
        grid = modality.codes(tokenizer, ids)
        if grid is not None:
            code_grids.append(grid)
    out = SetStats(units_name, per)
    for n in DISTINCT_N:
        out.pooled[f"distinct_{n}"] = distinct_n(unit_seqs, n)
        out.pooled[f"token_distinct_{n}"] = distinct_n(token_seqs, n)
    words = [u for seq in unit_seqs for u in seq if isinstance(u, str)]
    if words:  # text: how long the words are (characters, 1..20+)
        out.hists["word_length"] = (histogram([len(w) for w in words], WORD_EDGES), centres_of(WORD_EDGES))
    if pieces:
        out.hists.update(music.histograms(pieces, modality.has_velocity))
        out.pooled["pitch_class_entropy_pooled"] = entropy_bits(out.hists["pitch_class"][0])
    if code_grids:
        size = int(tokenizer.codebook_size)
        grid = np.concatenate(code_grids, axis=1)
        for level in range(grid.shape[0]):
            counts = np.bincount(np.clip(grid[level], 0, size - 1), minlength=size)
            out.hists[f"codebook_{level}"] = (counts, None)
            out.pooled[f"codebook_{level}_used"] = float((counts > 0).sum()) / size
            out.pooled[f"codebook_{level}_perplexity"] = float(2 ** entropy_bits(counts))
    return out


def flat(stats: SetStats) -> dict[str, float]:
    """Means of the per-item values and the pooled values, one float each (metrics.jsonl,
    TensorBoard, results.csv); nan-free (a statistic with no value is left out)."""
    out = {k: summary(v)["mean"] for k, v in stats.per_item.items()}
    out |= stats.pooled
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}


def _value_overlap(va: Sequence[float], vb: Sequence[float], bins: int = 10) -> float:
    """Overlap of the histograms of two sets of per-item values over shared bins."""
    a, b = np.asarray(va, np.float64), np.asarray(vb, np.float64)
    if not a.size or not b.size:
        return 0.0
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    return overlap(histogram(a, edges), histogram(b, edges))


def compare_sets(samples: SetStats, heldout: SetStats) -> dict:
    """{"per_item": {name: {samples, heldout: mean/std, overlap}}, "pooled": {name: {samples,
    heldout}}, "histograms": {name: {overlap, kl_bits[, emd], samples, heldout}}}."""
    per = {}
    for k, v in samples.per_item.items():
        h = heldout.per_item.get(k, [])
        per[k] = {"samples": summary(v), "heldout": summary(h), "overlap": _value_overlap(v, h)}
    pooled = {k: {"samples": v, "heldout": heldout.pooled.get(k)} for k, v in samples.pooled.items()}
    hists = {}
    for k, (counts, centres) in samples.hists.items():
        if k not in heldout.hists:
            continue
        ref = heldout.hists[k][0]
        hists[k] = compare(counts, ref, centres) | {"samples": counts.tolist(), "heldout": ref.tolist()}
        if centres is not None:
            hists[k]["centres"] = np.asarray(centres).tolist()
    return {"units": samples.units, "per_item": per, "pooled": pooled, "histograms": hists}
