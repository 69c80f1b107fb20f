"""Token ids -> notes -> MIDI file, robust to any id sequence a model can emit.

The reading follows AMT's `events_to_compound` (convert.py): flags are skipped, REST events
dropped, controls (the anticipated block) become notes like events, and at each SEPARATOR
triple the following piece is moved after the end of the previous one (AMT: "add max time from
previous track for synthesis"). Where AMT asserts, this decoder counts and goes on:

- an id outside [0, 55028), or one that cannot start a triple here (a DUR or NOTE id out of
  place, a lone SEPARATOR) is *invalid*: skipped, one id;
- a time id whose next two ids are not a duration and a note of the same block is a
  *malformed* triple: the time id is skipped and reading resynchronises on the next id.

Times past the TIME block: AMT's `generate`, and amtrain's rollouts (`.npy`), write a piece
longer than 100 s as the flag and triples of absolute times, whose time ids run on past the
block (into the DUR, NOTE, control ids and beyond the vocabulary); AMT reads them by position
(`tokens[0::3]`). So does this decoder where a triple is due - at the start, after a flag, a
separator or a well-formed triple: there any id >= the block's start followed by a duration and
a note of one block is that block's triple at that time. Elsewhere only in-block times count.

MIDI is written with symusic at 50 ticks per quarter and 120 bpm, so one tick is one 10 ms bin
(as AMT's compound_to_midi), one track per instrument in order of first appearance, drums on
channel 10. Velocity is AMT's default 72 (events carry none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amtrain.midi.events import Notes
from amtrain.tokens.midi import (
    ANTICIPATE,
    AUTOREGRESS,
    CONTROL_OFFSET,
    DRUMS,
    DUR_OFFSET,
    MAX_DUR,
    MAX_NOTE,
    MAX_PITCH,
    MAX_TIME,
    NOTE_OFFSET,
    REST,
    SEPARATOR,
    TIME_RESOLUTION,
)

TICKS_PER_QUARTER = TIME_RESOLUTION // 2  # 120 bpm: 2 quarters a second -> 1 tick = 10 ms
DEFAULT_VELOCITY = 72


@dataclass
class DecodeReport:
    num_ids: int = 0
    num_notes: int = 0  # events and controls written as notes
    num_controls: int = 0
    num_rests: int = 0
    num_separators: int = 0
    num_flags: int = 0
    num_invalid: int = 0  # ids skipped one by one
    num_malformed: int = 0  # time ids whose triple was broken
    is_control: np.ndarray | None = None  # (num_notes,) bool, aligned with the returned notes
    boundaries: list[int] = field(default_factory=list)  # bins where each later piece starts

    def summary(self) -> str:
        return (f"{self.num_ids} ids -> {self.num_notes} notes ({self.num_controls} from controls), "
                f"{self.num_rests} rests, {self.num_separators} separators, {self.num_flags} flags; "
                f"{self.num_invalid} invalid ids and {self.num_malformed} malformed triples skipped")


def _triple_block(t: int, d: int, n: int, due: bool = False) -> int | None:
    """Base offset (0 events, CONTROL_OFFSET controls) if (t, d, n) is a valid triple; where a
    triple is `due`, a time past its block (an absolute time > 100 s) is valid too."""
    for base in (0, CONTROL_OFFSET):
        if (base <= t and (due or t < base + MAX_TIME) and base + DUR_OFFSET <= d < base + DUR_OFFSET + MAX_DUR
                and (base + NOTE_OFFSET <= n < base + NOTE_OFFSET + MAX_NOTE or (base == 0 and n == REST))):
            return base
    return None


def ids_to_notes(ids) -> tuple[Notes, DecodeReport]:
    """Any ids -> notes in absolute 10 ms bins (sorted by onset) and what was skipped."""
    ids = [int(x) for x in np.asarray(ids).ravel()]
    rep = DecodeReport(num_ids=len(ids))
    rows: list[tuple[int, int, int, int, int]] = []  # time, duration, pitch, instrument, is control
    offset = track_max = 0
    i, due = 0, True  # due: a triple may start here (absolute times allowed)
    while i < len(ids):
        x = ids[i]
        if x == SEPARATOR and ids[i + 1:i + 3] == [SEPARATOR, SEPARATOR]:
            rep.num_separators += 1
            offset += track_max
            track_max = 0
            rep.boundaries.append(offset)
            i, due = i + 3, True
            continue
        base = _triple_block(ids[i], ids[i + 1], ids[i + 2], due=due) if i + 3 <= len(ids) else None
        if base is None:
            if x in (AUTOREGRESS, ANTICIPATE):
                rep.num_flags += 1
                due = True
            elif 0 <= x < MAX_TIME or CONTROL_OFFSET <= x < CONTROL_OFFSET + MAX_TIME:
                rep.num_malformed += 1
                due = False
            else:
                rep.num_invalid += 1
                due = False
            i += 1
            continue
        t, d, n = ids[i] - base, ids[i + 1] - base - DUR_OFFSET, ids[i + 2] - base
        i, due = i + 3, True
        if n == REST:
            rep.num_rests += 1
            continue
        rep.num_controls += base > 0
        track_max = max(track_max, t + d)
        instr, pitch = divmod(n - NOTE_OFFSET, MAX_PITCH)
        rows.append((t + offset, d, pitch, instr, int(base > 0)))
    rep.num_notes = len(rows)
    a = np.array(rows, np.int64).reshape(-1, 5)
    order = np.argsort(a[:, 0], kind="stable")
    a = a[order]
    rep.is_control = a[:, 4].astype(bool)
    notes = Notes(a[:, 0], a[:, 1], a[:, 2], a[:, 3], np.full(len(a), DEFAULT_VELOCITY, np.int64))
    return notes, rep


def events_to_notes(events: np.ndarray) -> Notes:
    """A piece's event array (N, 3) with unbounded times (as `notes_to_events` makes: no 100 s
    limit, unlike ids inside a sequence) -> notes; REST events dropped, controls kept."""
    ev = np.asarray(events, np.int64).reshape(-1, 3)
    ev = ev[ev[:, 2] != REST]
    ev = ev - np.where(ev[:, 2:] >= CONTROL_OFFSET, CONTROL_OFFSET, 0)  # controls -> events
    instr, pitch = np.divmod(ev[:, 2] - NOTE_OFFSET, MAX_PITCH)
    order = np.argsort(ev[:, 0], kind="stable")
    return Notes(ev[order, 0], ev[order, 1] - DUR_OFFSET, pitch[order], instr[order],
                 np.full(len(ev), DEFAULT_VELOCITY, np.int64))


def _voices(time: np.ndarray, dur: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Voice of each note (sorted by onset, then duration) such that a reader pairing note-off
    with the *oldest* open note of its (channel, pitch) — mido, AMT — gets every duration back:
    inside a voice, notes of one pitch end in the order they start, and a zero-length note
    shares its onset with no other. Doubled parts in the source need a few voices."""
    voice = np.zeros(len(time), np.int64)
    last: dict[int, list[tuple[int, int, int]]] = {}  # pitch -> per voice (start, end, dur) of its last note
    for j, (t, d, p) in enumerate(zip(time.tolist(), dur.tolist(), pitch.tolist(), strict=True)):
        slots = last.setdefault(p, [])
        v = next((v for v, (s, e, pd) in enumerate(slots) if e <= t + d and (pd > 0 or s < t)), len(slots))
        if v == len(slots):
            slots.append((t, t + d, d))
        slots[v] = (t, t + d, d)
        voice[j] = v
    return voice


def notes_to_score(notes: Notes):
    """Notes (10 ms bins) -> a symusic Score, 1 tick = 10 ms: one track per instrument (more for
    an instrument whose same-pitch notes overlap, see `_voices`), drums on channel 10."""
    import symusic

    score = symusic.Score(TICKS_PER_QUARTER)
    score.tempos.append(symusic.Tempo(0, qpm=120.0))
    _, first = np.unique(notes.instr, return_index=True)
    for instr in notes.instr[np.sort(first)].tolist():
        sel = np.flatnonzero(notes.instr == instr)
        dur = np.where(notes.dur[sel] < 0, TIME_RESOLUTION // 4, notes.dur[sel])
        order = np.lexsort((dur, notes.time[sel]))
        sel, dur = sel[order], dur[order]
        voice = _voices(notes.time[sel], dur, notes.pitch[sel])
        for v in range(int(voice.max()) + 1):
            mine = voice == v
            track = symusic.Track(name="drums" if instr == DRUMS else f"program {instr}",
                                  program=0 if instr == DRUMS else int(instr), is_drum=instr == DRUMS)
            track.notes = symusic.Note.from_numpy(
                time=notes.time[sel][mine].astype(np.int32), duration=dur[mine].astype(np.int32),
                pitch=notes.pitch[sel][mine].astype(np.int8),
                velocity=np.clip(notes.velocity[sel][mine], 1, 127).astype(np.int8))
            score.tracks.append(track)
    return score


def write_midi(notes: Notes, path: str | Path) -> None:
    """Write atomically (temp file + rename)."""
    from amtrain.fileio import write_bytes_atomic

    write_bytes_atomic(Path(path), notes_to_score(notes).dumps_midi())


def ids_to_midi(ids, path: str | Path) -> DecodeReport:
    notes, rep = ids_to_notes(ids)
    write_midi(notes, path)
    return rep


def read_token_file(path: str | Path, line: int = 0) -> list[np.ndarray]:
    """Token sequences from a .npy array or a text file of space-separated ids, one sequence a
    line (AMT's format): line `line` (1-based) alone, or every line for 0. A line that is not
    integers raises a UserError naming it."""
    from amtrain.errors import UserError

    path = Path(path)
    if path.suffix == ".npy":
        return [np.load(path).ravel()]
    lines = [(num, text) for num, text in enumerate(path.read_text().splitlines(), 1) if text.strip()]
    if line:
        if not 1 <= line <= len(lines):
            raise UserError(f"--line {line}: {path} has {len(lines)} sequences (1..{len(lines)}, or 0 for all)")
        lines = [lines[line - 1]]
    seqs = []
    for num, text in lines:
        try:
            seqs.append(np.array([int(w) for w in text.split()], np.int64))
        except ValueError:
            raise UserError(f"{path}:{num}: not a line of integer ids; token files hold space-separated ids") from None
    return seqs
