"""MIDI <-> ABC notation on a fixed rhythmic grid.

MIDI -> ABC: symusic reads the file (any format, tracks split by channel); every note is put
on a grid of GRID = 4 steps a quarter note (sixteenths; the ABC unit length L:1/16, so a
length is a whole number of steps: a quarter note is `C4`). abc2midi takes only powers of two
in unit lengths and length fractions, so a triplet grid would need tuplet notation; triplets
are rounded to sixteenths. Each track is
an ABC voice (`V:n`, `%%MIDI channel c`, `%%MIDI program p`); the voices of one instrument
(program, or drums on channel 10) share a channel, so a file may hold 15 instruments besides
drums. Notes of one pitch that overlap inside a track are merged. Each voice is
cut into slices at every onset, offset and bar line (the first time signature's bars; 4/4
when there is none or its bar is not whole steps): a slice is a rest `z`, a note or a chord
`[...]`, notes sounding on into the next slice are tied `-`. Accidentals are written as sharps
(`^`), a natural as `=` where its letter was sharpened earlier in the bar; the key is `K:C`.
Tempo changes are inline `[Q:1/4=bpm]` in the first voice (bpm rounded to a multiple of 4). Empty bars before the first note
are dropped. A long piece is cut at bar lines into tunes of at most `max_tokens` ids (each
with the header and the tempo in force; a note sounding across a cut is split there).

ABC -> MIDI: abcMIDI's `abc2midi` (bundled with symusic, else on PATH) writes the MIDI,
symusic reads it. `abc2midi` starts each note one tick late and ends it one tick early (its
articulation gap): rounding to the grid restores the written values.

Why not midi2abc (symusic's `Score.dumps_abc`): it guesses the unit length and rhythm per file
and quantizes coarsely; on the bundled files it kept between 5% and 100% of the notes on a
1/4-beat grid and made ABC that abc2midi rejects (more than 16 voices; ties it cannot
follow). music21 has no ABC writer. See docs/midi.md, "ABC notation".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from amtrain.errors import UserError
from amtrain.midi.events import MidiReadError, Notes
from amtrain.tokens.abc import NO_LENGTH, Pair, render
from amtrain.tokens.midi import DRUMS, TIME_RESOLUTION

GRID = 4
"""Grid steps per quarter note; the ABC unit length is L:1/(4 * GRID) (a power of two)."""
UNIT_LENGTH = f"1/{4 * GRID}"
MAX_BARS = 10_000
"""Longer pieces are refused (a file whose ticks are corrupt, not music)."""
TEMPO_STEP = 4
"""Tempos are written in whole multiples of 4 bpm (within 2 bpm of the file's): few distinct
values, so `Q:` survives a corpus vocabulary's --min-freq."""
DEFAULT_VELOCITY = 72
SHARP_NAMES = ("C", "^C", "D", "^D", "E", "F", "^F", "G", "^G", "A", "^A", "B")


class AbcError(MidiReadError):
    """A file that cannot become ABC (unreadable, no notes, too many instruments, ...)."""


def pitch_token(pitch: int, sharpened: set[str]) -> str:
    """MIDI pitch -> ABC note text (middle C = 60 = `C`, 72 = `c`, 84 = `c'`, 48 = `C,`);
    `=` before a natural whose letter is in `sharpened` (sharps written earlier in the bar)."""
    name = SHARP_NAMES[pitch % 12]
    letter = name[-1]
    octave = pitch // 12 - 5
    if name[0] == "^":
        sharpened.add(letter)
    elif letter in sharpened:
        name = "=" + name
    if octave >= 1:
        return name[:-1] + letter.lower() + "'" * (octave - 1)
    return name + "," * (-octave)


@dataclass
class Voice:
    key: tuple[bool, int]  # (is_drum, program)
    channel: int  # 1..16 (drums 10)
    on: np.ndarray  # (N,) grid steps
    off: np.ndarray
    pitch: np.ndarray


@dataclass
class GridPiece:
    """A piece on the ABC grid: voices of (onset, offset, pitch) in steps, bar length, tempos."""

    voices: list[Voice]
    bar: int  # steps per bar
    meter: str
    tempos: list[tuple[int, int]]  # (step, bpm)

    def notes(self) -> list[tuple[bool, int, int, int, int]]:
        """(is_drum, program, pitch, onset, duration) per note, sorted: the grid notes a round
        trip keeps."""
        return sorted((v.key[0], v.key[1], int(p), int(a), int(b - a))
                      for v in self.voices for a, b, p in zip(v.on, v.off, v.pitch, strict=True))


def read_score(data: bytes):
    import symusic

    try:
        return symusic.Score.from_midi(data)
    except Exception as e:  # symusic raises RuntimeError/ValueError with its parser's message
        raise AbcError(f"not a readable MIDI file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def grid_piece(score) -> GridPiece:
    """A symusic Score -> its notes on the grid, grouped into voices (module doc)."""
    tpq = max(int(score.ticks_per_quarter), 1)
    rows: list[tuple[tuple[bool, int], np.ndarray]] = []
    for track in score.tracks:
        if len(track.notes) == 0:
            continue
        a = track.notes.numpy()
        key = (bool(track.is_drum), 0 if track.is_drum else int(track.program))
        on = np.round(a["time"].astype(np.float64) * GRID / tpq).astype(np.int64)
        off = np.round((a["time"].astype(np.float64) + a["duration"]) * GRID / tpq).astype(np.int64)
        rows.append((key, np.stack([on, np.maximum(off, on + 1), a["pitch"].astype(np.int64)], 1)))
    if not rows:
        raise AbcError("no notes")
    channels = _channels([key for key, _ in rows])
    num, den = 4, 4
    if len(score.time_signatures):
        ts = score.time_signatures[0]
        num, den = int(ts.numerator), int(ts.denominator)
    bar = Fraction(4 * GRID * num, den) if num > 0 and den > 0 else Fraction(0)
    if bar.denominator != 1 or bar <= 0:
        num, den, bar = 4, 4, Fraction(4 * GRID)
    bar_steps = int(bar)
    voices = [Voice(key, channels[key], *_merge(r)) for key, r in rows]
    first = min(int(v.on.min()) for v in voices)
    shift = first // bar_steps * bar_steps  # whole empty bars before the first note
    for v in voices:
        v.on -= shift
        v.off -= shift
    num_bars = -(-max(int(v.off.max()) for v in voices) // bar_steps)
    if num_bars > MAX_BARS:
        raise AbcError(f"{num_bars:,} bars after the first note (absurd tick values?); at most {MAX_BARS:,}")
    tempos: list[tuple[int, int]] = []
    for t in score.tempos:
        step = max(round(int(t.time) * GRID / tpq) - shift, 0)
        bpm = max(TEMPO_STEP, TEMPO_STEP * round(float(t.qpm) / TEMPO_STEP))
        if tempos and tempos[-1][0] == step:
            tempos[-1] = (step, bpm)
        elif not tempos or tempos[-1][1] != bpm:
            tempos.append((step, bpm))
    if not tempos or tempos[0][0] != 0:
        tempos.insert(0, (0, tempos[0][1] if tempos and tempos[0][0] == 0 else 120))
    return GridPiece(voices, bar_steps, f"{num}/{den}", tempos)


def _channels(keys: list[tuple[bool, int]]) -> dict[tuple[bool, int], int]:
    """A MIDI channel per instrument, in order of appearance: drums 10, the others 1-9, 11-16
    (voices of one instrument share its channel)."""
    free = [c for c in range(1, 17) if c != 10]
    out: dict[tuple[bool, int], int] = {}
    for key in keys:
        if key not in out:
            if key[0]:
                out[key] = 10
            elif not free:
                n = len({k for k in keys if not k[0]})
                raise AbcError(f"{n} instruments; ABC voices play on 16 MIDI channels, at most 15 besides drums")
            else:
                out[key] = free.pop(0)
    return out


def _merge(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3) onset, offset, pitch -> sorted, with overlapping notes of one pitch merged."""
    rows = rows[np.lexsort((rows[:, 0], rows[:, 2]))]  # by pitch, then onset
    out: list[list[int]] = []
    for on, off, p in rows.tolist():
        if out and out[-1][2] == p and on < out[-1][1]:
            out[-1][1] = max(out[-1][1], off)
        else:
            out.append([on, off, p])
    a = np.array(out, np.int64)
    a = a[np.lexsort((a[:, 2], a[:, 0]))]
    return a[:, 0], a[:, 1], a[:, 2]


def voice_bars(voice: Voice, bar: int, num_bars: int, tempos: list[tuple[int, int]] | None) -> list[list[Pair]]:
    """One voice as ABC units, one list per bar (bar line included); bars after its last note
    are empty lists. `tempos`: inline tempo changes (first voice only)."""
    bounds = {0, *voice.on.tolist(), *voice.off.tolist(), *range(0, num_bars * bar + 1, bar)}
    tempo_at = dict(tempos[1:]) if tempos else {}
    bounds |= set(tempo_at)
    end = int(voice.off.max())
    cuts = sorted(b for b in bounds if b <= max(end, max(tempo_at, default=0)))
    bars: list[list[Pair]] = [[] for _ in range(num_bars)]
    order = np.argsort(voice.on, kind="stable")
    on, off, pitch = (x[order].tolist() for x in (voice.on, voice.off, voice.pitch))
    nxt = 0  # the next note to start
    active: list[int] = []  # notes sounding in the slice
    sharpened: set[str] = set()
    tied: list[int] = []  # pitches tied into the next slice, in the order written
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        k = a // bar
        units = bars[k]
        if a % bar == 0:
            sharpened = set()
        if a in tempo_at:
            units.append(("[Q:", f"1/4={tempo_at[a]}"))
        active = [j for j in active if off[j] > a]
        while nxt < len(on) and on[nxt] <= a:  # every onset is a cut: on[nxt] == a
            active.append(nxt)
            nxt += 1
        idx = active
        length = f"DUR:{b - a}"
        if not idx:
            units.append(("z", length))
            tied = []
        else:
            chord = len(idx) > 1
            if chord:
                units.append(("[", NO_LENGTH))
            # abc2midi ties chord notes by position: the notes a tie continues come first, in
            # the order they were tied, then the new ones by pitch
            rank = {p: r for r, p in enumerate(tied)}
            tied = []
            for j in sorted(idx, key=lambda j: (rank.get(pitch[j], len(rank)), pitch[j])):
                units.append((pitch_token(pitch[j], sharpened), length))
                if off[j] > b:
                    units.append(("-", NO_LENGTH))
                    tied.append(pitch[j])
            if chord:
                units.append(("]", NO_LENGTH))
        if b % bar == 0:
            units.append(("|", NO_LENGTH))
    if cuts and cuts[-1] in tempo_at and cuts[-1] // bar < num_bars:  # a change after the voice's last note
        bars[cuts[-1] // bar].append(("[Q:", f"1/4={tempo_at[cuts[-1]]}"))
    return bars


def header(meter: str, bpm: int) -> list[Pair]:
    return [("X:", "1"), ("M:", meter), ("L:", UNIT_LENGTH), ("Q:", f"1/4={bpm}"), ("K:", "C")]


def voice_header(number: int, voice: Voice) -> list[Pair]:
    units = [("V:", str(number)), ("%%MIDI channel", str(voice.channel))]
    return units if voice.key[0] else units + [("%%MIDI program", str(voice.key[1]))]


def piece_tunes(piece: GridPiece, max_tokens: int | None = None) -> list[list[Pair]]:
    """A grid piece -> ABC tunes as units: one, or cut at bar lines into tunes of at most
    `max_tokens` ids (2 per unit, plus <START> and <END>). A bar that alone exceeds it raises."""
    end = max(int(v.off.max()) for v in piece.voices)
    num_bars = -(-end // piece.bar)
    per_voice = [voice_bars(v, piece.bar, num_bars, piece.tempos if i == 0 else None)
                 for i, v in enumerate(piece.voices)]
    base = 2 * len(header("", 0)) + 2  # the header's units, <START> and <END>
    head = 2 * 3  # a voice's V:, %%MIDI channel and program units, once per tune it sounds in
    cost = [[2 * len(bars[k]) for bars in per_voice] for k in range(num_bars)]  # ids per bar and voice
    spans: list[tuple[int, int]] = []
    if max_tokens is None:
        spans = [(0, num_bars)]
    else:
        b0, total = 0, base
        present: set[int] = set()
        for k in range(num_bars):
            alone = base + sum(c + head for c in cost[k] if c)
            if alone > max_tokens:
                raise AbcError(f"bar {k + 1} alone needs {alone} tokens, more than --max-length {max_tokens}")
            more = sum(c + (0 if i in present else head) for i, c in enumerate(cost[k]) if c)
            if total + more > max_tokens:
                spans.append((b0, k))
                b0, total, present = k, base, set()
                more = alone - base
            total += more
            present |= {i for i, c in enumerate(cost[k]) if c}
        spans.append((b0, num_bars))
    tunes = []
    for b0, b1 in spans:
        bpm = max((t for t in piece.tempos if t[0] <= b0 * piece.bar), key=lambda t: t[0])[1]
        units = header(piece.meter, bpm)
        for i, (v, bars) in enumerate(zip(piece.voices, per_voice, strict=True)):
            body = [u for k in range(b0, b1) for u in bars[k]]
            if b0 and i == 0 and body and body[0][0] == "[Q:":
                body = body[1:]
            music = [j for j, (sym, _) in enumerate(body) if sym not in ("z", "|")]  # notes, ties, tempo changes
            if not music:
                continue  # silent in this tune
            body = _untie_end(body[:music[-1] + 1])
            units += voice_header(i + 1, v) + body
        tunes.append(units)
    return tunes


def _untie_end(body: list[Pair]) -> list[Pair]:
    """Drop the ties of a voice's last slice (a note cut at the tune's end leads nowhere)."""
    last = len(body) - 1
    if body and body[-1][0] == "]":
        last = max(j for j, (sym, _) in enumerate(body) if sym == "[")
    elif body and body[-1][0] == "-":
        last = len(body) - 2
    return body[:last] + [u for u in body[last:] if u[0] != "-"]


def midi_to_tunes(data: bytes, max_tokens: int | None = None) -> tuple[GridPiece, list[list[Pair]]]:
    """MIDI file bytes -> (its grid piece, ABC tunes as units). Raises AbcError with the reason."""
    piece = grid_piece(read_score(data))
    return piece, piece_tunes(piece, max_tokens)


def midi_to_abc(data: bytes) -> str:
    """MIDI file bytes -> one ABC tune (text)."""
    return render(midi_to_tunes(data)[1][0])


# --- ABC -> MIDI ---------------------------------------------------------------------------
def abc2midi_binary() -> str:
    """abcMIDI's abc2midi: the copy symusic bundles, else one on PATH; a UserError if neither."""
    try:
        import symusic  # noqa: F401  (its import sets SYMUSIC_ABC2MIDI to the bundled binary)
    except ImportError:
        pass
    for candidate in (os.environ.get("SYMUSIC_ABC2MIDI"), shutil.which("abc2midi")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UserError("abc2midi not found: install symusic==0.6.0 (pip install -e '.[midi]', it bundles abcMIDI) "
                    "or the Debian package abcmidi")


def playable(text: str) -> str:
    """ABC text as abc2midi should play it: a tune header (the default one where the text has
    no X: line, e.g. a fragment), and `%%MIDI chordattack 0` after the key line (abc2midi
    otherwise spreads the notes of a chord of more than six apart in time)."""
    lines = text.splitlines()
    if not any(line.startswith("X:") for line in lines):
        lines = render(header("4/4", 120)).splitlines() + lines
    k = next((i for i, line in enumerate(lines) if line.startswith("K:")), None)
    if k is None:
        x = next(i for i, line in enumerate(lines) if line.startswith("X:"))
        lines.insert(x + 1, "K:C")
        k = x + 1
    lines.insert(k + 1, "%%MIDI chordattack 0")
    return "\n".join(lines) + "\n"


def abc_to_midi_bytes(text: str) -> bytes:
    """ABC text -> MIDI file bytes through abc2midi (`playable`); b'' when abc2midi makes no
    file of it."""
    text = playable(text)
    with tempfile.TemporaryDirectory(prefix="amtrain-abc-") as d:
        src, dst = os.path.join(d, "in.abc"), os.path.join(d, "out.mid")
        with open(src, "w") as f:
            f.write(text)
        subprocess.run([abc2midi_binary(), src, "-o", dst, "-silent"], capture_output=True, timeout=120, check=False)
        if not os.path.isfile(dst):
            return b""
        with open(dst, "rb") as f:
            return f.read()


def abc_to_score(text: str):
    """ABC text -> a symusic Score (None when abc2midi makes nothing of it)."""
    import symusic

    data = abc_to_midi_bytes(text)
    if not data:
        return None
    try:
        return symusic.Score.from_midi(data)
    except Exception:
        return None


def score_grid_notes(score) -> list[tuple[bool, int, int, int, int]]:
    """(is_drum, program, pitch, onset, duration) on the grid of a Score abc2midi wrote."""
    tpq = int(score.ticks_per_quarter)
    out = []
    for track in score.tracks:
        if len(track.notes) == 0:
            continue
        a = track.notes.numpy()
        on = np.round(a["time"] * GRID / tpq).astype(np.int64)
        off = np.round((a["time"] + a["duration"]) * GRID / tpq).astype(np.int64)
        prog = 0 if track.is_drum else int(track.program)
        out += [(bool(track.is_drum), prog, int(p), int(x), int(y - x))
                for x, y, p in zip(on, off, a["pitch"], strict=True)]
    return sorted(out)


def score_to_notes(score) -> Notes:
    """A Score -> Notes in 10 ms bins (instrument 128 = drums, velocity the MIDI default)."""
    rows = []
    sec = score.to("second")
    for track in sec.tracks:
        if len(track.notes) == 0:
            continue
        a = track.notes.numpy()
        t = np.round(a["time"] * TIME_RESOLUTION).astype(np.int64)
        d = np.maximum(np.round(a["duration"] * TIME_RESOLUTION).astype(np.int64), 1)
        instr = DRUMS if track.is_drum else int(track.program)
        rows.append(np.stack([t, d, a["pitch"].astype(np.int64), np.full(len(t), instr)], 1))
    if not rows:
        z = np.zeros(0, np.int64)
        return Notes(z, z, z, z, z)
    a = np.concatenate(rows)
    a = a[np.lexsort((a[:, 2], a[:, 0]))]
    return Notes(a[:, 0], a[:, 1], a[:, 2], a[:, 3], np.full(len(a), DEFAULT_VELOCITY, np.int64))


def abc_to_notes(text: str) -> Notes:
    """ABC text -> the notes a listener hears (empty when abc2midi makes nothing of it)."""
    score = abc_to_score(text)
    if score is None:
        z = np.zeros(0, np.int64)
        return Notes(z, z, z, z, z)
    return score_to_notes(score)
