"""Decoding ids -> notes -> MIDI: never crashes on any ids, counts what it skips, agrees with
AMT's events_to_compound on valid sequences; the decode-midi and plot-midi commands."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from amtrain.midi.decode import events_to_notes, ids_to_midi, ids_to_notes
from amtrain.midi.events import notes_to_events, read_notes
from amtrain.midi.tokenize import tokenize_pieces
from amtrain.tokens.midi import (
    ANTICIPATE,
    AUTOREGRESS,
    CONTROL_OFFSET,
    DUR_OFFSET,
    MAX_TIME,
    NOTE_OFFSET,
    REST,
    SEPARATOR,
    VOCAB_SIZE,
)
from tests import reference_amt as ref
from tests.midi_helpers import MIDI_DIR

ids_strategy = st.lists(st.one_of(st.integers(-5, VOCAB_SIZE + 5), st.sampled_from(
    [SEPARATOR, AUTOREGRESS, ANTICIPATE, REST, 0, DUR_OFFSET, NOTE_OFFSET, CONTROL_OFFSET])), max_size=200)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(ids_strategy)
def test_any_ids_decode_without_crash_and_everything_is_accounted(ids):
    notes, rep = ids_to_notes(ids)
    consumed = (3 * (rep.num_notes + rep.num_rests + rep.num_separators) + rep.num_flags
                + rep.num_invalid + rep.num_malformed)
    assert consumed == len(ids) == rep.num_ids
    assert len(notes) == rep.num_notes
    assert ((notes.pitch >= 0) & (notes.pitch < 128)).all() and ((notes.instr >= 0) & (notes.instr <= 128)).all()
    assert (notes.dur >= 0).all() and (np.diff(notes.time) >= 0).all()


def test_random_ids_write_a_midi_file(tmp_path):
    rng = np.random.default_rng(0)
    for n in (0, 1, 1024, 5000):
        out = tmp_path / f"r{n}.mid"
        rep = ids_to_midi(rng.integers(-100, VOCAB_SIZE + 100, n), out)
        assert out.is_file() and rep.num_invalid + rep.num_malformed > 0 or n == 0
        read_notes(out)  # the file we wrote parses


def test_model_like_ids_count_invalid():
    good = [AUTOREGRESS, 100, DUR_OFFSET + 20, NOTE_OFFSET + 60, 150, DUR_OFFSET + 5, NOTE_OFFSET + 64]
    bad = good[:4] + [DUR_OFFSET + 1, VOCAB_SIZE + 3, 200, DUR_OFFSET + 3] + good[4:] + [7, DUR_OFFSET]
    notes, rep = ids_to_notes(bad)
    assert len(notes) == 2 and notes.time.tolist() == [100, 150]
    assert rep.num_invalid == 3 + 1 and rep.num_malformed == 2  # 2 stray DUR, 1 >= vocab; times 200 and 7 broken


def _rows(notes):
    return sorted(zip(notes.time.tolist(), notes.dur.tolist(), notes.pitch.tolist(), notes.instr.tolist(), strict=True))


def test_absolute_times_past_100_s_decode_where_a_triple_is_due():
    """AMT's generate and amtrain's rollouts write a long piece as flag + triples of absolute
    times: the time ids run into the DUR / NOTE / control blocks and past the vocabulary."""
    ev, _ = notes_to_events(read_notes(MIDI_DIR / "music21_test03_soprano_piano.mid"))  # 160 s
    ev = ev[np.argsort(ev[:, 0], kind="stable")]
    ids = np.concatenate([[AUTOREGRESS], ev.ravel()])
    notes, rep = ids_to_notes(ids)
    assert rep.num_invalid == rep.num_malformed == 0 and rep.num_notes == len(ev) and ev[:, 0].max() > MAX_TIME
    comp = ref.events_to_compound(ids[1:].tolist())  # AMT reads times by position (right below 275 s)
    assert _rows(notes) == sorted(zip(comp[0::5], comp[1::5], comp[2::5], comp[3::5], strict=True))
    far = ev[-3:] + [[60_000, 0, 0]]  # 600 s: time ids past the vocabulary
    control = np.array([[CONTROL_OFFSET + 30_000, CONTROL_OFFSET + DUR_OFFSET + 7, CONTROL_OFFSET + NOTE_OFFSET + 60]])
    tape = np.concatenate([ev, far, control])
    notes, rep = ids_to_notes(np.concatenate([[ANTICIPATE], tape.ravel()]))
    assert _rows(notes) == _rows(events_to_notes(tape)) and rep.num_controls == 1 and notes.time.max() == 60_000 + ev[-1, 0]
    # where no triple is due (after a stray id) only in-block times count: an absolute triple is skipped
    _, rep = ids_to_notes([AUTOREGRESS, DUR_OFFSET + 1, *far[0].tolist(), 100, DUR_OFFSET + 3, NOTE_OFFSET + 60])
    assert rep.num_notes == 1 and rep.num_invalid == 4


def test_valid_sequences_decode_like_amt():
    """Real augmented sequences: our notes equal AMT's events_to_compound (controls included)."""
    ev, tr = notes_to_events(read_notes(MIDI_DIR / "music21corpus_clara_schumann_polonaise_op1n1.mid"))
    seqs, _ = tokenize_pieces([(ev, tr)], 10, np.random.RandomState(0))
    for seq in seqs[::7]:
        notes, rep = ids_to_notes(seq)
        assert rep.num_invalid == rep.num_malformed == 0 and rep.num_flags == 1
        comp = ref.events_to_compound(seq[1:].tolist())
        exp = sorted(zip(comp[0::5], comp[1::5], comp[2::5], comp[3::5], strict=True))
        got = sorted(zip(notes.time.tolist(), notes.dur.tolist(), notes.pitch.tolist(), notes.instr.tolist(), strict=True))
        assert got == exp
        note_ids = seq[1:].reshape(-1, 3)[:, 2]
        assert rep.num_controls == np.count_nonzero((note_ids >= CONTROL_OFFSET) & (note_ids != SEPARATOR))
        assert notes.time.max() < 3 * MAX_TIME


def test_decode_and_plot_commands(repo_root, tmp_path):
    ev, tr = notes_to_events(read_notes(MIDI_DIR / "music21_test03_soprano_piano.mid"))
    seqs, _ = tokenize_pieces([(ev, tr)], 2, np.random.RandomState(0))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(" ".join(map(str, s.tolist())) for s in seqs) + "\n1 2 oops\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "amtrain", *a], cwd=repo_root, capture_output=True, text=True)  # noqa: E731
    r = run("decode-midi", str(tokens), str(tmp_path / "a.mid"), "--line", "5")
    assert r.returncode == 0, r.stderr
    assert "0 invalid ids and 0 malformed triples skipped" in r.stdout and (tmp_path / "a.mid").stat().st_size > 100
    r = run("plot-midi", str(tokens), str(tmp_path / "a.png"), "--line", "5")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    r = run("plot-midi", str(MIDI_DIR / "music21_test06_type0.mid"), str(tmp_path / "b.png"))
    assert r.returncode == 0 and (tmp_path / "b.png").stat().st_size > 1000
    r = run("decode-midi", str(tokens), str(tmp_path / "c.mid"), "--line", "0")
    assert r.returncode == 1 and "not a line of integer ids" in r.stderr  # the bad last line names itself
    r = run("plot-midi", str(tmp_path / "tokens.txt.missing"), str(tmp_path / "d.png"))
    assert r.returncode == 1 and "no such token file" in r.stderr
