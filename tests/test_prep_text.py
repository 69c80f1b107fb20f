"""prep-text on the bundled corpus and on bad input: exact content, determinism, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from amtrain.prep import text as text_prep
from amtrain.prep.text import is_val, prep_text
from amtrain.store import Dataset, DatasetBuilder
from amtrain.tokens import get_tokenizer
from tests.conftest import KJV


def _chapters():
    return [c.strip("\n") for c in KJV.read_text(encoding="utf-8").split("\n\n") if c.strip()]


def _docs(folder, split):
    return [d.copy() for d in Dataset(folder).documents(split)]


def _shard_bytes(folder):
    m = Dataset(folder).manifest
    return {s.file: (folder / s.file).read_bytes() for s in m.shards}


def test_kjv_documents_decode_back_exactly(kjv_gpt2):
    tok = get_tokenizer("gpt2")
    chapters = _chapters()
    expect = {s: [c for c in chapters if is_val(c, 0.05) == (s == "val")] for s in ("train", "val")}
    assert expect["val"], "the bundled corpus must give a non-empty val split"
    for split in ("train", "val"):
        docs = _docs(kjv_gpt2, split)
        assert [int(d[0]) for d in docs] == [tok.eot_id] * len(docs)
        assert [tok.decode(d[1:]) for d in docs] == expect[split]
    m = Dataset(kjv_gpt2).manifest
    assert m.tokenizer == "gpt2" and m.vocab_size == 50257 and m.special_ids == {"<|endoftext|>": 50256}


def test_ascii_dataset_is_the_utf8_bytes(kjv_ascii):
    docs = _docs(kjv_ascii, "train") + _docs(kjv_ascii, "val")
    assert sorted(bytes(d[1:].astype(np.uint8)).decode() for d in docs) == sorted(_chapters())
    assert Dataset(kjv_ascii).manifest.vocab_size == 258


def test_split_is_by_content_not_order(tmp_path):
    chapters = _chapters()[:40]
    (tmp_path / "a.txt").write_text("\n\n".join(chapters))
    (tmp_path / "b.txt").write_text("\n\n".join(reversed(chapters)))
    prep_text([str(tmp_path / "a.txt")], tmp_path / "A", val_fraction=0.3, show_progress=False)
    prep_text([str(tmp_path / "b.txt")], tmp_path / "B", val_fraction=0.3, show_progress=False)
    key = lambda docs: sorted(d.tobytes() for d in docs)  # noqa: E731
    for split in ("train", "val"):
        assert key(_docs(tmp_path / "A", split)) == key(_docs(tmp_path / "B", split))
    n_val = len(_docs(tmp_path / "A", "val"))
    assert 0 < n_val < 40


def test_jsonl_folders_globs_and_modes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rows = [{"text": "first doc"}, {"body": "no text field"}, {"text": "second\n\ndoc"}]
    (src / "sub" / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (src / "l.txt").write_text("line one\nline two\n\nline three\n")
    (src / "ignored.csv").write_text("a,b\n")
    s = prep_text([str(src)], tmp_path / "o", tokenizer="ascii", txt_docs="line", val_fraction=0.0, show_progress=False)
    tok = get_tokenizer("ascii")
    texts = sorted(tok.decode(d[1:]) for d in _docs(tmp_path / "o", "train"))
    assert texts == sorted(["first doc", "second\n\ndoc", "line one", "line two", "line three"])
    assert [i["reason"] for i in s.skipped] == ["2 jsonl records without a string 'text' field (records skipped)"]
    s2 = prep_text([str(src / "*.txt")], tmp_path / "g", tokenizer="ascii", txt_docs="file", val_fraction=0.0, show_progress=False)
    assert s2.docs["train"] == 1


def test_big_file_units_match_single_unit(tmp_path):
    one = prep_text([str(KJV)], tmp_path / "one", show_progress=False)
    many = prep_text([str(KJV)], tmp_path / "many", unit_bytes=50_000, show_progress=False)
    assert many.units_done > 10
    for split in ("train", "val"):
        a, b = _docs(tmp_path / "one", split), _docs(tmp_path / "many", split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert one.tokens == many.tokens


def test_interrupted_prep_resumes_to_identical_shards(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    prep_text([str(KJV)], ref, unit_bytes=100_000, show_progress=False)
    out = tmp_path / "out"
    real_write = DatasetBuilder.write_unit
    calls = {"n": 0}

    def crash_after_three(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_write(self, *a, **k)

    monkeypatch.setattr(DatasetBuilder, "write_unit", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prep_text([str(KJV)], out, unit_bytes=100_000, show_progress=False)
    assert not (out / "manifest.json").exists()  # an unfinished dataset never looks complete
    monkeypatch.setattr(DatasetBuilder, "write_unit", real_write)
    s = prep_text([str(KJV)], out, unit_bytes=100_000, show_progress=False)
    assert s.units_skipped_finished == 3
    assert _shard_bytes(out) == _shard_bytes(ref)
    again = prep_text([str(KJV)], out, unit_bytes=100_000, show_progress=False)
    assert again.units_done == 0 and again.bytes_read == 0 and _shard_bytes(out) == _shard_bytes(ref)


def test_empty_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    shutil.copy(KJV, tmp_path / "kjv.txt")
    s = prep_text([str(tmp_path)], tmp_path / "o", show_progress=False)
    assert s.skipped == [{"file": str(tmp_path / "empty.txt"), "reason": "empty file", "error": False}]
    assert s.docs["train"] + s.docs["val"] == len(_chapters())


def test_invalid_utf8_replace_or_skip(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good start\n\nbad \xff\xfe bytes\n\nend")
    (tmp_path / "ok.txt").write_text("fine text")
    s = prep_text([str(tmp_path)], tmp_path / "r", tokenizer="ascii", val_fraction=0.0, show_progress=False)
    assert s.skipped == [] and s.docs["train"] == 4
    texts = [get_tokenizer("ascii").decode(d[1:]) for d in _docs(tmp_path / "r", "train")]
    assert "bad \ufffd\ufffd bytes" in texts
    s = prep_text([str(tmp_path)], tmp_path / "s", tokenizer="ascii", errors="strict", val_fraction=0.0, show_progress=False)
    assert len(s.skipped) == 1 and "bad.txt" in s.skipped[0]["file"] and "invalid UTF-8 at byte 16" in s.skipped[0]["reason"]
    assert s.docs["train"] == 1  # ok.txt still made it


def test_file_disappearing_mid_run(tmp_path, monkeypatch):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"document {name}")
    real_plan = text_prep.plan_units

    def plan_then_delete(*a, **k):
        units = real_plan(*a, **k)
        (tmp_path / "b.txt").unlink()
        return units

    monkeypatch.setattr(text_prep, "plan_units", plan_then_delete)
    s = prep_text([str(tmp_path / "*.txt")], tmp_path / "o", tokenizer="ascii", val_fraction=0.0, show_progress=False)
    assert [(i["file"], i["reason"]) for i in s.skipped] == [(str(tmp_path / "b.txt"), "file disappeared during the run")]
    assert s.docs["train"] == 2
    assert Dataset(tmp_path / "o").manifest.skipped[0]["file"].endswith("b.txt")


def test_separator_documents_for_fortune_files(tmp_path):
    """`--txt-docs sep:%`: lines holding only the mark separate documents (fortune files); a
    big file cut into units at the separator gives the same documents as one unit."""
    from amtrain.errors import UserError

    tok = get_tokenizer("ascii")
    sayings = [f"Saying {i}:\nline one of {i}\n  indented line {i}" for i in range(300)]
    path = tmp_path / "fortunes"
    path.write_text("%\n" + "\n%\n".join(sayings) + "\n%\n%\n")
    one = prep_text([str(path)], tmp_path / "one", tokenizer="ascii", txt_docs="sep:%", show_progress=False)
    cut = prep_text([str(path)], tmp_path / "cut", tokenizer="ascii", txt_docs="sep:%", unit_bytes=2000,
                    show_progress=False)
    assert cut.units_done > 3 and one.units_done == 1
    for folder in ("one", "cut"):
        ds = Dataset(tmp_path / folder)
        docs = [tok.decode(d[1:].tolist()) for split in ds.manifest.splits for d in ds.documents(split)]
        assert sorted(docs) == sorted(sayings), folder
    with pytest.raises(UserError, match="sep:MARK"):
        prep_text([str(path)], tmp_path / "bad", tokenizer="ascii", txt_docs="sep:", show_progress=False)
