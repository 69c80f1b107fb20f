"""Plots of a scaling study (PNG): validation loss against parameters with the fitted laws,
every run's training curve, and a rollout statistic against parameters beside the loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from amtrain.scaling.fit import FitResult, format_law


def arch_colors(rows: list[dict]) -> dict[str, str]:
    """One matplotlib cycle colour per architecture of the study, in sorted order."""
    return {arch: f"C{i}" for i, arch in enumerate(sorted({r["arch"] for r in rows}))}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_params(rows: list[dict], fits: dict[str, FitResult], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, color in arch_colors(rows).items():
        sub = [r for r in rows if r["arch"] == arch]
        n = np.array([r["non_embedding_params"] for r in sub], float)
        loss = np.array([r["val_loss"] for r in sub])
        ax.scatter(n, loss, color=color, zorder=3, label=f"{arch} runs")
        if arch in fits:
            f = fits[arch]
            grid = np.logspace(np.log10(n.min()) - 0.3, np.log10(n.max()) + 0.3, 100)
            lo, hi = f.alpha_ci
            ci = "no CI: 3 sizes" if lo != lo else f"α 90% CI [{lo:.3f}, {hi:.3f}]"
            ax.plot(grid, f.law(grid), color=color, label=f"{arch}: {format_law(f.law)}  ({ci})")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Scaling: validation loss against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def read_curve(run_dir: Path, kind: str = "train", key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(tokens seen, value) of one run's metrics.jsonl records of a kind."""
    xs, ys = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return np.zeros(0), np.zeros(0)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == kind and key in rec:
            xs.append(rec.get("tokens_seen", rec["step"]))
            ys.append(rec[key])
    return np.array(xs, float), np.array(ys, float)


def plot_training_curves(rows: list[dict], study_dir: Path, out: Path) -> Path:
    """Every run's training loss against tokens seen; run_dir is relative to `study_dir`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    colors = arch_colors(rows)
    sizes = sorted({r["size"] for r in rows}, key=lambda s: min(r["non_embedding_params"] for r in rows if r["size"] == s))
    for r in rows:
        x, y = read_curve(study_dir / r["run_dir"])
        if x.size:
            ax.plot(x, y, color=colors[r["arch"]], linestyle=styles[sizes.index(r["size"]) % len(styles)],
                    label=f"{r['arch']} {r['size']} ({r['non_embedding_params'] / 1e6:.2f}M)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_stat_vs_params(rows: list[dict], column: str, out: Path, reference: float | None = None) -> Path:
    """Two panels over non-embedding parameters: validation loss, and `column` (a rollout_*
    statistic of results.csv; runs without it are left out), with `reference` (the held-out
    data's value, from `amtrain evaluate`) as a dashed line."""
    plt = _plt()
    fig, (ax_loss, ax_stat) = plt.subplots(1, 2, figsize=(11, 4.2))
    name = column.removeprefix("rollout_")
    for arch, color in arch_colors(rows).items():
        sub = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["non_embedding_params"])
        n = np.array([r["non_embedding_params"] for r in sub], float)
        ax_loss.plot(n, [r["val_loss"] for r in sub], "o-", color=color, label=arch)
        have = [r for r in sub if r.get(column) is not None]
        ax_stat.plot([r["non_embedding_params"] for r in have], [r[column] for r in have], "o-", color=color,
                     label=arch)
        for r in have:
            ax_stat.annotate(r["size"], (r["non_embedding_params"], r[column]), fontsize=7,
                             textcoords="offset points", xytext=(3, 3))
    if reference is not None:
        ax_stat.axhline(reference, color="grey", linestyle="--", label=f"held-out music: {reference:.3g}")
    for ax, label in ((ax_loss, "validation loss (nats/token)"), (ax_stat, f"{name} (last rollout)")):
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_loss.set_title("loss against model size")
    ax_stat.set_title(f"{name} of generated samples against model size")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
