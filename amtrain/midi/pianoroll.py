"""Piano-roll PNGs of a token sequence or a MIDI file (matplotlib, Agg backend).

x = seconds, y = MIDI pitch; one colour per instrument, named in the legend by its General
MIDI program ("Acoustic Grand Piano"); drums (channel 10) are drawn as x marks at their key
number, not bars. For token ids, anticipated controls are drawn with a black outline and piece
boundaries (SEPARATOR) as dashed vertical lines. For a rollout, `generated` marks the notes
the model wrote: they are hatched, and a red line stands where the prompt ends and generated
music begins (the first generated onset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.fileio import atomic_target
from amtrain.midi.decode import ids_to_notes
from amtrain.midi.events import Notes, read_notes
from amtrain.midi.gm import instrument_name
from amtrain.tokens.midi import DRUMS, TIME_RESOLUTION


def plot_notes(notes: Notes, out: str | Path, title: str = "", controls: np.ndarray | None = None,
               boundaries: list[float] | None = None, generated: np.ndarray | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    cmap = plt.get_cmap("tab20")
    instrs = list(dict.fromkeys(notes.instr.tolist()))
    for c, instr in enumerate(instrs):
        sel = notes.instr == instr
        x0 = notes.time[sel] / TIME_RESOLUTION
        w = np.maximum(notes.dur[sel], 1) / TIME_RESOLUTION
        y = notes.pitch[sel]
        if instr == DRUMS:
            ax.scatter(x0, y, marker="x", s=14, color="black", linewidths=0.8, label=instrument_name(instr), zorder=3)
            continue
        ax.barh(y, w, left=x0, height=0.8, color=cmap(c % 20), label=instrument_name(instr))
        if controls is not None and controls[sel].any():
            m = controls[sel]
            ax.barh(y[m], w[m], left=x0[m], height=0.8, fill=False, edgecolor="black", linewidth=0.6)
        if generated is not None and generated[sel].any():
            m = generated[sel]
            ax.barh(y[m], w[m], left=x0[m], height=0.8, fill=False, hatch="////", edgecolor="white", linewidth=0)
    for b in boundaries or []:
        ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
    if generated is not None and generated.any():
        start = notes.time[generated].min() / TIME_RESOLUTION
        ax.axvline(start, color="red", linewidth=1.2, label=f"generated from {start:.2f} s (hatched)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title or out.stem)
    if len(notes):
        ax.set_ylim(notes.pitch.min() - 2, notes.pitch.max() + 2)
    if instrs:
        ax.legend(loc="upper right", fontsize=7, ncol=max(1, len(instrs) // 8))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def plot_ids(ids, out: str | Path, title: str = ""):
    """-> (PNG path, DecodeReport)."""
    notes, rep = ids_to_notes(ids)
    bounds = [b / TIME_RESOLUTION for b in rep.boundaries]
    return plot_notes(notes, out, title, rep.is_control, bounds), rep


def plot_midi(path: str | Path, out: str | Path) -> Path:
    return plot_notes(read_notes(path), out, title=Path(path).name)
