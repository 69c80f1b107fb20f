"""prep-audio end to end on the shipped recordings with a random-weight codec saved to disk:
artifacts, shards that decode back to the codes, bad files skipped by name, resume, windows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from audio_helpers import AUDIO, JOPLIN, MELODY, REPO, random_model, save_codec

from amtrain.codec import load_codec
from amtrain.data.priority import (
    SCHEMA_VERSION,
    PrioritySampler,
    chunk_priorities,
    read_scores,
)
from amtrain.prep.audio import AudioPrepConfig, prep_audio
from amtrain.store import Dataset
from amtrain.store.dataset import validate_dataset
from amtrain.tokens import get_tokenizer

COLUMNS = ["file", "split", "chunk", "start_frame", "end_frame", "start_s", "end_s", "flux", "rms",
           "rms_db", "novelty", "stability", "priority"]


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    return save_codec(random_model("24khz"), tmp_path_factory.mktemp("codec"), "hf")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory, codec_dir):
    out = tmp_path_factory.mktemp("audio_ds")
    s = prep_audio([str(AUDIO)], out, AudioPrepConfig(codec_path=str(codec_dir)), show_progress=False)
    return out, s


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "amtrain", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def _npz(out: Path, stem: str):
    (path,) = (out / "codes").glob(f"{stem}-*.npz")
    return np.load(path), path


def test_codes_npz_has_the_facts(prepped):
    out, s = prepped
    assert s.files_done == 2 and not s.skipped and s.num_chunks == 6 + 4
    z, _ = _npz(out, "joplin_maple_leaf_fluidr3_24k_mono_30s")
    assert z["codes"].dtype == np.int16 and z["codes"].shape == (8, 2250)
    assert int(z["sample_rate"]) == 24000 and float(z["frame_rate"]) == 75.0 and float(z["bandwidth"]) == 6.0
    assert int(z["num_samples"]) == 720000 and str(z["codec_id"]).startswith("encodec_24khz@")
    import hashlib

    assert str(z["source_sha256"]) == hashlib.sha256(JOPLIN.read_bytes()).hexdigest()
    m, _ = _npz(out, "music21_test_audio")  # 44.1 kHz -> resampled to 24 kHz
    assert abs(int(m["num_samples"]) - round(881664 * 24000 / 44100)) <= 1
    assert m["codes"].shape == (8, -(-int(m["num_samples"]) // 320))


def test_single_window_codes_equal_whole_file_encode(prepped, codec_dir):
    out, _ = prepped
    z, _ = _npz(out, "joplin_maple_leaf_fluidr3_24k_mono_30s")  # 30 s file, 30 s window: one window
    y, _ = sf.read(JOPLIN, dtype="float32")
    codes, _ = load_codec(codec_dir).encode(y[None], 6.0)
    assert np.array_equal(z["codes"], codes)


def test_score_table_schema_and_values(prepped):
    out, _ = prepped
    (path,) = (out / "scores").glob("joplin*.parquet")
    table = read_scores(path)
    assert table.column_names == COLUMNS
    meta = pq.read_schema(path).metadata
    assert meta[b"schema_version"] == str(SCHEMA_VERSION).encode() and b"priority_weights" in meta
    d = table.to_pydict()
    assert d["chunk"] == list(range(6)) and d["start_frame"][0] == 0 and d["end_frame"][-1] == 2250
    assert d["start_frame"][1:] == d["end_frame"][:-1]
    assert np.allclose(np.array(d["end_s"]) - np.array(d["start_s"]), 5.0)
    for col in COLUMNS[7:]:
        assert np.all(np.isfinite(d[col])), col
    assert all(p > 0.2 for p in d["priority"])  # music everywhere


def test_shards_decode_back_to_the_codes(prepped):
    out, _ = prepped
    assert validate_dataset(out) == []
    ds = Dataset(out)
    tok = get_tokenizer("audio", **ds.manifest.tokenizer_params)
    assert ds.manifest.tokenizer_params["layout"] == "delay" and ds.manifest.extra["num_codebooks"] == 8
    docs = list(ds.documents("train"))
    assert len(docs) == 10
    stems = sorted(p.stem.rsplit("-", 1)[0] for p in (out / "codes").glob("*.npz"))
    grids = [np.load(next((out / "codes").glob(f"{s}-*.npz")))["codes"] for s in stems]
    expected = [g[:, a:a + 375] for g in grids for a in range(0, g.shape[1], 375)]
    for doc, want in zip(docs, expected, strict=True):
        assert doc[0] == tok.eot_id
        assert np.array_equal(tok.codes(doc[1:]), want)
    pri = chunk_priorities(out, "train")
    tables = [read_scores(p).column("priority").to_numpy() for p in sorted((out / "scores").glob("*.parquet"))]
    assert np.array_equal(pri, np.concatenate(tables))
    assert PrioritySampler(pri).num_documents == len(docs)  # the sampler training uses: one per document


def test_decode_audio_cli_gives_right_length_and_rate(prepped, codec_dir, tmp_path):
    out, _ = prepped
    _, npz = _npz(out, "music21_test_audio")
    r = _cli("decode-audio", npz, tmp_path / "m.wav", "--codec-path", codec_dir)
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "m.wav")
    assert info.samplerate == 24000 and info.channels == 1
    assert info.frames == int(np.load(npz)["num_samples"])
    # token input: one document (5 s chunk) through the dataset's layout
    doc = next(Dataset(out).documents("train"))
    np.save(tmp_path / "doc.npy", np.asarray(doc))
    r = _cli("decode-audio", tmp_path / "doc.npy", tmp_path / "d.wav", "--codec-path", codec_dir, "--dataset", out)
    assert r.returncode == 0, r.stderr
    assert sf.info(tmp_path / "d.wav").frames == 375 * 320
    r = _cli("decode-audio", npz, tmp_path / "x.wav", "--codec-path", tmp_path / "no-weights")
    assert r.returncode == 1 and "no-weights" in r.stderr and "encodec_24khz-d7cc33bc.th" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def _bad_files(folder: Path) -> dict[str, Path]:
    raw = MELODY.read_bytes()
    y, sr = sf.read(MELODY, dtype="float32")
    files = {"truncated": folder / "truncated.wav", "zero_length": folder / "empty.wav",
             "header_only": folder / "cut_header.wav", "bad_mp3": folder / "garbage.mp3",
             "wrong_ext": folder / "notes.txt", "not_flac": folder / "text.flac",
             "truncated_flac": folder / "cut.flac"}
    files["truncated"].write_bytes(raw[: len(raw) // 3])
    files["zero_length"].write_bytes(b"")
    files["header_only"].write_bytes(raw[:30])
    files["bad_mp3"].write_bytes(b"ID3" + bytes(range(256)) * 40)
    files["wrong_ext"].write_text("not audio\n")
    files["not_flac"].write_text("fLaC? no\n")
    sf.write(folder / "full.flac", y, sr)
    full = (folder / "full.flac").read_bytes()
    files["truncated_flac"].write_bytes(full[: len(full) // 2])
    (folder / "full.flac").unlink()
    return files


def test_bad_audio_skipped_by_name_batch_goes_on(tmp_path, codec_dir):
    bad = _bad_files(tmp_path)
    y, sr = sf.read(MELODY, dtype="float32")
    sf.write(tmp_path / "song.mp3", y[: sr * 4], sr)
    sf.write(tmp_path / "good.ogg", y[: sr * 3], sr)
    out = tmp_path / "ds"
    r = _cli("prep-audio", JOPLIN, *bad.values(), tmp_path / "song.mp3", tmp_path / "good.ogg",
             "--out", out, "--codec-path", codec_dir, "--chunk-seconds", "2")
    assert r.returncode == 1
    flat = "".join(r.stderr.split())  # rich wraps long lines on narrow terminals
    for path in bad.values():
        assert "skipped" + str(path) + ":" in flat, path
    reasons = {Path(i["file"]).name: i["reason"] for i in Dataset(out).manifest.skipped}
    assert reasons["truncated.wav"].startswith("truncated") and reasons["cut.flac"].startswith(("truncated", "decoding failed"))
    assert reasons["notes.txt"].startswith("unsupported extension .txt")
    assert all(reasons[p.name].startswith("unreadable audio") for p in (bad["zero_length"], bad["header_only"], bad["bad_mp3"], bad["not_flac"]))
    ds = Dataset(out)
    assert {Path(s.source).name for s in ds.manifest.shards} == {JOPLIN.name, "song.mp3", "good.ogg"}
    assert {Path(i["file"]).name for i in ds.manifest.skipped} == {p.name for p in bad.values()}
    z = np.load(next((out / "codes").glob("song-*.npz")))  # mp3 decoded via libsndfile
    assert abs(int(z["num_samples"]) - 4 * 24000) <= 1200  # mp3 encoder delay/padding


def test_resume_redoes_only_missing_units_identically(tmp_path, codec_dir):
    cfg = AudioPrepConfig(codec_path=str(codec_dir), chunk_seconds=4.0)
    out = tmp_path / "ds"
    first = prep_audio([str(AUDIO)], out, cfg, show_progress=False)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".bin", ".npy", ".npz")}
    again = prep_audio([str(AUDIO)], out, cfg, show_progress=False)
    assert (again.files_done, again.files_resumed) == (0, 2) and first.files_done == 2
    # simulate an interruption that lost one unit's record and codes
    (rec,) = (out / ".units").glob("music21*.json")
    rec.unlink()
    next((out / "codes").glob("music21*.npz")).unlink()
    third = prep_audio([str(AUDIO)], out, cfg, show_progress=False)
    assert (third.files_done, third.files_resumed) == (1, 1)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".bin", ".npy", ".npz")}
    assert after == snapshot


def test_windows_bound_memory_and_agree_with_whole_file(tmp_path, codec_dir):
    """2 s windows with 1 s context: no encode call sees more than 3 s (the causal 24 kHz
    encoder needs no audio after a window), and the codes of the first codebook mostly agree
    with one whole-file encode (the context covers the conv receptive field; only the LSTM
    state differs)."""
    from amtrain.codec import Codec

    seen = []

    class Spy(Codec):
        def encode(self, wave, bandwidth):
            seen.append(wave.shape[1])
            return super().encode(wave, bandwidth)

    import amtrain.prep.audio as prep

    base = load_codec(codec_dir)
    codec = Spy(base.model, base.codec_id)
    cfg = AudioPrepConfig(codec_path=str(codec_dir), chunk_seconds=1.0, window_seconds=2.0, context_seconds=1.0)
    geo = prep.geometry(codec, cfg)
    times = prep.Times()
    enc = prep.encode_stream(prep.read_blocks(JOPLIN, 24000, 1, times), codec, cfg, geo, times)
    assert max(seen) <= 3 * 24000 and len(seen) == 15
    whole, _ = base.encode(sf.read(JOPLIN, dtype="float32")[0][None], 6.0)
    assert enc.codes.shape == whole.shape and len(enc.bounds) == 30
    agree = np.mean(enc.codes[0] == whole[0])
    assert agree > 0.8, agree


@pytest.mark.slow
def test_parallel_workers_match_serial(tmp_path, codec_dir):
    cfg = AudioPrepConfig(codec_path=str(codec_dir), layout="parallel")
    prep_audio([str(AUDIO)], tmp_path / "a", cfg, workers=1, show_progress=False)
    prep_audio([str(AUDIO)], tmp_path / "b", cfg, workers=2, show_progress=False)
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file() and p.suffix in (".bin", ".npy", ".npz"):
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p


@pytest.mark.slow
def test_prep_48k_stereo_and_decode(tmp_path):
    codec_dir = save_codec(random_model("48khz"), tmp_path / "codec48", "original")
    out = tmp_path / "ds"
    cfg = AudioPrepConfig(codec_path=str(codec_dir), codec_model="48khz", bandwidth=3.0, chunk_seconds=2.0,
                          window_seconds=4.0, layout="flatten")
    s = prep_audio([str(MELODY)], out, cfg, show_progress=False)
    assert s.files_done == 1
    npz = next((out / "codes").glob("*.npz"))
    z = np.load(npz)
    n = int(z["num_samples"])
    assert abs(n - 20 * 48000) <= 400 and z["codes"].shape == (2, -(-n // 320))
    assert z["scales"].shape == (-(-n // 48000),)
    r = _cli("decode-audio", npz, tmp_path / "o.wav", "--codec-path", codec_dir)
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "o.wav")
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, n)


def test_plot_audio_writes_png(tmp_path):
    shutil.copy(MELODY, tmp_path / "m.wav")
    r = _cli("plot-audio", tmp_path / "m.wav")
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "m.wav.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_prep_audio_song_wav_works_as_typed(tmp_path, codec_dir):
    """`amtrain prep-audio song.wav`, exactly: weights from the documented search path
    ($AMTRAIN_CODEC_DIR), the dataset into runs/data/song, said in one line. Without weights
    there, one line names the folder and how to make a stand-in."""
    shutil.copy(MELODY, tmp_path / "song.wav")
    env = {**os.environ, "AMTRAIN_CODEC_DIR": str(codec_dir), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "amtrain", "prep-audio", "song.wav"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no --out given: writing the dataset to runs/data/song" in r.stdout
    assert (tmp_path / "runs" / "data" / "song" / "manifest.json").is_file()
    empty = tmp_path / "no-weights"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "amtrain", "prep-audio", "song.wav"], cwd=tmp_path,
                       env={**env, "AMTRAIN_CODEC_DIR": str(empty)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"no EnCodec 24khz weights at {empty}" in r.stderr and f"amtrain codec init {empty}" in r.stderr
