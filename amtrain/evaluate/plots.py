"""The PNGs of `amtrain evaluate`: histograms of samples against held-out data (each panel
titled with its overlap), codebook usage, and the per-sample statistics side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.fileio import atomic_target

PITCH_CLASSES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _plt().close(fig)
    return out


def _norm(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / v.sum() if v.sum() > 0 else v


def _bars(ax, labels, a, b, title):
    x = np.arange(len(a))
    ax.bar(x - 0.2, _norm(a), width=0.4, label="samples")
    ax.bar(x + 0.2, _norm(b), width=0.4, label="held-out", alpha=0.7)
    step = max(1, len(labels) // 12)
    ax.set_xticks(x[::step], [str(lab) for lab in labels][::step], fontsize=7, rotation=45)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("share")


def plot_histograms(comparison: dict, audio: dict | None, out: Path) -> Path | None:
    """One panel per compared histogram (symbolic music, audio chunk features; codebooks as
    rank-frequency curves). None when there is nothing to draw."""
    panels = []
    for name, h in comparison.get("histograms", {}).items():
        panels.append(("hist", name, h))
    for name, h in (audio or {}).items():
        if "edges" in h:
            panels.append(("feature", name, h))
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (kind, name, h) in zip(axes.ravel(), panels, strict=False):
        if kind == "feature":
            edges = np.asarray(h["edges"])
            _bars(ax, [f"{e:.2g}" for e in edges[:-1]], h["samples_hist"], h["heldout_hist"],
                  f"chunk {name}: overlap {h['overlap']:.2f}, EMD {h['emd']:.3g}")
        elif name.startswith("codebook_"):
            a, b = np.sort(_norm(h["samples"]))[::-1], np.sort(_norm(h["heldout"]))[::-1]
            ax.semilogy(np.arange(1, a.size + 1), np.maximum(a, 1e-6), label="samples")
            ax.semilogy(np.arange(1, b.size + 1), np.maximum(b, 1e-6), label="held-out")
            ax.set_xscale("log")
            ax.set_xlabel("code rank")
            ax.set_title(f"{name} usage (rank-frequency): overlap {h['overlap']:.2f}", fontsize=9)
        else:
            labels = (PITCH_CLASSES if name == "pitch_class" else
                      [f"{c:.2g}" for c in h["centres"]] if "centres" in h else list(range(len(h["samples"]))))
            a, b = h["samples"], h["heldout"]
            if name == "pitch":  # only the range either side uses
                used = np.flatnonzero(np.asarray(a) + np.asarray(b))
                lo, hi = (used.min(), used.max() + 1) if used.size else (0, 128)
                a, b, labels = a[lo:hi], b[lo:hi], list(range(lo, hi))
            emd = f", EMD {h['emd']:.3g}" if "emd" in h and h["emd"] == h["emd"] else ""
            _bars(ax, labels, a, b, f"{name}: overlap {h['overlap']:.2f}, KL {h['kl_bits']:.2f} bits{emd}")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def plot_per_item(comparison: dict, out: Path) -> Path:
    """Mean ± std of each per-sample statistic, samples beside held-out, each panel with its own
    scale."""
    per = comparison["per_item"]
    names = list(per)
    plt = _plt()
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        s, h = per[name]["samples"], per[name]["heldout"]
        ax.bar([0, 1], [s["mean"], h["mean"]], yerr=[s["std"], h["std"]], color=["C0", "C1"], capsize=3)
        ax.set_xticks([0, 1], ["samples", "held-out"], fontsize=7)
        ax.set_title(f"{name} (overlap {per[name]['overlap']:.2f})", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)
