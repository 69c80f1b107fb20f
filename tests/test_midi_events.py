"""MIDI -> notes: exact agreement with AMT's mido-based midi_to_compound on real files, corrupt
inputs rejected with a reason, and MIDI -> events -> MIDI keeping every note."""

from __future__ import annotations

from collections import Counter

import mido
import numpy as np
import pytest

from amtrain.midi.decode import events_to_notes, write_midi
from amtrain.midi.events import MidiReadError, parse_notes, read_notes
from amtrain.tokens.midi import MAX_DUR
from tests import reference_amt as ref
from tests.midi_helpers import MIDI_DIR, MIDI_FILES, smf, vlq


def test_real_files_are_all_there():
    names = {p.name for p in MIDI_FILES}
    assert {"music21_test04_beethoven_sym7_mvt2.mid", "music21_test06_type0.mid",
            "music21corpus_beethoven_op18no1_mvt1.mid", "music21corpus_joplin_maple_leaf_rag.mid"} <= names
    assert mido.MidiFile(MIDI_DIR / "music21_test06_type0.mid").type == 0


@pytest.mark.parametrize("path", MIDI_FILES, ids=lambda p: p.stem)
def test_compound_identical_to_amt(path):
    """Same notes, same order, same 10 ms rounding (ties included) as AMT's midi_to_compound."""
    assert read_notes(path).to_compound() == ref.midi_to_compound(str(path))


def test_huge_tick_file_parses():
    """ticks_per_beat 10080 and a huge last tick (pretty_midi rejects this file)."""
    path = MIDI_DIR / "music21corpus_beethoven_op18no1_mvt1.mid"
    assert mido.MidiFile(path).ticks_per_beat == 10080
    notes = read_notes(path)
    assert len(notes) == 5516 and 60000 < notes.time.max() < 70000  # ~641 s


def _note_set(notes, cap=True):
    dur = np.where(notes.dur < 0, 25, np.minimum(notes.dur, MAX_DUR - 1)) if cap else notes.dur
    return Counter(zip(notes.time.tolist(), dur.tolist(), notes.pitch.tolist(), notes.instr.tolist(), strict=True))


@pytest.mark.parametrize("path", MIDI_FILES, ids=lambda p: p.stem)
def test_midi_events_midi_round_trip(path, tmp_path):
    """Every note's onset, duration (10 ms grid, capped at 9.99 s, unclosed = 0.25 s), pitch and
    instrument survive MIDI -> events -> MIDI -> events."""
    from amtrain.midi.events import notes_to_events

    notes = read_notes(path)
    events, _ = notes_to_events(notes)
    out = tmp_path / "back.mid"
    write_midi(events_to_notes(events), out)
    back = read_notes(out)
    assert _note_set(back, cap=False) == _note_set(notes)
    # and a third-party reader agrees on the written file
    assert Counter(ref.midi_to_compound(str(out))[2::5]) == Counter(notes.pitch.tolist())


def _note(delta, on, ch, pitch, vel=64):
    return vlq(delta) + bytes([(0x90 if on else 0x80) | ch, pitch, vel])


GOOD_TRACK = _note(0, True, 0, 60) + _note(96, False, 0, 60) + b"\x00\xff\x2f\x00"


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"RIFF....not midi at all", "not a MIDI file"),
    (smf([GOOD_TRACK])[:30], "truncated"),
    (smf([GOOD_TRACK]).replace(b"MTrk", b"XTrk"), "no MTrk header"),
    (smf([b"\x00\x3c\x40" + b"\x00\xff\x2f\x00"]), "running status without"),
    (smf([b"\x00\x90\x3c\xc8" + b"\x00\xff\x2f\x00"]), "data byte above 127"),
    (smf([b"\x00\xf4" + b"\x00\xff\x2f\x00"]), "undefined status byte"),
    (smf([b"\xff\xff\xff\xff\x7f\x90\x3c\x40\x00\xff\x2f\x00"]), "absurd tick value"),
    (smf([b"\x00\xff\x51\x02\x07\xa1" + GOOD_TRACK]), "meta message too short"),
    (smf([b"\x00\xff\x59\x02\x09\x00" + GOOD_TRACK]), "invalid key signature"),
    (smf([b"\x00\xf8\x00\x05" + GOOD_TRACK]), "running status after a message that has no data"),
    (smf([GOOD_TRACK], fmt=2), "format 2"),
    (smf([GOOD_TRACK], tpb=0), "time division"),
])
def test_corrupt_inputs_are_rejected_with_a_reason(data, reason, tmp_path):
    with pytest.raises(MidiReadError, match=reason):
        parse_notes(data)
    # AMT's preprocessing (mido) fails on these too and skips the file, except where we are
    # stricter than mido on purpose: 5-byte numbers (beyond the SMF spec)
    if "absurd" not in reason:
        path = tmp_path / "bad.mid"
        path.write_bytes(data)
        with pytest.raises(Exception):  # noqa: B017 - mido raises OSError/EOFError/ValueError/TypeError...
            ref.midi_to_compound(str(path))


def test_absurd_but_valid_ticks_hit_the_clock_guard():
    """4-byte deltas at 1 tick per beat and the slowest tempo: a clock far beyond any music."""
    slow = b"\x00\xff\x51\x03\xff\xff\xff"
    body = slow + b"".join(_note(0x0FFFFFFF, True, 0, 60) for _ in range(3)) + b"\x00\xff\x2f\x00"
    with pytest.raises(MidiReadError, match="absurd tick values"):
        parse_notes(smf([body], tpb=1))


def test_semantics_match_mido_on_edge_cases(tmp_path):
    """Program change mid-note, overlapping same-pitch notes, note_on velocity 0, drums, running
    status, two tracks sharing a channel, an unclosed note: AMT's reading, id for id."""
    t1 = (b"\x00\xc0\x28" + _note(0, True, 0, 60) + vlq(10) + b"\x3e\x50"  # running status note_on
          + _note(5, True, 0, 60) + vlq(20) + b"\xc0\x29" + _note(3, False, 0, 60)
          + _note(7, True, 0, 60, 0) + _note(1, False, 0, 62) + _note(2, True, 0, 64) + b"\x00\xff\x2f\x00")
    t2 = (_note(4, True, 9, 36) + _note(4, False, 9, 36) + b"\x00\xff\x51\x03\x07\xa1\x20"
          + _note(9, True, 0, 60) + _note(50, False, 0, 60) + b"\x00\xff\x2f\x00")
    path = tmp_path / "edge.mid"
    path.write_bytes(smf([t1, t2]))
    assert read_notes(path).to_compound() == ref.midi_to_compound(str(path))


def _random_midi(rng: np.random.Generator, path):
    """A random but valid multi-track file: notes with overlaps and velocity-0 offs, program and
    tempo changes, controls, pitch bends, text metas, drums, several tracks sharing channels."""
    mid = mido.MidiFile(type=int(rng.integers(0, 2)), ticks_per_beat=int(rng.choice([96, 120, 384, 480, 1000, 10080])))
    for _ in range(1 if mid.type == 0 else int(rng.integers(1, 5))):
        track = mido.MidiTrack()
        for _ in range(int(rng.integers(20, 200))):
            dt = int(rng.choice([0, 0, 1, 7, 24, 30, 60, 120, 240, 1000]))
            ch = int(rng.choice([0, 1, 2, 9]))
            kind = rng.integers(0, 10)
            if kind < 4:
                msg = mido.Message("note_on", channel=ch, note=int(rng.integers(55, 62)), velocity=int(rng.integers(1, 128)), time=dt)
            elif kind < 7:
                msg = mido.Message("note_on" if kind == 6 else "note_off", channel=ch, note=int(rng.integers(55, 62)), velocity=0, time=dt)
            elif kind == 7:
                msg = mido.Message("program_change", channel=ch, program=int(rng.integers(0, 128)), time=dt)
            elif kind == 8:
                msg = mido.MetaMessage("set_tempo", tempo=int(rng.integers(200000, 1500000)), time=dt)
            else:
                msg = rng.choice([mido.Message("control_change", channel=ch, control=64, value=127, time=dt),
                                  mido.Message("pitchwheel", channel=ch, pitch=100, time=dt),
                                  mido.MetaMessage("text", text="x", time=dt)])
            track.append(msg)
        mid.tracks.append(track)
    mid.save(path)


def test_random_files_identical_to_amt(tmp_path):
    """60 random files: every message kind AMT looks at, ties at half bins, FIFO pairing."""
    rng = np.random.default_rng(0)
    for i in range(60):
        path = tmp_path / f"r{i}.mid"
        _random_midi(rng, path)
        assert read_notes(path).to_compound() == ref.midi_to_compound(str(path)), f"file {i}"
