"""MIDI notes <-> nvd event values (`amtrain.tokens.nvd`), and nano-GPT-v3's augmentations.

`notes_to_values` is the encoding side: drums (channel 10) are left out (nvd has no instrument
tokens; every other instrument is merged into one part), onsets and durations are rounded to the
grid, leading silence is trimmed (the first onset becomes 0), notes are ordered by onset then
pitch, and each becomes (time since the previous onset, pitch, velocity, duration). Unclosed
notes (no note-off) last 250 ms, as in AMT. `values_to_notes` inverts it on the grid: onsets and
durations in the MIDI reader's 10 ms bins, instrument 0 (piano), the velocity kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amtrain.midi.events import Notes
from amtrain.tokens.midi import DRUMS, TIME_RESOLUTION
from amtrain.tokens.nvd import EVENT_SIZE, max_steps

BIN_MS = 1000 // TIME_RESOLUTION  # the reader's 10 ms bins
UNCLOSED = TIME_RESOLUTION // 4  # 250 ms


@dataclass
class EncodeStats:
    num_drums: int = 0  # drum notes left out
    num_capped: int = 0  # silences or durations longer than MAX_SECONDS, shortened


def check_grid(grid_ms: int) -> None:
    if grid_ms < BIN_MS or grid_ms % BIN_MS:
        raise ValueError(f"grid {grid_ms} ms: give a multiple of {BIN_MS} ms")


def notes_to_values(notes: Notes, grid_ms: int = 10, stats: EncodeStats | None = None) -> np.ndarray:
    """Notes -> event values (N, 4): (sep, pitch, velocity, duration), times in grid steps."""
    check_grid(grid_ms)
    stats = stats if stats is not None else EncodeStats()
    keep = notes.instr != DRUMS
    stats.num_drums += int(np.count_nonzero(~keep))
    f = grid_ms // BIN_MS
    t = notes.time[keep]
    d = np.where(notes.dur[keep] < 0, UNCLOSED, notes.dur[keep])
    t = np.round(t / f).astype(np.int64)  # half to even, like the reader
    d = np.round(d / f).astype(np.int64)
    p, v = notes.pitch[keep], np.clip(notes.velocity[keep], 1, 127)
    order = np.lexsort((d, p, t))
    t, d, p, v = t[order], d[order], p[order], v[order]
    sep = np.diff(t, prepend=t[:1]) if len(t) else t
    cap = max_steps(grid_ms)
    stats.num_capped += int(np.count_nonzero(sep > cap) + np.count_nonzero(d > cap))
    return np.stack([np.minimum(sep, cap), p, v, np.minimum(d, cap)], 1).astype(np.int64).reshape(-1, EVENT_SIZE)


def values_to_notes(events: np.ndarray, grid_ms: int = 10) -> Notes:
    """Decoded events (N, 4) = (onset steps, pitch, velocity, duration steps), as
    `NvdTokenizer.decode_values` gives -> notes in 10 ms bins, instrument 0, sorted by onset."""
    e = np.asarray(events, np.int64).reshape(-1, EVENT_SIZE)
    f = grid_ms // BIN_MS
    order = np.argsort(e[:, 0], kind="stable")
    e = e[order]
    return Notes(e[:, 0] * f, e[:, 3] * f, e[:, 1], np.zeros(len(e), np.int64), np.clip(e[:, 2], 1, 127))


def onsets(values: np.ndarray) -> np.ndarray:
    """Absolute onsets (steps) of event values (N, 4)."""
    return np.cumsum(values[:, 0])


def transpose(values: np.ndarray, semitones: int) -> np.ndarray:
    """Shift every pitch; notes leaving 0..127 are dropped and the next note's separator takes
    their time, so every other onset stays."""
    t = onsets(values)
    p = values[:, 1] + semitones
    keep = (p >= 0) & (p < 128)
    out = values[keep].copy()
    out[:, 1] = p[keep]
    tk = t[keep]
    out[:, 0] = np.diff(tk, prepend=tk[:1]) if len(tk) else tk
    return out


def shift_velocity(values: np.ndarray, delta: int) -> np.ndarray:
    """Add `delta` to every velocity, clipped to 1..127."""
    out = values.copy()
    out[:, 2] = np.clip(out[:, 2] + delta, 1, 127)
    return out


def variants(transposes: tuple[int, ...], velocity_shifts: tuple[int, ...]) -> list[tuple[int, int]]:
    """nano-GPT-v3's augmentations: pitch shifts, velocity changes and both combined, i.e.
    every (semitones, velocity delta) pair but the identity."""
    pairs = {(s, v) for s in set(transposes) | {0} for v in set(velocity_shifts) | {0}}
    return sorted(pairs - {(0, 0)})


def augment(values: np.ndarray, semitones: int, delta: int) -> np.ndarray:
    out = transpose(values, semitones) if semitones else values
    return shift_velocity(out, delta) if delta else out


def chunks(values: np.ndarray, max_events: int) -> list[np.ndarray]:
    """A piece's events cut into documents of at most `max_events`, each re-based so its first
    separator is 0 (a document never opens with silence)."""
    out = []
    for a in range(0, len(values), max(1, max_events)):
        c = values[a:a + max_events].copy()
        c[0, 0] = 0
        out.append(c)
    return out
