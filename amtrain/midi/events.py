"""MIDI files -> notes -> AMT event arrays, exactly as AMT's mido-based `midi_to_compound` does.

AMT (jthickstun/anticipation, `convert.py` `midi_to_compound`) reads a file with mido, walks
the merged tracks in playback order and builds one row per note:
(onset bin, duration bin, pitch, instrument, velocity). Matching it id for id needs mido's
message-level semantics, which a note-level parser such as symusic does not keep (checked on
the files in data/midi: symusic pairs note-on/off per track, drops program-change positions
and zero-length notes, and orders same-tick notes differently, so 4 of 8 files differ). So the
Standard MIDI File is scanned here by a small compiled (numba) reader that keeps every message,
and the rest is numpy. What it reproduces (mido 1.3.3 `midifiles.py`, `tracks.py`):

- chunks: MThd then `num_tracks` MTrk chunks; running status (meta events do not set it;
  sysex and system messages do); message lengths from mido's status table; data bytes > 127,
  undefined status bytes, missing MTrk, short meta payloads and invalid key signatures are
  errors, as in mido;
- merge: messages sorted by absolute tick, stable in (track, position) order; end_of_track
  messages removed;
- seconds: each message with a positive delta moves the clock by
  `delta * (tempo * 1e-6 / ticks_per_beat)`, summed left to right in float64; a set_tempo takes
  effect after its own message;
- notes (AMT): program_change sets the channel's instrument (channel 10 = drums = 128);
  note_on with velocity > 0 opens a note at `round(100 * t)` (half to even) with duration -1;
  note_off / note_on 0 closes the oldest open note with the same (instrument, pitch, channel)
  with `round(100 * (t - t_on))`; unmatched offsets are ignored.

`notes_to_events` then gives AMT's (time, dur, note) ids: durations capped at MAX_DUR-1,
unclosed notes (-1) set to 250 ms, as `compound_to_events` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from amtrain.tokens.midi import (
    DRUMS,
    DUR_OFFSET,
    MAX_DUR,
    MAX_PITCH,
    NOTE_OFFSET,
    TIME_OFFSET,
    TIME_RESOLUTION,
)

DEFAULT_TEMPO = 500000  # microseconds per quarter note (120 bpm), mido's DEFAULT_TEMPO
MAX_MESSAGE_LENGTH = 1000000  # mido's limit on one message's payload
MAX_SECONDS = 1e7  # beyond ~115 days a file's clock is corrupt, not music

# message kinds kept by the scanner
K_OTHER, K_NOTE_ON, K_NOTE_OFF, K_PROGRAM, K_TEMPO = 0, 1, 2, 3, 4

_ERRORS = {
    1: "truncated (ends inside a chunk or message)",
    2: "no MTrk header where a track should start",
    3: "running status without a previous status byte",
    4: "undefined status byte",
    5: "data byte above 127",
    6: "message longer than 1,000,000 bytes",
    7: "variable-length number longer than 4 bytes (absurd tick value)",
    8: "meta message too short for its type",
    9: "invalid key signature",
    10: "absolute tick beyond 2^53 (absurd tick value)",
    11: "running status after a message that has no data bytes",
}

# bytes in a channel/system message including the status byte; 0 = undefined (mido's SPEC_BY_STATUS)
_LENGTH = np.zeros(256, np.int64)
for _s in range(0x80, 0xF0):
    _LENGTH[_s] = 2 if 0xC0 <= _s < 0xE0 else 3
for _s, _n in ((0xF1, 2), (0xF2, 3), (0xF3, 2), (0xF6, 1), (0xF8, 1), (0xFA, 1), (0xFB, 1),
               (0xFC, 1), (0xFE, 1), (0xFF, 1)):
    _LENGTH[_s] = _n
# minimum payload mido's meta decoders index into (others decode any length)
_META_MIN = np.zeros(256, np.int64)
for _t, _n in ((0x20, 1), (0x21, 1), (0x51, 3), (0x54, 5), (0x58, 4), (0x59, 2)):
    _META_MIN[_t] = _n


class MidiReadError(ValueError):
    """A file that is not a usable MIDI file; the message says why."""


@dataclass
class Notes:
    """A piece's notes in AMT's compound form, one row per note in onset order."""

    time: np.ndarray  # (N,) int64 onset, 10 ms bins
    dur: np.ndarray  # (N,) int64 duration, 10 ms bins; -1 = never closed
    pitch: np.ndarray  # (N,) int64 0..127
    instr: np.ndarray  # (N,) int64 0..128 (128 = drums)
    velocity: np.ndarray  # (N,) int64 1..127

    def __len__(self) -> int:
        return int(self.time.size)

    def to_compound(self) -> list[int]:
        """AMT's flat compound list (time, dur, pitch, instr, velocity) * N."""
        return np.stack([self.time, self.dur, self.pitch, self.instr, self.velocity], 1).ravel().tolist()


@numba.njit(cache=True)
def _vlq(buf, pos):
    """-> (value, new pos, error code) for a variable-length quantity."""
    value = 0
    for k in range(5):
        if pos >= buf.size:
            return 0, pos, 1
        b = buf[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos, 0
        if k == 3:
            return 0, pos, 7
    return 0, pos, 7


@numba.njit(cache=True)
def _u32(buf, pos):
    return (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]


@numba.njit(cache=True)
def _scan(buf, length, meta_min):
    """Every message of every track: (err, err_pos, format, tpb, tick, kind, chan, d1, d2, n).
    d1/d2: note and velocity, or program, or tempo (d1) for set_tempo."""
    cap = buf.size // 2 + 1
    tick = np.empty(cap, np.int64)
    kind = np.empty(cap, np.int8)
    chan = np.empty(cap, np.int8)
    d1 = np.empty(cap, np.int64)
    d2 = np.empty(cap, np.int64)
    n = 0
    if buf.size < 14:
        return 1, 0, 0, 0, tick, kind, chan, d1, d2, 0
    hsize = _u32(buf, 4)
    if hsize < 6 or 8 + hsize > buf.size:
        return 1, 4, 0, 0, tick, kind, chan, d1, d2, 0
    fmt = (buf[8] << 8) | buf[9]
    ntracks = (buf[10] << 8) | buf[11]
    tpb = (buf[12] << 8) | buf[13]
    if tpb >= 0x8000:
        tpb -= 0x10000  # signed, as mido's struct '>h'
    pos = 8 + hsize
    for _ in range(ntracks):
        if pos + 8 > buf.size:
            return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
        if not (buf[pos] == 0x4D and buf[pos + 1] == 0x54 and buf[pos + 2] == 0x72 and buf[pos + 3] == 0x6B):
            return 2, pos, fmt, tpb, tick, kind, chan, d1, d2, n
        size = _u32(buf, pos + 4)
        pos += 8
        start = pos
        now = 0
        last = -1
        while pos - start != size:
            delta, pos, err = _vlq(buf, pos)
            if err:
                return err, pos, fmt, tpb, tick, kind, chan, d1, d2, n
            now += delta
            if now > (1 << 53):
                return 10, pos, fmt, tpb, tick, kind, chan, d1, d2, n
            if pos >= buf.size:
                return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
            status = np.int64(buf[pos])
            pos += 1
            peek = -1
            if status < 0x80:
                if last < 0:
                    return 3, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                peek = status
                status = last
            elif status != 0xFF:
                last = status
            k = K_OTHER
            a = 0
            b = 0
            if status == 0xFF:
                if pos >= buf.size:
                    return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                mtype = buf[pos]
                mlen, pos, err = _vlq(buf, pos + 1)
                if err:
                    return err, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if mlen > 1000000:
                    return 6, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if pos + mlen > buf.size:
                    return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if mlen < meta_min[mtype]:
                    return 8, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if mtype == 0x00 and mlen == 1:
                    return 8, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if mtype == 0x59:
                    key = np.int64(buf[pos])
                    if key >= 128:
                        key -= 256
                    mode = buf[pos + 1]
                    if key < -7 or key > 7 or mode > 1:
                        return 9, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if mtype == 0x2F:
                    pos += mlen
                    continue  # end_of_track: mido's merge drops it
                if mtype == 0x51:
                    k = K_TEMPO
                    a = (np.int64(buf[pos]) << 16) | (np.int64(buf[pos + 1]) << 8) | buf[pos + 2]
                pos += mlen
            elif status == 0xF0 or status == 0xF7:
                slen, pos, err = _vlq(buf, pos)
                if err:
                    return err, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if slen > 1000000:
                    return 6, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if pos + slen > buf.size:
                    return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                pos += slen
            else:
                mlen = length[status]
                if mlen == 0:
                    return 4, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                if peek >= 0 and mlen < 2:
                    return 11, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                need = mlen - 1 - (1 if peek >= 0 else 0)
                if pos + need > buf.size:
                    return 1, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                x = peek if peek >= 0 else (buf[pos] if mlen >= 2 else 0)
                if peek < 0 and mlen >= 2:
                    pos += 1
                    need -= 1
                y = buf[pos] if need >= 1 else 0
                pos += need
                if x > 127 or y > 127:
                    return 5, pos, fmt, tpb, tick, kind, chan, d1, d2, n
                hi = status & 0xF0
                if hi == 0x90:
                    k = K_NOTE_ON if y > 0 else K_NOTE_OFF
                elif hi == 0x80:
                    k = K_NOTE_OFF
                elif hi == 0xC0:
                    k = K_PROGRAM
                a = x
                b = y
                chan[n] = status & 0x0F
            tick[n] = now
            kind[n] = k
            d1[n] = a
            d2[n] = b
            n += 1
    return 0, pos, fmt, tpb, tick, kind, chan, d1, d2, n


@numba.njit(cache=True)
def _notes(tick, kind, chan, d1, d2, tpb, head, tail):
    """AMT's midi_to_compound over the merged messages. -> (err, time, dur, pitch, instr, vel, n).
    head/tail: per (instrument, pitch, channel) key, the first/last open note of its FIFO queue;
    all -1 on entry and restored to -1 on exit (reused across calls: allocating them is the
    dominant cost for small files)."""
    m = tick.size
    time_b = np.empty(m, np.int64)
    dur_b = np.empty(m, np.int64)
    pitch = np.empty(m, np.int64)
    instr = np.empty(m, np.int64)
    vel = np.empty(m, np.int64)
    t_on = np.empty(m, np.float64)
    nxt = np.full(m, -1, np.int64)
    keys = np.empty(m, np.int64)
    programs = np.zeros(16, np.int64)
    tempo = DEFAULT_TEMPO
    t = 0.0
    prev = 0
    n = 0
    for i in range(m):
        delta = tick[i] - prev
        prev = tick[i]
        if delta > 0:
            t += delta * (tempo * 1e-6 / tpb)
            if t > MAX_SECONDS:
                _reset(head, tail, keys, n)
                return 10, time_b, dur_b, pitch, instr, vel, n
        k = kind[i]
        if k == K_TEMPO:
            tempo = d1[i]
        elif k == K_PROGRAM:
            programs[chan[i]] = d1[i]
        elif k == K_NOTE_ON or k == K_NOTE_OFF:
            c = chan[i]
            ins = DRUMS if c == 9 else programs[c]
            key = (ins * 128 + d1[i]) * 16 + c
            if k == K_NOTE_ON:
                time_b[n] = np.int64(np.rint(TIME_RESOLUTION * t))
                dur_b[n] = -1
                pitch[n] = d1[i]
                instr[n] = ins
                vel[n] = d2[i]
                t_on[n] = t
                keys[n] = key
                if tail[key] >= 0:
                    nxt[tail[key]] = n
                else:
                    head[key] = n
                tail[key] = n
                n += 1
            elif head[key] >= 0:
                j = head[key]
                head[key] = nxt[j]
                if head[key] < 0:
                    tail[key] = -1
                dur_b[j] = np.int64(np.rint(TIME_RESOLUTION * (t - t_on[j])))
    _reset(head, tail, keys, n)
    return 0, time_b, dur_b, pitch, instr, vel, n


@numba.njit(cache=True)
def _reset(head, tail, keys, n):
    for j in range(n):
        head[keys[j]] = -1
        tail[keys[j]] = -1


_HEAD = np.full(129 * 128 * 16, -1, np.int64)  # per-process FIFO heads/tails for _notes
_TAIL = np.full(129 * 128 * 16, -1, np.int64)


def parse_notes(data: bytes) -> Notes:
    """A Standard MIDI File's bytes -> its notes. Raises MidiReadError saying what is wrong."""
    if not data:
        raise MidiReadError("empty file (0 bytes)")
    if data[:4] != b"MThd":
        raise MidiReadError("not a MIDI file (no MThd header)")
    buf = np.frombuffer(data, np.uint8)
    err, at, fmt, tpb, tick, kind, chan, d1, d2, n = _scan(buf, _LENGTH, _META_MIN)
    if err:
        raise MidiReadError(f"corrupt MIDI: {_ERRORS[err]} at byte {at}")
    if fmt == 2:
        raise MidiReadError("format 2 (asynchronous tracks) cannot be merged into one timeline")
    if n and tick[:n].max() > 0 and tpb <= 0:
        raise MidiReadError(f"unsupported time division {tpb} (SMPTE or zero ticks per beat)")
    order = np.argsort(tick[:n], kind="stable")  # mido's merge_tracks: stable sort by tick
    err, time_b, dur_b, pitch, instr, vel, m = _notes(
        tick[order], kind[order], chan[order], d1[order], d2[order], max(tpb, 1), _HEAD, _TAIL)
    if err:
        raise MidiReadError(f"absurd tick values: the clock passes {MAX_SECONDS:.0e} s")
    return Notes(time_b[:m], dur_b[:m], pitch[:m], instr[:m], vel[:m])


def read_notes(path: str | Path) -> Notes:
    return read_midi_file(path)[1]


def read_midi_file(path: str | Path) -> tuple[str, Notes]:
    """-> (MD5 hex of the file's bytes: prep's split key, its notes). MidiReadError (one line)
    for a file that cannot be read or parsed."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MidiReadError(f"unreadable ({e.strerror})") from None
    return hashlib.md5(data).hexdigest(), parse_notes(data)


def notes_to_events(notes: Notes) -> tuple[np.ndarray, int]:
    """-> (events (N, 3) int64 ids (time, dur, note), number of durations truncated)."""
    num_truncated = int(np.count_nonzero(notes.dur >= MAX_DUR))
    dur = np.where(notes.dur == -1, TIME_RESOLUTION // 4, np.minimum(notes.dur, MAX_DUR - 1))
    ev = np.stack([TIME_OFFSET + notes.time, DUR_OFFSET + dur,
                   NOTE_OFFSET + MAX_PITCH * notes.instr + notes.pitch], 1)
    return ev.astype(np.int64), num_truncated
