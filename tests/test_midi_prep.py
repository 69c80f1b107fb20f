"""prep-midi end to end: shards equal AMT's sequences, corrupt files skipped by name while the
batch goes on, resume equals uninterrupted, parallel equals serial, splits, variants, and the
--from-tokens passthrough."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from amtrain.midi.events import read_notes
from amtrain.prep.midi import (
    MidiPrepConfig,
    apply_variant,
    file_split,
    import_token_files,
    prep_midi,
)
from amtrain.store import Dataset
from amtrain.tokens.midi import DRUMS, VOCAB_SIZE
from tests import reference_amt as ref
from tests.midi_helpers import MIDI_DIR, MIDI_FILES, smf, vlq


def _docs(folder, split):
    return [d.tolist() for d in Dataset(folder).documents(split)] if split in Dataset(folder).manifest.splits else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The real files plus corrupt ones, in one folder."""
    d = tmp_path_factory.mktemp("midi_in")
    for f in MIDI_FILES:
        shutil.copy(f, d / f.name)
    good = (MIDI_DIR / "music21_k525_mozart_mvt1.mid").read_bytes()
    (d / "zz_truncated.mid").write_bytes(good[: len(good) // 2])
    (d / "zz_empty.mid").write_bytes(b"")
    (d / "zz_text.midi").write_bytes(b"this is not MIDI at all\n")
    (d / "zz_absurd.mid").write_bytes(smf([b"\xff\xff\xff\xff\x7f\x90\x3c\x40\x00\xff\x2f\x00"]))
    notes = b"".join(vlq(48) + bytes([0x90, 60 + i, 64]) + vlq(48) + bytes([0x80, 60 + i, 0]) for i in range(20))
    (d / "yy_valid_but_short.mid").write_bytes(smf([notes + b"\x00\xff\x2f\x00"]))  # 20 notes, 10 s
    return d


@pytest.fixture(scope="module")
def prepped(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("midi_out")
    s = prep_midi([str(corpus)], out, MidiPrepConfig(split="ratio", val_fraction=0.0, test_fraction=0.0),
                  workers=1, show_progress=False)
    return out, s


def test_shards_equal_amt_sequences(prepped):
    out, s = prepped
    expected, stats = ref.tokenize([str(f) for f in MIDI_FILES], 1)
    assert _docs(out, "train") == expected
    assert s.num_sequences["train"] == stats[0] == 70 and s.num_rests == stats[1]
    ds = Dataset(out)
    assert ds.vocab_size == VOCAB_SIZE and ds.manifest.tokenizer == "midi"
    assert ds.manifest.extra["sequence_length"] == 1024


def test_corrupt_files_are_reported_by_name_and_batch_goes_on(prepped):
    out, s = prepped
    assert s.num_corrupt == 4 and s.num_files == len(MIDI_FILES) + 5
    assert s.dropped == {"few_events": 1, "short": 0, "long": 0, "instruments": 0}
    assert s.num_pieces == {"train": len(MIDI_FILES), "val": 0, "test": 0}
    reasons = {i["file"].rsplit("/", 1)[-1]: i["reason"] for i in Dataset(out).manifest.skipped}
    assert "truncated" in reasons["zz_truncated.mid"] and "empty" in reasons["zz_empty.mid"]
    assert "not a MIDI file" in reasons["zz_text.midi"] and "absurd tick" in reasons["zz_absurd.mid"]


def test_resume_equals_uninterrupted(corpus, prepped, tmp_path):
    out, _ = prepped
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    caches = sorted((copy / ".midi_units").glob("*.npz"))
    for c in caches[::2]:  # as if interrupted half way
        c.unlink()
    caches[1].write_bytes(caches[1].read_bytes()[:100])  # and one entry torn by the crash
    (copy / "manifest.json").unlink()
    s = prep_midi([str(corpus)], copy, MidiPrepConfig(split="ratio", val_fraction=0.0, test_fraction=0.0),
                  workers=1, show_progress=False)
    assert s.num_resumed == len(caches) - len(caches[::2]) - 1
    assert _docs(copy, "train") == _docs(out, "train")


@pytest.mark.slow
def test_parallel_equals_serial_and_md5_split(tmp_path):
    cfg = MidiPrepConfig(augment=3)
    a = prep_midi([str(MIDI_DIR)], tmp_path / "a", cfg, workers=1, show_progress=False)
    b = prep_midi([str(MIDI_DIR)], tmp_path / "b", cfg, workers=2, show_progress=False)
    for split in ("train", "val", "test"):
        assert _docs(tmp_path / "a", split) == _docs(tmp_path / "b", split)
    assert a.num_sequences == b.num_sequences
    digits = {f.name: hashlib.md5(f.read_bytes()).hexdigest()[0] for f in MIDI_FILES}
    # AMT's Lakh layout: one stream per first MD5 digit, each seeded 0, train = digits 0-d in order
    expected = []
    for digit in "0123456789abcd":
        members = [str(f) for f in MIDI_FILES if digits[f.name] == digit]
        expected += ref.tokenize(members, 3)[0] if members else []
    assert _docs(tmp_path / "a", "train") == expected
    assert a.num_pieces["val"] == sum(d == "e" for d in digits.values())
    assert a.num_pieces["test"] == sum(d == "f" for d in digits.values())
    # val/test are never augmented: every val sequence is autoregressive
    assert all(d[0] == ref.AUTOREGRESS for d in _docs(tmp_path / "a", "val"))


def test_split_rules():
    md5 = MidiPrepConfig()
    assert file_split("e" + "0" * 31, md5) == "val" and file_split("f" + "0" * 31, md5) == "test"
    assert file_split("3" + "f" * 31, md5) == "train"
    ratio = MidiPrepConfig(split="ratio", val_fraction=0.25, test_fraction=0.25)
    assert file_split("1" + "0" * 31, ratio) == "val" and file_split("5" + "0" * 31, ratio) == "test"
    assert file_split("9" + "0" * 31, ratio) == "train"


def test_transpose_leaves_drums_and_stretch_scales_time():
    from amtrain.midi.events import Notes

    n = Notes(np.array([0, 100, 200]), np.array([50, -1, 10]), np.array([60, 36, 126]),
              np.array([0, DRUMS, 40]), np.array([64, 64, 64]))
    up, dropped = apply_variant(n, 3, 1.0)
    assert up.pitch.tolist() == [63, 36] and up.instr.tolist() == [0, DRUMS] and dropped == 1  # 129 dropped
    slow, _ = apply_variant(n, 0, 1.5)
    assert slow.time.tolist() == [0, 150, 300] and slow.dur.tolist() == [75, -1, 15]


def test_variants_only_in_train_and_counted(tmp_path):
    files = [str(MIDI_DIR / "music21corpus_clara_schumann_polonaise_op1n1.mid")]
    s = prep_midi(files, tmp_path / "v", MidiPrepConfig(split="ratio", val_fraction=0, test_fraction=0,
                  transpose=(-2, 0, 2), stretch=(1.0, 1.25)), workers=1, show_progress=False)
    assert s.num_pieces["train"] == 6
    notes = read_notes(files[0])
    assert s.num_out_of_range == 2 * int(np.count_nonzero(notes.pitch < 2) + np.count_nonzero(notes.pitch > 125))
    docs = _docs(tmp_path / "v", "train")
    base = prep_midi(files, tmp_path / "b", MidiPrepConfig(split="ratio", val_fraction=0, test_fraction=0),
                     workers=1, show_progress=False)
    assert len(docs) > 5 * base.num_sequences["train"]


def test_from_tokens_passthrough(tmp_path, prepped):
    out, _ = prepped
    seqs = _docs(out, "train")[:5]
    txt = tmp_path / "tokenized-events-0.txt"
    txt.write_text("\n".join(" ".join(map(str, s)) for s in seqs) + "\n")
    s = import_token_files([str(txt)], tmp_path / "imp")
    assert s.num_sequences == 5 and s.lengths == {1024: 5}
    assert _docs(tmp_path / "imp", "train") == seqs
    bad = tmp_path / "bad.txt"
    bad.write_text(" ".join(map(str, seqs[0])) + "\n1 2 55028\n3 x 4\n")
    s = import_token_files([str(bad)], tmp_path / "imp2")
    assert s.num_sequences == 1 and s.num_bad_lines == 2
    skipped = Dataset(tmp_path / "imp2").manifest.skipped
    assert {i["file"] for i in skipped} == {f"{bad}:2", f"{bad}:3"}
    assert "55028 outside [0, 55028)" in skipped[0]["reason"]


def test_prep_midi_command(repo_root, corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "amtrain", "prep-midi", str(corpus), "--out", str(tmp_path / "c"),
                        "--workers", "2"], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 1  # corrupt inputs make the exit code non-zero, the rest is written
    assert "zz_truncated.mid" in r.stderr and "4 file(s) skipped" in r.stderr
    assert "dropped by filters" in r.stdout and Dataset(tmp_path / "c").manifest.splits["train"]["docs"] > 0


def test_from_tokens_command(repo_root, tmp_path):
    txt = tmp_path / "tokenized-events-e.txt"
    txt.write_text("55026 0 10010 11060\n55026 5 99999 11060\n")
    r = subprocess.run([sys.executable, "-m", "amtrain", "prep-midi", "--from-tokens", str(txt), "--token-split", "val",
                        "--out", str(tmp_path / "t")], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 1 and f"{txt}:2" in r.stderr and "99999 outside" in r.stderr
    assert "imported 1 sequences" in r.stdout and _docs(tmp_path / "t", "val") == [[55026, 0, 10010, 11060]]


def test_token_imports_into_one_folder_keep_every_split(tmp_path):
    """AMT ships its splits as files: importing the train file and then the val file into one
    folder keeps both splits; the same file and split again resumes."""
    from amtrain.prep.midi import import_token_files
    from amtrain.store import Dataset
    from amtrain.tokens.midi import AUTOREGRESS, DUR_OFFSET, NOTE_OFFSET, TIME_OFFSET

    tri = [[TIME_OFFSET + 10 * i, DUR_OFFSET + 20, NOTE_OFFSET + 60 + i % 12] for i in range(341)]
    line = " ".join(map(str, [AUTOREGRESS] + [x for t in tri for x in t])) + "\n"
    (tmp_path / "train.txt").write_text(line * 3)
    (tmp_path / "valid.txt").write_text(line * 2)
    out = tmp_path / "ds"
    import_token_files([str(tmp_path / "train.txt")], out, "train")
    import_token_files([str(tmp_path / "valid.txt")], out, "val")
    again = import_token_files([str(tmp_path / "valid.txt")], out, "val")
    ds = Dataset(out)
    assert sum(r.num_docs for r in ds.shards("train")) == 3 and sum(r.num_docs for r in ds.shards("val")) == 2
    assert again.num_sequences == 0
