"""Prep under faults ([hardening] 4, 6, 7, 9, 11): each test makes the fault happen and checks
what the user gets.

4  a folder holding another dataset: refused in one line, or added to with --append; a lock
   stops a second writer; `inspect --validate` names orphaned shards and leftover temp files.
6  a float WAV with NaN/inf samples is skipped by name; the batch and its manifest go on.
7  an MP3 whose last frame is damaged keeps what decodes (warned, in the manifest); a mostly
   unreadable one is skipped before the codec runs; random bytes say "not an audio file".
9  a full disk or a read-only folder is one error line naming the path and the cause, for text,
   MIDI and audio prep; no temporary file is left; finished units are kept and a rerun resumes.
11 thousands of tiny text files pack into few shards with the same tokens as their concatenation
   and give training windows.

Disk-full and read-only faults are injected by tests/fault_helpers.py (tests run as root, so
chmod cannot make a folder read-only); `test_real_tmpfs_full_and_read_only` repeats the text
case on a real size-limited, then read-only, tmpfs where mounting is allowed.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_helpers import JOPLIN, MELODY, random_model, save_codec

from amtrain.data.loader import WindowIndex
from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic
from amtrain.prep.audio import AudioPrepConfig, prep_audio
from amtrain.prep.midi import MidiPrepConfig, prep_midi
from amtrain.prep.text import prep_text
from amtrain.store import Dataset
from amtrain.store.dataset import dataset_lock, read_inputs, validate_dataset
from tests.conftest import KJV, REPO
from tests.fault_helpers import FullDisk, ReadOnly, installed, mounted_tmpfs, temp_files
from tests.midi_helpers import SMALL_FILES

MIDI_CFG = MidiPrepConfig(split="ratio", val_fraction=0.0, test_fraction=0.0)


def _cli(*args, fault: tuple[str, int, Path] | None = None, timeout=300):
    pre = [sys.executable, "-m", "tests.fault_helpers", fault[0], str(fault[1]), str(fault[2]), "--"] if fault \
        else [sys.executable, "-m", "amtrain"]
    return subprocess.run([*pre, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})


def _one_error_line(r) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _docs(folder, split="train"):
    return [d.copy() for d in Dataset(folder).documents(split)]


def _shard_bytes(folder):
    return {s.file: (folder / s.file).read_bytes() for s in Dataset(folder).manifest.shards}


def _texts(tmp_path, names):
    verses = [v for v in KJV.read_text().splitlines() if v[:1].isdigit()]
    for k, name in enumerate(names):
        (tmp_path / name).write_text("\n\n".join(verses[40 * k: 40 * k + 40]))
    return [tmp_path / n for n in names]


# ---------------------------------------------------------------- 4: other inputs, append, lock
def test_reprep_with_other_inputs_is_refused_in_one_line(tmp_path):
    a, b = _texts(tmp_path, ["a.txt", "b.txt"])
    out = tmp_path / "ds"
    prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UserError, match=r"made from other inputs \(1 of its input files not in this run, e\.g\. .*a\.txt; "
                       r"1 input file\(s\) new to it, e\.g\. .*b\.txt\); pass --append"):
        prep_text([str(b)], out, tokenizer="ascii", show_progress=False)
    with pytest.raises(UserError, match=r"\(1 input file\(s\) new to it, e\.g\. .*b\.txt\)"):
        prep_text([str(a), str(b)], out, tokenizer="ascii", show_progress=False)
    assert (out / "manifest.json").read_bytes() == before  # nothing dropped, nothing orphaned
    assert validate_dataset(out) == []
    line = _one_error_line(_cli("prep-text", b, "--out", out, "--tokenizer", "ascii"))
    assert str(out) in line and "--append" in line
    again = prep_text([str(a)], out, tokenizer="ascii", show_progress=False)  # the same inputs: resume
    assert again.units_done == 0 and again.units_skipped_finished == 1


def test_other_settings_are_refused_even_when_appending(tmp_path):
    a, b = _texts(tmp_path, ["a.txt", "b.txt"])
    out = tmp_path / "ds"
    prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
    with pytest.raises(UserError, match="made with tokenizer='ascii', this run asks tokenizer='gpt2'"):
        prep_text([str(b)], out, tokenizer="gpt2", append=True, show_progress=False)
    with pytest.raises(UserError, match="made with val_fraction=0.05, this run asks val_fraction=0.2"):
        prep_text([str(a)], out, tokenizer="ascii", val_fraction=0.2, show_progress=False)


def test_append_adds_inputs_and_keeps_the_earlier_data(tmp_path):
    a, b, c = _texts(tmp_path, ["a.txt", "b.txt", "c.txt"])
    out, ref = tmp_path / "ds", tmp_path / "ref"
    prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
    first = _docs(out)
    r = _cli("prep-text", a, b, "--out", out, "--tokenizer", "ascii", "--append")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 input(s) already in it" in r.stderr
    prep_text([str(c)], out, tokenizer="ascii", append=True, show_progress=False)
    prep_text([str(a), str(b), str(c)], ref, tokenizer="ascii", show_progress=False)
    m = Dataset(out).manifest
    assert [Path(i["file"]).name for i in read_inputs(out, m)] == ["a.txt", "b.txt", "c.txt"]
    assert m.num_inputs == 3 and len(list((out / ".inputs").iterdir())) == 1
    assert m.command.count(" && ") == 2 and "--append" in m.command
    for split in ("train", "val"):  # the same documents in the same order as one prep of a, b, c
        got, want = _docs(out, split), _docs(ref, split)
        assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(first, _docs(out), strict=False))  # earlier shards first
    assert validate_dataset(out) == []
    before = (out / "manifest.json").read_bytes()
    prep_text([str(a), str(c)], out, tokenizer="ascii", append=True, show_progress=False)  # nothing new
    assert (out / "manifest.json").read_bytes() == before
    # the same inputs prepped again in one go: one packed unit replaces the three appended ones
    again = prep_text([str(a), str(b), str(c)], out, tokenizer="ascii", show_progress=False)
    assert again.units_done == 1 and _shard_bytes(out) == _shard_bytes(ref) and validate_dataset(out) == []
    assert len(list((out / ".units").iterdir())) == 1 and len(list(out.rglob("*.bin"))) == 2


def test_append_midi_keeps_earlier_streams(tmp_path):
    out = tmp_path / "ds"
    one = prep_midi([str(SMALL_FILES[0])], out, MIDI_CFG, show_progress=False)
    docs_one = [d.tolist() for d in Dataset(out).documents("train")]
    with pytest.raises(UserError, match="pass --append"):
        prep_midi([str(SMALL_FILES[2])], out, MIDI_CFG, show_progress=False)
    two = prep_midi([str(SMALL_FILES[0]), str(SMALL_FILES[2])], out, MIDI_CFG, show_progress=False, append=True)
    assert two.num_files == 1  # the first file is already in the dataset
    only_second = prep_midi([str(SMALL_FILES[2])], tmp_path / "second", MIDI_CFG, show_progress=False)
    docs = [d.tolist() for d in Dataset(out).documents("train")]
    assert docs == docs_one + [d.tolist() for d in Dataset(tmp_path / "second").documents("train")]
    assert len(docs) == one.num_sequences["train"] + only_second.num_sequences["train"]
    assert validate_dataset(out) == []


def test_lock_stops_a_second_writer(tmp_path):
    (a,) = _texts(tmp_path, ["a.txt"])
    out = tmp_path / "ds"
    with dataset_lock(out):
        with pytest.raises(UserError, match=rf"another prep \(pid {os.getpid()} on .*\) is writing this dataset"):
            prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
        line = _one_error_line(_cli("prep-text", a, "--out", out, "--tokenizer", "ascii"))
        assert "another prep" in line and str(out / ".lock") in line
    assert not (out / "manifest.json").exists()
    # a writer killed while holding the lock does not block the next one (the kernel drops it)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from amtrain.store.dataset import dataset_lock\n"
                               f"with dataset_lock({str(out)!r}):\n print('held', flush=True); time.sleep(120)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert prep_text([str(a)], out, tokenizer="ascii", show_progress=False).units_done == 1


def test_validate_reports_orphaned_shards_and_temp_files(tmp_path):
    a, b = _texts(tmp_path, ["a.txt", "b.txt"])
    out, other = tmp_path / "ds", tmp_path / "other"
    prep_text([str(a)], out, tokenizer="ascii", show_progress=False)
    prep_text([str(b)], other, tokenizer="ascii", show_progress=False)
    # what a re-prep with other inputs used to leave: the earlier shards beside a manifest without them
    stray = next((other / "train").glob("*.bin"))
    shutil.copy(stray, out / "train" / stray.name)
    shutil.copy(stray.parent / (stray.stem + ".idx.npy"), out / "train")
    (out / "train" / ".x.bin.tmp4242").write_bytes(b"torn")
    problems = validate_dataset(out)
    assert len(problems) == 3
    assert any(p.startswith(f"{out / 'train' / stray.name}: orphaned shard, not in manifest.json") for p in problems)
    assert any(".x.bin.tmp4242: temporary file left by an interrupted write" in p for p in problems)
    r = _cli("inspect", out, "--validate")
    assert r.returncode == 1 and "orphaned shard" in r.stderr
    prep_text([str(a)], out, tokenizer="ascii", show_progress=False)  # the next prep removes temp files
    assert not (out / "train" / ".x.bin.tmp4242").exists()


# ---------------------------------------------------------------- 9: disk full, read-only
def _full_disk_run(run, out: Path) -> UserError:
    """Measure what `run` writes into a folder, then run it into `out` on a disk that fills half way."""
    measure = out.with_name(out.name + "-measure")
    with installed(FullDisk(measure)) as disk:
        run(measure)
    with installed(FullDisk(out, disk.used // 2)) as full, pytest.raises(UserError) as e:
        run(out)
    assert full.faults == 1
    return e.value


def test_text_disk_full_is_one_line_keeps_finished_units_and_resumes(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run = lambda o: prep_text([str(KJV)], o, unit_bytes=100_000, show_progress=False)  # noqa: E731
    run(ref)
    err = _full_disk_run(run, out)
    msg = str(err)
    assert msg.startswith(str(out)) and "cannot write (no space left on the device); free space there" in msg
    assert "\n" not in msg and isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert temp_files(out) == [] and not (out / "manifest.json").exists()
    finished = len(list((out / ".units").glob("*.json")))
    assert finished >= 2
    s = run(out)
    assert s.units_skipped_finished == finished and _shard_bytes(out) == _shard_bytes(ref)


def test_text_disk_full_through_the_cli(tmp_path):
    out = tmp_path / "out"
    line = _one_error_line(_cli("prep-text", KJV, "--out", out, "--unit-mb", "1", fault=("enospc", 300_000, out)))
    assert line.startswith(f"error: {out}/") and "no space left on the device" in line
    assert temp_files(out) == []


def test_midi_disk_full_is_one_line_and_resumes(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run = lambda o: prep_midi([str(f) for f in SMALL_FILES], o, MIDI_CFG, show_progress=False)  # noqa: E731
    run(ref)
    err = _full_disk_run(run, out)
    assert str(err).startswith(str(out)) and "no space left on the device" in str(err)
    assert temp_files(out) == []
    run(out)
    assert _docs(out) and all(np.array_equal(x, y) for x, y in zip(_docs(out), _docs(ref), strict=True))


@pytest.mark.parametrize("kind", ["text", "midi"])
def test_read_only_output_is_one_line(tmp_path, kind):
    out = tmp_path / "ro"
    out.mkdir()
    args = ["prep-text", KJV] if kind == "text" else ["prep-midi", SMALL_FILES[0], "--workers", "1"]
    line = _one_error_line(_cli(*args, "--out", out, fault=("erofs", 0, out)))
    assert line.startswith(f"error: {out}/") and "cannot write (read-only file system); write to a folder on a writable" in line
    assert list(out.iterdir()) == []


def test_write_errors_name_path_cause_and_fix(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.bin"
    for code, cause in ((errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "disk quota exceeded"),
                        (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")):
        def fail(*a, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "replace", fail)
        with pytest.raises(UserError, match=rf"^{target}: cannot write \({cause}\); \w"):
            write_bytes_atomic(target, b"x")
        assert list((tmp_path / "sub").iterdir()) == []  # the temp file is removed
    def io_error(*a):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(OSError, match="I/O error"):  # not a "cannot write here" cause: passes through
        write_bytes_atomic(target, b"x")


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as mnt:
        yield mnt


def test_real_tmpfs_full_and_read_only(tmpfs, tmp_path):
    """The injected faults above match what the kernel does: a full tmpfs, then a read-only one."""
    big = tmp_path / "big.txt"
    big.write_text(KJV.read_text() * 3)  # 3 units of ~0.4 MB of gpt2 tokens: the third does not fit in 1 MiB
    out = tmpfs / "ds"
    line = _one_error_line(_cli("prep-text", big, "--out", out, "--unit-mb", "1"))
    assert line.startswith(f"error: {out}/") and "no space left on the device" in line
    assert temp_files(out) == [] and list((out / ".units").glob("*.json"))  # finished units kept
    with open(tmpfs / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        while True:  # fill the disk to the last byte: now even the lock file cannot be written
            f.write(b"\0" * 4096)
    line = _one_error_line(_cli("prep-text", KJV, "--out", tmpfs / "full"))
    assert line.startswith(f"error: {tmpfs / 'full'}/") and "no space left on the device" in line
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    line = _one_error_line(_cli("prep-text", KJV, "--out", tmpfs / "other"))
    assert "read-only file system" in line


# ---------------------------------------------------------------- 11: many small files
def test_many_small_files_pack_like_one_big_file(tmp_path):
    verses = [v for v in KJV.read_text().splitlines() if v[:1].isdigit()][:2000]
    src = tmp_path / "src"
    src.mkdir()
    for k, v in enumerate(verses):
        (src / f"{k:04d}.txt").write_text(v + "\n")
    (tmp_path / "all.txt").write_text("\n\n".join(verses) + "\n")
    s = prep_text([str(src)], tmp_path / "many", show_progress=False)
    one = prep_text([str(tmp_path / "all.txt")], tmp_path / "one", show_progress=False)
    shards = list((tmp_path / "many").rglob("*.bin"))
    assert len(shards) == 2 and len(list((tmp_path / "many" / ".units").iterdir())) == 1  # not 2 x 2000
    assert s.tokens == one.tokens and sum(s.tokens.values()) > 40_000
    for split in ("train", "val"):
        got, want = _docs(tmp_path / "many", split), _docs(tmp_path / "one", split)
        assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    windows = len(WindowIndex(Dataset(tmp_path / "many"), "train", 64))
    assert windows > 500 and windows == len(WindowIndex(Dataset(tmp_path / "one"), "train", 64))
    # units of 20 kB: the shard count follows the bytes, not the number of files
    small = prep_text([str(src)], tmp_path / "units", unit_bytes=20_000, show_progress=False)
    sizes = [p.stat().st_size for p in src.iterdir()]
    assert small.units_done <= sum(sizes) // (20_000 - max(sizes)) + 1  # each unit but the last is that full
    assert len(list((tmp_path / "units").rglob("*.bin"))) <= 2 * small.units_done
    assert [d.tobytes() for d in _docs(tmp_path / "units")] == [d.tobytes() for d in _docs(tmp_path / "one")]


def test_packed_units_resume_to_identical_shards(tmp_path, monkeypatch):
    from amtrain.store import DatasetBuilder

    src = tmp_path / "src"
    src.mkdir()
    verses = [v for v in KJV.read_text().splitlines() if v[:1].isdigit()][:600]
    for k, v in enumerate(verses):
        (src / f"{k:04d}.txt").write_text(v)
    prep_text([str(src)], tmp_path / "ref", unit_bytes=5_000, show_progress=False)
    real = DatasetBuilder.write_unit
    calls = {"n": 0}

    def crash_after_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DatasetBuilder, "write_unit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prep_text([str(src)], tmp_path / "out", unit_bytes=5_000, show_progress=False)
    monkeypatch.setattr(DatasetBuilder, "write_unit", real)
    s = prep_text([str(src)], tmp_path / "out", unit_bytes=5_000, show_progress=False)
    assert s.units_skipped_finished == 2 and s.units_done > 5
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")


def test_bad_file_inside_a_pack_is_skipped_by_name_and_retried(tmp_path):
    _texts(tmp_path, ["a.txt", "c.txt"])
    (tmp_path / "b.txt").write_bytes(b"fine\n\nbad \xff here")
    s = prep_text([str(tmp_path / "*.txt")], tmp_path / "o", tokenizer="ascii", errors="strict", show_progress=False)
    assert [Path(i["file"]).name for i in s.skipped] == ["b.txt"] and s.skipped[0]["error"]
    again = prep_text([str(tmp_path / "*.txt")], tmp_path / "o", tokenizer="ascii", errors="strict", show_progress=False)
    assert again.units_done == 1 and [Path(i["file"]).name for i in again.skipped] == ["b.txt"]
    assert Dataset(tmp_path / "o").manifest.skipped == again.skipped
    (tmp_path / "b.txt").write_text("fine\n\nfixed here")  # as the message says: fix it, rerun with --append
    with pytest.raises(UserError, match=r"1 input file\(s\) changed since, e\.g\. .*b\.txt\)"):
        prep_text([str(tmp_path / "*.txt")], tmp_path / "o", tokenizer="ascii", errors="strict", show_progress=False)
    fixed = prep_text([str(tmp_path / "*.txt")], tmp_path / "o", tokenizer="ascii", errors="strict", append=True,
                      show_progress=False)
    assert fixed.skipped == [] and fixed.docs["train"] + fixed.docs["val"] == 2
    texts = [bytes(d[1:].astype(np.uint8)).decode() for d in _docs(tmp_path / "o") + _docs(tmp_path / "o", "val")]
    assert "fixed here" in texts and validate_dataset(tmp_path / "o") == []


# ---------------------------------------------------------------- audio: 6, 7, 9
@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    return save_codec(random_model("24khz"), tmp_path_factory.mktemp("codec"), "hf")


def _cfg(codec_dir):
    return AudioPrepConfig(codec_path=str(codec_dir), chunk_seconds=1.0, window_seconds=2.0)


def _clip(path: Path, seconds: float, subtype=None) -> np.ndarray:
    y, sr = sf.read(MELODY, dtype="float32", frames=int(seconds * 44100))
    sf.write(path, y, sr, subtype=subtype)
    return y


def test_nan_or_inf_wav_is_skipped_and_the_batch_goes_on(tmp_path, codec_dir):
    from librosa.util.exceptions import ParameterError

    from amtrain.prep.audio_features import FeatureParams, frame_features

    good = tmp_path / "good.wav"
    _clip(good, 3.0)
    bad = {}
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        y, sr = sf.read(MELODY, dtype="float32", frames=3 * 44100)
        y[int(1.5 * sr): int(1.5 * sr) + 10] = value
        bad[name] = tmp_path / f"{name}.wav"
        sf.write(bad[name], y, sr, subtype="FLOAT")
        with pytest.raises(ParameterError):  # the fault: what aborted the whole batch before
            frame_features(y, FeatureParams(sr, 320))
    out = tmp_path / "ds"
    for _ in range(2):  # and every rerun crashed the same way
        s = prep_audio([str(tmp_path)], out, _cfg(codec_dir), show_progress=False)
        reasons = {Path(i["file"]).name: i["reason"] for i in s.skipped}
        assert reasons == {f"{n}.wav": "non-finite samples (NaN or inf) from 1.50 s; the file is damaged: re-export it"
                           for n in bad}
        m = Dataset(out).manifest
        assert [Path(r.source).name for r in m.shards] == ["good.wav"] and len(m.skipped) == 2
    r = _cli("prep-audio", bad["nan"], "--out", tmp_path / "ds2", "--codec-path", codec_dir)
    assert r.returncode == 1 and "nan.wav: non-finite samples" in r.stderr and "Traceback" not in r.stderr


def _mp3_frames(raw: bytes) -> list[int]:
    """Offsets of the MPEG-1 Layer III frames of a file as libsndfile/LAME writes it."""
    rates, bitrates = (44100, 48000, 32000), (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
    out, i = [], 0
    while i + 4 <= len(raw) and raw[i] == 0xFF and raw[i + 1] & 0xE0 == 0xE0:
        h = int.from_bytes(raw[i:i + 4], "big")
        out.append(i)
        i += 144000 * bitrates[(h >> 12) & 15] // rates[(h >> 10) & 3] + ((h >> 9) & 1)
    return out


def test_mp3_with_a_damaged_last_frame_keeps_what_decodes(tmp_path, codec_dir):
    clip = tmp_path / "clip.mp3"
    _clip(clip, 6.0)
    raw = bytearray(clip.read_bytes())
    last = _mp3_frames(bytes(raw))[-1]
    raw[last + 4: last + 21] = b"\xff" * 17  # side info: part2_3_length too large
    (tmp_path / "song.mp3").write_bytes(bytes(raw[:-60]))  # and the frame cut short
    info = sf.info(tmp_path / "song.mp3")
    decoded, _ = sf.read(tmp_path / "song.mp3", dtype="float32")
    lost = 1 - len(decoded) / info.frames
    assert 0 < lost < 0.01  # the fault: a small undecodable end, which dropped the whole file before
    sf.write(tmp_path / "decodable.wav", decoded, info.samplerate, subtype="FLOAT")
    out = tmp_path / "ds"
    r = _cli("prep-audio", tmp_path / "song.mp3", tmp_path / "decodable.wav", "--out", out, "--codec-path", codec_dir,
             "--chunk-seconds", "1", "--window-seconds", "2")
    assert r.returncode == 0, r.stderr  # a warning, not an error
    assert "warning" in r.stderr and "song.mp3: kept " in "".join(r.stderr.split("\n"))
    (item,) = Dataset(out).manifest.skipped
    assert Path(item["file"]).name == "song.mp3" and item["error"] is False
    assert item["reason"].startswith(f"kept {len(decoded) / info.samplerate:.2f} s of {info.frames / info.samplerate:.2f} s: the last ")
    song, kept = (np.load(next((out / "codes").glob(f"{n}-*.npz")))["codes"] for n in ("song", "decodable"))
    assert np.array_equal(song, kept)  # exactly what decodes, encoded
    again = prep_audio([str(tmp_path / "song.mp3"), str(tmp_path / "decodable.wav")], out, _cfg(codec_dir), show_progress=False)
    assert again.files_resumed == 2 and again.skipped == [item]  # the warning survives a resume


def test_mostly_unreadable_mp3_is_skipped_before_the_codec_runs(tmp_path, codec_dir, monkeypatch):
    from amtrain.codec import Codec

    clip = tmp_path / "clip.mp3"
    _clip(clip, 6.0)
    raw = clip.read_bytes()
    (tmp_path / "half.mp3").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    calls = []
    real = Codec.encode
    monkeypatch.setattr(Codec, "encode", lambda self, *a: calls.append(1) or real(self, *a))
    s = prep_audio([str(tmp_path / "half.mp3"), str(tmp_path / "noise.mp3")], tmp_path / "ds", _cfg(codec_dir),
                   show_progress=False)
    reasons = {Path(i["file"]).name: i["reason"] for i in s.skipped}
    assert reasons["half.mp3"].startswith("truncated: header declares") and "% of the file is unreadable" in reasons["half.mp3"]
    assert reasons["noise.mp3"] == "unreadable audio: not an audio file (libsndfile finds no wav/flac/ogg/mp3 stream in it)"
    assert calls == []  # nothing was encoded
    prep_audio([str(clip)], tmp_path / "ok", _cfg(codec_dir), show_progress=False)
    assert calls  # (the spy does see encodes)


def test_audio_disk_full_and_read_only_are_one_line(tmp_path, codec_dir):
    clips = [tmp_path / "in" / f"{n}.wav" for n in ("a", "b")]
    clips[0].parent.mkdir()
    _clip(clips[0], 3.0)
    sf.write(clips[1], sf.read(JOPLIN, dtype="float32", frames=3 * 24000)[0], 24000)
    run = lambda o: prep_audio([str(c) for c in clips], o, _cfg(codec_dir), show_progress=False)  # noqa: E731
    run(tmp_path / "ref")
    out = tmp_path / "out"
    err = _full_disk_run(run, out)
    assert str(err).startswith(str(out)) and "cannot write (no space left on the device)" in str(err)
    assert temp_files(out) == []
    s = run(out)
    assert s.files_resumed + s.files_done == 2
    for name in ("codes", "train"):
        a = {p.name: p.read_bytes() for p in (tmp_path / "ref" / name).iterdir()}
        assert a == {p.name: p.read_bytes() for p in (out / name).iterdir()}
    ro = tmp_path / "ro"
    ro.mkdir()
    with installed(ReadOnly(ro)), pytest.raises(UserError, match=rf"^{ro}/\.units: cannot write \(read-only file system\)"):
        run(ro)
