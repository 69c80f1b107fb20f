"""amtrain.evaluate: each statistic on hand-built inputs with known answers, held-out data scored
against itself, token validity per modality, the statistics of rollouts during training, the
scaling table's rollout columns and plot, and `amtrain evaluate` on a MIDI, an audio and a text
model writing both JSON files and the PNGs. (The 2-rank run whose rollout statistics land in
metrics.jsonl: tests/test_train_dist.py::test_two_ranks_zero3_and_export.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from amtrain.cli import app
from amtrain.evaluate import music
from amtrain.evaluate.sets import compare_sets, flat, set_stats
from amtrain.evaluate.stats import (
    compare,
    distinct_n,
    emd,
    entropy_bits,
    kl_bits,
    overlap,
    repetition_share,
)
from amtrain.midi.events import Notes
from amtrain.registry import modality_of
from amtrain.tokens import get_tokenizer
from tests.rollout_helpers import MIDI, codec_folder, decoder_ckpt

REPO = Path(__file__).resolve().parents[1]


def notes(pitch, time, dur, instr=0, velocity=64) -> Notes:
    n = len(pitch)
    full = np.full(n, 0, np.int64)
    return Notes(np.asarray(time, np.int64), np.asarray(dur, np.int64), np.asarray(pitch, np.int64),
                 full + instr, full + velocity)


C_MAJOR = notes([60, 62, 64, 65, 67, 69, 71], [50 * i for i in range(7)], [50] * 7)  # 7 notes, 0.5 s each


# ------------------------------------------------------------------ statistics with known answers
def test_c_major_scale():
    assert music.pitch_class_entropy(C_MAJOR) == pytest.approx(math.log2(7))
    s = music.piece_scalars(C_MAJOR)
    assert s["pitch_range"] == 11 and s["pitch_classes_used"] == 7
    assert s["polyphony"] == 1.0  # one note at a time
    assert s["seconds"] == 3.5 and s["note_density"] == pytest.approx(2.0)
    assert np.allclose(music.iois(C_MAJOR), 0.5) and np.allclose(music.durations(C_MAJOR), 0.5)
    chord = notes([60, 64, 67, 72], [0, 0, 0, 0], [100, 100, 100, 100])
    assert music.polyphony(chord) == 4.0 and music.iois(chord).size == 0
    assert music.pitch_class_entropy(chord) == pytest.approx(1.5)  # C twice, E, G: -(.5 log .5 + 2 .25 log .25)
    hists = music.histograms([C_MAJOR, chord], velocity=True)
    assert hists["pitch_class"][0].tolist() == [3, 0, 1, 0, 2, 1, 0, 2, 0, 1, 0, 1]
    assert hists["velocity"][0][64 // 8] == 11 and hists["velocity"][0].sum() == 11  # velocity 64: bin [64, 72)
    assert hists["ioi"][0].sum() == 6 and "velocity" not in music.histograms([C_MAJOR], velocity=False)
    drums = notes([36, 38], [0, 50], [10, 10], instr=128)
    assert music.pitch_range(drums) == 0 and music.polyphony(drums) == 0.0  # drums have no pitch


def test_repetition_and_distinct_n():
    phrase = list("abcd")
    assert repetition_share(phrase, 2) == 0.0
    assert repetition_share(phrase * 2, 4) == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert repetition_share(phrase * 2, 2) == pytest.approx(3 / 7)
    assert repetition_share(phrase * 50, 4) == pytest.approx(1 - 4 / 197)  # a loop: nearly all repeats
    assert repetition_share(["a"], 4) == 0.0
    assert distinct_n([["a", "b"], ["a", "b"]], 1) == 0.5 and distinct_n([["a", "b"], ["a", "b"]], 2) == 0.5
    assert distinct_n([list("abc"), list("def")], 2) == 1.0


def test_histogram_comparisons():
    p = np.array([1, 2, 3, 4])
    assert overlap(p, 10 * p) == pytest.approx(1.0) and kl_bits(p, p) == pytest.approx(0.0)
    assert overlap([1, 0], [0, 1]) == 0.0 and kl_bits([1, 0], [0, 1]) > 10
    assert overlap([1, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(0.5)
    assert emd([0, 1, 0], [0, 0, 1], [0.0, 1.0, 2.0]) == pytest.approx(1.0)  # one bin to the right
    assert entropy_bits(np.ones(12)) == pytest.approx(math.log2(12)) and entropy_bits([0, 0]) == 0.0
    assert compare(p, p, np.arange(4.0)) == {"overlap": pytest.approx(1.0), "kl_bits": pytest.approx(0.0),
                                             "emd": pytest.approx(0.0)}


# ------------------------------------------------------------------ modalities and held-out data
@pytest.fixture(scope="module")
def midi_data(tmp_path_factory):
    from amtrain.prep.midi import MidiPrepConfig, prep_midi

    out = tmp_path_factory.mktemp("midi_ds")
    prep_midi([str(REPO / "data" / "midi")], out, MidiPrepConfig(split="ratio", val_fraction=0.3, test_fraction=0.0),
              show_progress=False)
    return out


def _docs(folder, split="val", n=8):
    from amtrain.store import Dataset

    return [np.asarray(d, np.int64) for d, _ in zip(Dataset(folder).documents(split), range(n), strict=False)]


def test_heldout_against_itself_overlaps_perfectly(midi_data, kjv_ascii):
    for folder, name in ((midi_data, "midi"), (kjv_ascii, "ascii")):
        docs = [d[:601] for d in _docs(folder)]  # MIDI: the flag + 200 whole triples
        m, tok = modality_of(name), get_tokenizer(name)
        stats = set_stats(m, tok, docs)
        c = compare_sets(stats, set_stats(m, tok, docs))
        assert c["histograms"], name
        for k, h in c["histograms"].items():
            assert h["overlap"] == pytest.approx(1.0) and h["kl_bits"] == pytest.approx(0.0, abs=1e-9), k
            assert h.get("emd", 0.0) == pytest.approx(0.0, abs=1e-9), k
        assert all(v["overlap"] == pytest.approx(1.0) for v in c["per_item"].values())
        assert flat(stats)["invalid_share"] == 0.0  # real data obeys its grammar
    assert set(c["histograms"]) == {"word_length"} and stats.units == "words"
    midi = set_stats(modality_of("midi"), get_tokenizer("midi"), _docs(midi_data))
    assert midi.units == "notes" and {"pitch_class", "pitch", "ioi", "duration"} <= set(midi.hists)
    assert "velocity" not in midi.hists  # AMT ids carry no velocity (Modality.has_velocity)


def test_units_are_words_notes_and_frames():
    text = modality_of("ascii")
    tok = get_tokenizer("ascii")
    assert text.units(tok, np.array([tok.eot_id] + tok.encode("in the beginning"), np.int64)) == (
        "words", ["in", "the", "beginning"])
    from amtrain.midi.events import notes_to_events, read_notes

    events, _ = notes_to_events(read_notes(MIDI))
    ids = np.concatenate([[get_tokenizer("midi").special_ids["AUTOREGRESS"]],
                          events[np.argsort(events[:, 0], kind="stable")].ravel()])
    name, units = modality_of("midi").units(get_tokenizer("midi"), ids)
    assert name == "notes" and len(units) == len(read_notes(MIDI))
    atok = get_tokenizer("audio", num_codebooks=2, layout="delay")
    codes = np.arange(10).reshape(2, 5) % 3
    stream = np.concatenate([[atok.eot_id], atok.encode(codes).astype(np.int64)])
    name, frames = modality_of("audio").units(atok, stream)
    assert name == "frames" and frames == [tuple(c) for c in codes.T.tolist()]


def test_invalid_ids_follow_each_grammar(midi_data):
    from amtrain.tokens.midi import AUTOREGRESS, DUR_OFFSET, NOTE_OFFSET, TIME_OFFSET

    midi, mtok = modality_of("midi"), get_tokenizer("midi")
    tri = np.array([[TIME_OFFSET + 10 * i, DUR_OFFSET + 10, NOTE_OFFSET + 60 + i] for i in range(6)])
    doc = np.concatenate([[AUTOREGRESS], tri.ravel()])
    assert not midi.invalid_ids(mtok, doc).any()
    assert not midi.invalid_ids(mtok, _docs(midi_data, n=1)[0]).any()  # prepped data (controls, RESTs)
    bad = doc.copy()
    bad[1 + 3 * 4] = TIME_OFFSET + 5  # event 4's onset before event 3's
    bad[2] = TIME_OFFSET + 3  # event 0's duration slot holds a time id
    assert np.flatnonzero(midi.invalid_ids(mtok, bad)).tolist() == [2, 13]
    assert midi.invalid_ids(mtok, doc[:-1])[-2:].all()  # a partial triple
    audio = modality_of("audio")
    atok = get_tokenizer("audio", num_codebooks=2, layout="delay")
    stream = np.concatenate([[atok.eot_id], atok.encode(np.zeros((2, 6), np.int64)).astype(np.int64)])
    assert not audio.invalid_ids(atok, stream).any()
    swapped = stream.copy()
    swapped[3] = 1024 + 5  # codebook 1's id where codebook 0 belongs
    swapped[5] = atok.pad_id  # a <pad> inside the piece
    assert np.flatnonzero(audio.invalid_ids(atok, swapped)).tolist() == [3, 5]
    text, ttok = modality_of("ascii"), get_tokenizer("ascii")
    assert text.invalid_ids(ttok, np.array([0, ttok.vocab_size])).tolist() == [False, True]


# ------------------------------------------------------------------ rollouts during training, scaling
def test_training_rollout_hook_measures_midi(tmp_path):
    from amtrain.models.io import load_pretrained
    from amtrain.train.rollouts import rollout_hook

    model, _ = load_pretrained(decoder_ckpt(tmp_path / "m", "midi", max_seq_len=64))
    out = rollout_hook(model, [MIDI], tokenizer=get_tokenizer("midi"), step=3, run_dir=tmp_path, length=30)
    assert out["files"] and out["tokens"] == 31.0  # the flag + 10 new triples
    assert out["units"] <= 10 and 0 <= out["pitch_class_entropy"] <= math.log2(12)
    assert {"polyphony", "note_density", "rep_4", "distinct_1", "invalid_share"} <= set(out)
    assert out["invalid_share"] == 0.0  # sampled under the AMT grammar


def test_scaling_rollout_columns_and_stat_plot(tmp_path):
    from amtrain.commands.evaluate import best_run
    from amtrain.scaling.results import RESULT_COLUMNS, append_result, read_results

    base = {k: 0 for k in RESULT_COLUMNS} | {"arch": "transformer", "run_dir": "runs/a"}
    table = tmp_path / "results.csv"
    append_result(table, base | {"size": "debug", "params": 10, "non_embedding_params": 1000, "val_loss": 3.0})
    append_result(table, base | {"size": "tiny", "params": 20, "non_embedding_params": 9000, "val_loss": 2.0,
                                 "run_dir": "runs/b", "rollout_pitch_class_entropy": 2.5})
    rows = read_results(table)
    assert rows[0]["rollout_pitch_class_entropy"] is None and rows[1]["rollout_pitch_class_entropy"] == 2.5
    ev = tmp_path / "evaluation_results.json"
    ev.write_text(json.dumps({"heldout": {"pitch_class_entropy": 2.4}}))
    r = CliRunner().invoke(app, ["scaling", "plot", str(table), "--out", str(tmp_path / "p"),
                                 "--stat", "pitch_class_entropy", "--num-boot", "2", "--heldout", str(ev)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["scaling", "plot", str(table), "--out", str(tmp_path / "p"), "--heldout", str(table)])
    assert r.exit_code != 0 and "not an evaluation_results.json" in str(r.exception)
    assert (tmp_path / "p" / "pitch_class_entropy_vs_params.png").stat().st_size > 1000
    r = CliRunner().invoke(app, ["scaling", "plot", str(table), "--out", str(tmp_path / "p"), "--stat", "nope"])
    assert r.exit_code != 0 and "rollout_pitch_class_entropy" in str(r.exception)
    run, line = best_run(tmp_path)
    assert run == tmp_path / "runs" / "b" and "tiny" in line


# ------------------------------------------------------------------ amtrain evaluate on three modalities
def _evaluate(run: Path, data: Path, out: Path, *extra: str) -> dict:
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--out", str(out), "--samples", "2",
                                 "--no-progress", "--loss-tokens", "512", "--heldout-docs", "4", *extra])
    assert r.exit_code == 0, (r.output, r.exception)
    results = json.loads((out / "evaluation_results.json").read_text())
    meta = json.loads((out / "samples_metadata.json").read_text())
    assert len(meta["samples"]) == 2 and meta["samples"][1]["seed"] == 1
    assert all(Path(f).is_file() for s in meta["samples"] for f in s["files"])
    assert all(Path(p).stat().st_size > 1000 for p in results["pngs"]) and (out / "per_sample.png").is_file()
    return results | {"_meta": meta}


def test_evaluate_midi_run(midi_data, tmp_path):
    res = _evaluate(decoder_ckpt(tmp_path / "m", "midi", max_seq_len=64), midi_data, tmp_path / "e", "--length", "45")
    assert res["_meta"]["samples"][0]["prompt"].startswith("unconditional")
    assert res["heldout_loss"]["loss"] > 0 and "event_ppl" in res["heldout_loss"]
    assert res["samples"]["invalid_share"] == 0 and res["units"] == "notes"
    assert {"pitch_class", "ioi", "duration", "pitch"} <= set(res["comparison"]["histograms"])
    assert (tmp_path / "e" / "histograms.png").is_file() and (tmp_path / "e" / "pianoroll_0.png").is_file()
    assert (tmp_path / "e" / "samples" / "sample_0.mid").is_file()


def test_evaluate_text_run(kjv_ascii, tmp_path):
    res = _evaluate(decoder_ckpt(tmp_path / "t", "ascii", max_seq_len=32), kjv_ascii, tmp_path / "e", "--length", "40")
    assert res["units"] == "words" and res["samples"]["tokens"] == 41  # <eot> + 40
    assert res["heldout_loss"]["bits_per_token"] == pytest.approx(res["heldout_loss"]["loss"] / math.log(2))
    assert "word_length" in res["comparison"]["histograms"] and (tmp_path / "e" / "histograms.png").is_file()
    assert (tmp_path / "e" / "samples" / "sample_0.txt").is_file()


def test_evaluate_audio_run(tmp_path):
    import soundfile as sf

    from amtrain.prep.audio import AudioPrepConfig, prep_audio
    from tests.audio_helpers import JOPLIN

    codec = codec_folder(tmp_path / "codec")
    y, sr = sf.read(JOPLIN, dtype="float32", frames=24000 * 4)
    clips = []
    for i in range(2):  # one of the two lands in val (by its hash, val_fraction 0.5)
        clips.append(tmp_path / f"clip{i}.wav")
        sf.write(clips[-1], y[i * 48000:(i + 1) * 48000], sr)
    prep_audio([str(c) for c in clips], tmp_path / "ds", AudioPrepConfig(
        codec_path=str(codec), bandwidth=1.5, chunk_seconds=1.0, window_seconds=2.0, val_fraction=0.5),
        show_progress=False)
    ckpt = decoder_ckpt(tmp_path / "a", "audio", {"num_codebooks": 2, "layout": "delay"}, max_seq_len=64)
    res = _evaluate(ckpt, tmp_path / "ds", tmp_path / "e", "--codec-path", str(codec), "--length", "40")
    assert res["_meta"]["samples"][0]["prompt"].startswith("held-out document")
    assert res["units"] == "frames" and res["samples"]["units"] == 20  # 40 tokens, 2 codebooks
    assert 0 < res["samples"]["codebook_0_used"] <= 1 and res["samples"]["invalid_share"] == 0
    feats = res["audio_chunk_features"]
    assert set(feats) == {"flux", "rms_db", "novelty", "stability", "priority"}
    assert feats["priority"]["chunks"][0] == 2 and feats["priority"]["chunks"][1] >= 1  # a chunk per sample
    assert (tmp_path / "e" / "samples" / "sample_0.wav").is_file() and (tmp_path / "e" / "histograms.png").is_file()


def test_evaluate_study_needs_best(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", "--study", str(tmp_path)])
    assert r.exit_code != 0 and "--best" in str(r.exception)


def test_heldout_loss_takes_the_trainers_validation_windows(one_process, kjv_gpt2):
    """On the windows the trainer validated on (2 micro-batches of 4 x 64 tokens), the held-out
    loss is the run's final val_loss."""
    from amtrain.evaluate.heldout import heldout_loss
    from amtrain.rollout.load import load_rollout_model
    from amtrain.store import Dataset

    rm = load_rollout_model(one_process.run_dir)
    loss = heldout_loss(rm.model, Dataset(kjv_gpt2), "val", 64, 2 * 4 * 64, batch=4)
    assert loss["tokens"] == 512 and loss["loss"] == pytest.approx(one_process.val_loss, rel=1e-5)
