"""Symbolic-music statistics of a set of pieces, read as `amtrain.midi.events.Notes` (the notes a
listener hears, whatever the encoding: `Modality.notes`). Definitions (docs/evaluation.md):

  per piece (MusPy, Dong et al. 2020, `muspy.metrics`; drums excluded where pitch matters)
    pitch_range           highest minus lowest pitch, semitones (muspy.pitch_range)
    pitch_classes_used    distinct pitch classes (muspy.n_pitch_classes_used)
    pitch_class_entropy   entropy in bits of the normalised pitch-class histogram
                          (muspy.pitch_class_entropy; a C-major scale: log2 7)
    polyphony             mean number of pitches sounding at once over the 10 ms steps where at
                          least one sounds (muspy.polyphony)
    note_density          notes per second, first onset to last note end
    seconds               that span
  pooled over the set (mgeval, Yang & Lerch 2020: pitch-class histogram, note-length histogram,
  inter-onset intervals), each compared samples vs held-out (`stats.compare`)
    pitch_class           12 bins, C..B (no EMD: pitch classes are circular)
    pitch                 128 bins, EMD in semitones
    ioi                   gaps between successive distinct onsets, seconds (IOI_EDGES)
    duration              note lengths, seconds (DURATION_EDGES); notes never closed skipped
    velocity              16 bins of 8 (only for encodings with velocity)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amtrain.evaluate.stats import centres_of, entropy_bits, histogram
from amtrain.midi.events import Notes

RESOLUTION = 100  # Notes times are 10 ms bins
DRUMS = 128
SECONDS_EDGES = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0]
IOI_EDGES = [0.01] + SECONDS_EDGES[1:]  # a chord's notes share an onset: no IOI of 0
DURATION_EDGES = SECONDS_EDGES
VELOCITY_EDGES = list(range(0, 129, 8))
SCALARS = ("pitch_range", "pitch_classes_used", "pitch_class_entropy", "polyphony", "note_density", "seconds",
           "notes")


def _pitched(n: Notes) -> np.ndarray:
    return n.instr != DRUMS


def pitch_class_histogram(n: Notes) -> np.ndarray:
    return np.bincount(n.pitch[_pitched(n)] % 12, minlength=12)


def pitch_class_entropy(n: Notes) -> float:
    return entropy_bits(pitch_class_histogram(n))


def pitch_range(n: Notes) -> int:
    p = n.pitch[_pitched(n)]
    return int(p.max() - p.min()) if p.size else 0


def polyphony(n: Notes) -> float:
    """Mean pitches sounding over the 10 ms steps where any does (drums and notes never closed
    skipped; a note sounds over [onset, onset + max(dur, 1)))."""
    sel = _pitched(n) & (n.dur >= 0)
    start = n.time[sel]
    if not start.size:
        return 0.0
    end = start + np.maximum(n.dur[sel], 1)
    base = int(start.min())
    diff = np.zeros(int(end.max()) - base + 1, np.int64)
    np.add.at(diff, start - base, 1)
    np.add.at(diff, end - base, -1)
    on = np.cumsum(diff)[:-1]
    on = on[on > 0]
    return float(on.mean()) if on.size else 0.0


def span_seconds(n: Notes) -> float:
    if not len(n):
        return 0.0
    end = n.time + np.maximum(n.dur, 0)
    return float(end.max() - n.time.min()) / RESOLUTION


def note_density(n: Notes) -> float:
    s = span_seconds(n)
    return len(n) / s if s > 0 else 0.0


def iois(n: Notes) -> np.ndarray:
    """Seconds between successive distinct onsets."""
    onsets = np.unique(n.time)
    return np.diff(onsets) / RESOLUTION


def durations(n: Notes) -> np.ndarray:
    d = n.dur[(n.dur >= 0) & _pitched(n)]
    return d / RESOLUTION


def piece_scalars(n: Notes) -> dict[str, float]:
    return {"pitch_range": float(pitch_range(n)), "pitch_classes_used": float((pitch_class_histogram(n) > 0).sum()),
            "pitch_class_entropy": pitch_class_entropy(n), "polyphony": polyphony(n),
            "note_density": note_density(n), "seconds": span_seconds(n), "notes": float(len(n))}


def histograms(pieces: Sequence[Notes], velocity: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Pooled histograms of a set: name -> (counts, bin centres for EMD or None)."""
    cat = (lambda f: np.concatenate([f(p) for p in pieces])) if pieces else (lambda f: np.zeros(0))
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "pitch_class": (sum((pitch_class_histogram(p) for p in pieces), np.zeros(12, np.int64)), None),
        "pitch": (np.bincount(cat(lambda p: p.pitch[_pitched(p)]).astype(np.int64), minlength=128)[:128],
                  np.arange(128.0)),
        "ioi": (histogram(cat(iois), IOI_EDGES), centres_of(IOI_EDGES)),
        "duration": (histogram(cat(durations), DURATION_EDGES), centres_of(DURATION_EDGES)),
    }
    if velocity:
        out["velocity"] = (histogram(cat(lambda p: p.velocity), VELOCITY_EDGES), centres_of(VELOCITY_EDGES))
    return out


HIST_EDGES = {"ioi": IOI_EDGES, "duration": DURATION_EDGES, "velocity": VELOCITY_EDGES}
