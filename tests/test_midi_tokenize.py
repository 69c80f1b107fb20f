"""AMT sequences: id-for-id parity with AMT's tokenize (reference port) on real files, and the
invariants of padding and interleaving."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amtrain.midi.events import notes_to_events, read_notes
from amtrain.midi.tokenize import anticipate, drop_reason, pad, relativize, tokenize_pieces
from amtrain.tokens.midi import (
    ATIME_OFFSET,
    CONTROL_OFFSET,
    DELTA,
    DUR_OFFSET,
    NOTE_OFFSET,
    REST,
    SEPARATOR,
    TIME_RESOLUTION,
)
from tests import reference_amt as ref
from tests.midi_helpers import MIDI_DIR, MIDI_FILES, SMALL_FILES


def ours(files, augment):
    pieces = []
    for f in files:
        ev, num_truncated = notes_to_events(read_notes(f))
        if drop_reason(ev) is None:
            pieces.append((ev, num_truncated))
    return tokenize_pieces(pieces, augment, np.random.RandomState(0))


def assert_same(files, augment):
    expected, stats = ref.tokenize([str(f) for f in files], augment)
    got, ours_stats = ours(files, augment)
    assert [s.tolist() for s in got] == expected
    assert all(s.size == 1024 and s.dtype == np.uint16 for s in got)
    seqcount, rest_count, _, _, _, discarded, truncations = stats
    assert (ours_stats.num_sequences, ours_stats.num_rests, ours_stats.num_dropped_overflow,
            ours_stats.num_truncated) == (seqcount, rest_count, discarded, truncations)
    return got


@pytest.mark.parametrize("path", MIDI_FILES, ids=lambda p: p.stem)
def test_augment_1_identical_to_amt_per_file(path):
    assert_same([path], 1)


def test_augment_1_identical_to_amt_all_files_one_stream():
    got = assert_same(MIDI_FILES, 1)
    assert len(got) == 70


@pytest.mark.slow
def test_augment_10_identical_to_amt():
    """AMT's training augmentation (spans, random, instrument subsets) with the same RNG draws."""
    got = assert_same(SMALL_FILES + [MIDI_DIR / "music21_test04_beethoven_sym7_mvt2.mid"], 10)  # 10 instruments
    flags = {int(s[0]) for s in got}
    assert flags == {ref.AUTOREGRESS, ref.ANTICIPATE}


def test_drop_reasons():
    def ev(n, span_s, instrs=1):
        t = np.linspace(0, span_s * TIME_RESOLUTION, n).astype(np.int64)
        note = NOTE_OFFSET + 128 * (np.arange(n) % instrs) + 60
        return np.stack([t, np.full(n, DUR_OFFSET + 10), note], 1)

    assert drop_reason(ev(99, 60)) == "few_events"
    assert drop_reason(ev(200, 9.9)) == "short"
    assert drop_reason(ev(200, 3601)) == "long"
    assert drop_reason(ev(200, 60, instrs=17)) == "instruments"
    assert drop_reason(ev(200, 60, instrs=16)) is None


events_strategy = st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 999), st.integers(0, 16511)),
                           min_size=1, max_size=60)


def _arr(rows):
    rows = sorted(rows, key=lambda r: r[0])
    return np.array([[t, DUR_OFFSET + d, NOTE_OFFSET + n] for t, d, n in rows], np.int64)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(events_strategy, st.integers(0, 500))
def test_pad_matches_amt_and_leaves_no_gap_over_1s(rows, extra_end):
    ev = _arr(rows)
    end = int(ev[:, 0].max()) + extra_end
    got = pad(ev, end)
    assert got.ravel().tolist() == ref.pad(ev.ravel().tolist(), end)
    times = np.concatenate([[0], got[:, 0], [end]])
    assert np.diff(times).max(initial=0) <= TIME_RESOLUTION
    assert (got[got[:, 2] != REST] == ev).all()


@settings(max_examples=80, deadline=None, database=None, derandomize=True)
@given(events_strategy, st.lists(st.booleans(), min_size=60, max_size=60))
def test_interleaving_matches_amt_and_invariant(rows, is_ctrl):
    """Each control comes right after the first event whose time >= its time - delta (or first,
    if that holds from the start), and events keep their order."""
    ev = _arr(rows)
    mask = np.array(is_ctrl[:len(ev)])
    events = pad(ev[~mask], int(ev[:, 0].max()))
    controls = ev[mask] + CONTROL_OFFSET
    got, left = anticipate(events, controls)
    exp, exp_left = ref.anticipate(events.ravel().tolist(), controls.ravel().tolist())
    assert got.ravel().tolist() == exp and left.ravel().tolist() == exp_left
    delta = DELTA * TIME_RESOLUTION
    is_c = got[:, 2] >= CONTROL_OFFSET
    placed = controls[:len(controls) - len(left)]
    assert (got[~is_c] == events).all() and (got[is_c] == placed).all()
    if len(events):  # left over: exactly the controls not yet due when the last event comes
        last_anchor = events[-2, 0] if len(events) > 1 else 0
        due = controls[:, 0] - ATIME_OFFSET - delta <= last_anchor
        assert len(left) == np.count_nonzero(~due)
    for i in np.flatnonzero(is_c):
        ctime = got[i, 0] - ATIME_OFFSET
        before = got[:i][~is_c[:i]]
        first = np.flatnonzero(events[:, 0] >= ctime - delta)
        if ctime - delta <= 0:
            continue  # due from the start: may precede every event
        assert first.size and len(before) == first[0] + 1, "control not right after its anchor event"


def test_relativize_shifts_first_piece_only_and_drops_overflow():
    piece = [500, DUR_OFFSET + 1, NOTE_OFFSET + 60, 900, DUR_OFFSET, REST]
    seq = np.array(piece + [SEPARATOR] * 3 + [4, DUR_OFFSET + 2, NOTE_OFFSET + 61], np.int64)
    out = relativize(seq)
    assert out.tolist() == ref.translate(seq.tolist(), -ref.min_time(seq.tolist(), seconds=False))
    assert out[0] == 0 and out[3] == 400 and out[-3] == 4
    far = np.array([0, DUR_OFFSET, NOTE_OFFSET, 10000, DUR_OFFSET, NOTE_OFFSET], np.int64)
    assert relativize(far) is None
