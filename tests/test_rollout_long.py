"""Long prompts through T5: MIDI continuation past AMT's 100 s (windows re-based like the
decoder's; the written .npy decodes to the notes of the written .mid) and the encoder input
bounded by --t5-context whatever the prompt's length (audio in-filling and continuation), with a
one-line note saying what was left out. Tiny random checkpoints (tests/rollout_helpers.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from amtrain.errors import UserError
from amtrain.generate.amt import triple_times
from amtrain.midi.decode import ids_to_notes
from amtrain.rollout.load import load_rollout_model
from amtrain.rollout.run import RolloutConfig, read_prompt, rollout, write_tapes
from amtrain.tokens.midi import (
    AUTOREGRESS,
    DUR_OFFSET,
    MAX_DUR,
    MAX_TIME,
    NOTE_OFFSET,
    REST,
    TIME_OFFSET,
)
from tests.rollout_helpers import MIDI, REPO, decoder_ckpt, t5_ckpt

LONG_MIDI = REPO / "data" / "midi" / "music21_test03_soprano_piano.mid"  # 1391 notes, 160 s


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return {"t5_midi": t5_ckpt(d / "t5_midi", "midi"), "midi": decoder_ckpt(d / "midi", "midi", max_seq_len=64),
            "t5_audio": t5_ckpt(d / "t5_audio", "audio", {"num_codebooks": 2, "layout": "delay"})}


def encoder_inputs(rm, monkeypatch) -> list:
    """Every input_ids (B, S) the T5 encoder is given from now on."""
    seen, encode = [], rm.model.encode

    def spy(input_ids, attention_mask=None):
        seen.append(input_ids.cpu().numpy())
        return encode(input_ids, attention_mask)

    monkeypatch.setattr(rm.model, "encode", spy)
    return seen


def mid_notes(path) -> Counter:
    """(time, duration, pitch, instrument) of every note in a written .mid, track by track (one
    track per instrument, 1 tick = 10 ms): what the file holds, whatever its channels."""
    import symusic

    score = symusic.Score(str(path))
    return Counter((n.time, n.duration, n.pitch, 128 if t.is_drum else t.program) for t in score.tracks for n in t.notes)


def npy_notes(path) -> Counter:
    notes, rep = ids_to_notes(np.load(path))
    assert rep.num_invalid == rep.num_malformed == 0, rep.summary()
    return Counter(zip(notes.time.tolist(), notes.dur.tolist(), notes.pitch.tolist(), notes.instr.tolist(), strict=True))


def test_t5_midi_continuation_past_100_s_and_npy_decodes_to_the_mid(ckpts, tmp_path, monkeypatch, capsys):
    rm = load_rollout_model(ckpts["t5_midi"])
    cfg = RolloutConfig(length=150, seed=0, t5_context=96, stride=30, num_samples=2)
    tape = read_prompt(rm, LONG_MIDI, cfg)
    last = int(tape.triples[:, 0].max()) - TIME_OFFSET
    assert last > 1.5 * MAX_TIME
    inputs = encoder_inputs(rm, monkeypatch)
    out = rollout(rm, tape, cfg)
    assert "note: T5 continuation: each round's encoder sees at most the last" in capsys.readouterr().err
    assert len(inputs) == 5  # 50 events, 10 a round
    vocab = rm.t5_vocab()
    for x in inputs:  # [S] flag triples EOS: a window within the context, times re-based to 0, < 100 s
        assert x.shape[1] <= cfg.t5_context and (x[:, 1] == AUTOREGRESS).all() and (x[:, -1] == vocab.eos_id).all()
        times = x[:, 2:-1].reshape(len(x), -1, 3)[:, :, 0]
        assert (times.min(1) == 0).all() and times.max() < MAX_TIME // 2
    for res in out:
        assert np.array_equal(res.triples[:len(tape.triples)], tape.triples) and len(res.triples) == len(tape.triples) + 50
        new = res.triples[len(tape.triples):]
        onsets = new[:, 0] - TIME_OFFSET
        assert (onsets >= last).all() and (np.diff(onsets) >= 0).all()  # after the prompt, in order
        assert ((new[:, 1] >= DUR_OFFSET) & (new[:, 1] < DUR_OFFSET + MAX_DUR)).all()
        assert ((new[:, 2] >= NOTE_OFFSET) & (new[:, 2] <= REST)).all()
    files = write_tapes(rm, out, tmp_path)
    for i, res in enumerate(out):
        mid, npy = tmp_path / f"sample_{i}.mid", tmp_path / f"sample_{i}.npy"
        assert mid in files and npy in files
        assert npy_notes(npy) == mid_notes(mid)
        assert sum(mid_notes(mid).values()) == int((res.triples[:, 2] != REST).sum())
        again = read_prompt(rm, npy, cfg)  # the .npy is a prompt again, times and all
        assert again.flag == res.flag and np.array_equal(again.triples, res.triples)


def test_decoder_midi_continuation_npy_of_a_long_piece_decodes_to_the_mid(ckpts, tmp_path):
    rm = load_rollout_model(ckpts["midi"])
    cfg = RolloutConfig(length=2.0, seconds=True, seed=0)
    tape = read_prompt(rm, LONG_MIDI, cfg)
    out = rollout(rm, tape, cfg)
    assert triple_times(out[0].triples).max() > MAX_TIME
    write_tapes(rm, out, tmp_path)
    assert npy_notes(tmp_path / "sample_0.npy") == mid_notes(tmp_path / "sample_0.mid")


@pytest.mark.parametrize("seconds", [2, 20])
def test_t5_audio_encoder_input_never_exceeds_t5_context(ckpts, monkeypatch, capsys, seconds):
    """Memory: the encoder is shown at most --t5-context tokens however long the prompt (its
    attention and position bias grow with the square); the note says how much was left out;
    in-filling still keeps every frame outside the range exactly."""
    rm = load_rollout_model(ckpts["t5_audio"])
    rate, K = 75.0, 2
    codes = np.random.default_rng(seconds).integers(0, 1024, (K, int(seconds * rate)))
    inputs = encoder_inputs(rm, monkeypatch)
    cfg = RolloutConfig(mode="infill", infill_range=(0.8, 1.2), seed=0, frame_rate=rate, t5_context=64)
    (res,) = rollout(rm, codes, cfg)
    a, b = 60, 90
    assert res.shape == codes.shape and np.array_equal(res[:, :a], codes[:, :a]) and np.array_equal(res[:, b:], codes[:, b:])
    assert not np.array_equal(res[:, a:b], codes[:, a:b])
    err = capsys.readouterr().err.strip().splitlines()
    n = codes.shape[1]
    assert err == [f"note: T5 in-fill: the encoder sees 15 frames (0.20 s) before the range and 15 frames (0.20 s) "
                   f"after it; {n - 60} frames ({(n - 60) / rate:.2f} s) of the prompt's {n} frames "
                   f"({n / rate:.2f} s) are not shown to it (--t5-context 64) and are kept as they are"]
    cfg = RolloutConfig(length=0.2, seconds=True, seed=0, frame_rate=rate, t5_context=64)
    (res,) = rollout(rm, codes, cfg)
    assert res.shape == (K, n + 15) and np.array_equal(res[:, :n], codes)
    assert "note: T5 continuation: each round's encoder sees the last 16 frames (0.21 s)" in capsys.readouterr().err
    assert inputs and max(x.shape[1] for x in inputs) <= 64


def test_t5_midi_infill_encoder_input_never_exceeds_t5_context(ckpts, monkeypatch, capsys):
    from amtrain.midi.tokenize import pad

    rm = load_rollout_model(ckpts["t5_midi"])
    cfg = RolloutConfig(mode="infill", infill_range=(8.0, 12.0), seed=0, max_span=30, t5_context=64)
    tape = read_prompt(rm, MIDI, cfg)  # 22 s, 163 notes
    inputs = encoder_inputs(rm, monkeypatch)
    tri = rollout(rm, tape, cfg)[0].triples
    assert len(inputs) == 1 and inputs[0].shape[1] <= 64
    src = pad(tape.triples, int(tape.triples[:, 0].max()))  # T5 sees the REST-padded sequence
    head, tail = src[src[:, 0] < 800], src[src[:, 0] >= 1200]
    assert np.array_equal(tri[:len(head)], head) and np.array_equal(tri[len(tri) - len(tail):], tail)
    gap = tri[len(head):len(tri) - len(tail)]
    assert len(gap) >= 1 and ((gap[:, 0] >= 800) & (gap[:, 0] < 1200)).all()
    err = capsys.readouterr().err
    assert err.startswith("note: T5 in-fill: the encoder sees 10 events before the range and 10 after it; ")
    assert f"of the prompt's {len(src)} events are not shown to it (--t5-context 64)" in err


def test_t5_audio_short_prompt_is_shown_whole_without_a_note(ckpts, monkeypatch, capsys):
    rm = load_rollout_model(ckpts["t5_audio"])
    codes = np.random.default_rng(0).integers(0, 1024, (2, 20))
    inputs = encoder_inputs(rm, monkeypatch)
    cfg = RolloutConfig(mode="infill", infill_range=(0.08, 0.16), seed=0, frame_rate=75.0, t5_context=64)
    rollout(rm, codes, cfg)
    stream = rm.tokenizer.encode(codes)
    assert inputs[0].shape[1] == 2 + 1 + len(stream) - (12 + 1 - 6) * 2  # [X] prefix <s_0> suffix EOS: all of it
    assert capsys.readouterr().err == ""


def test_t5_context_too_small_for_the_range_is_a_clear_error(ckpts, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app

    np.save(tmp_path / "p.npy", np.concatenate([[AUTOREGRESS], read_prompt(load_rollout_model(ckpts["t5_midi"]),
                                                                           LONG_MIDI, RolloutConfig()).triples[:200].ravel()]))
    r = CliRunner().invoke(app, ["rollout", str(ckpts["t5_midi"]), "--prompt", str(tmp_path / "p.npy"), "--out",
                                 str(tmp_path / "o"), "--length", "30", "--t5-context", "6", "--stride", "3"])
    assert r.exit_code != 0 and "--t5-context 6" in str(r.exception)
    rm = load_rollout_model(ckpts["t5_audio"])
    cfg = RolloutConfig(mode="infill", infill_range=(0.1, 0.2), frame_rate=75.0, t5_context=6)
    with pytest.raises(UserError, match="--t5-context 6: too small"):
        rollout(rm, np.zeros((2, 100), np.int64), cfg)
