"""Token shards and datasets: round trips, header checks, manifest checks, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from amtrain.errors import ShardError
from amtrain.store import (
    Dataset,
    DatasetBuilder,
    open_shard,
    read_header,
    validate_shard,
    write_shard,
)
from amtrain.store.dataset import validate_dataset
from amtrain.store.format import HEADER_BYTES


@pytest.mark.parametrize("vocab,dtype", [(50257, np.uint16), (65536, np.uint16), (65537, np.uint32), (1 << 20, np.uint32)])
def test_shard_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=10_001)
    write_shard(tmp_path / "a.bin", tokens, vocab)
    h = read_header(tmp_path / "a.bin")
    assert h.dtype == np.dtype(dtype) and h.num_tokens == tokens.size and h.vocab_size == vocab
    back = open_shard(tmp_path / "a.bin")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, tokens)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + tokens.size * np.dtype(dtype).itemsize
    assert validate_shard(tmp_path / "a.bin", vocab) == []


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), 300)
    assert open_shard(tmp_path / "e.bin").size == 0


def test_write_rejects_ids_outside_vocab(tmp_path):
    with pytest.raises(ShardError, match="outside the vocabulary of 100"):
        write_shard(tmp_path / "x.bin", np.array([1, 100]), 100)
    assert not any(tmp_path.iterdir())


def _shard(tmp_path, vocab=1000, n=500):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(n) % vocab, vocab)
    return path


def test_wrong_magic(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTSHARD"
    path.write_bytes(raw)
    with pytest.raises(ShardError, match=r"s\.bin: not an amtrain shard"):
        open_shard(path)


def test_truncated(tmp_path):
    path = _shard(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(path)
    path.write_bytes(raw[:20])
    with pytest.raises(ShardError, match="shorter than the 64-byte header"):
        open_shard(path)


def test_wrong_dtype(tmp_path):
    path = _shard(tmp_path, vocab=1000)
    raw = bytearray(path.read_bytes())
    raw[12:16] = struct.pack("<I", 4)  # claims uint32 for a vocabulary that fits uint16
    path.write_bytes(raw)
    with pytest.raises(ShardError, match="dtype uint32 does not match vocab size 1000"):
        read_header(path)
    raw[12:16] = struct.pack("<I", 3)
    path.write_bytes(raw)
    with pytest.raises(ShardError, match="unknown dtype code 3"):
        read_header(path)


def test_checksum_catches_changed_tokens(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 10] ^= 0xFF
    path.write_bytes(raw)
    open_shard(path)  # the header alone still reads
    assert any("checksum mismatch" in p for p in validate_shard(path))


def test_crash_mid_write_leaves_no_final_file(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_shard(tmp_path / "c.bin", np.arange(10), 100)
    assert not (tmp_path / "c.bin").exists()
    for leftover in tmp_path.iterdir():  # a temp file may remain; it never passes as a shard
        assert leftover.name.startswith(".c.bin.tmp")


def _dataset(tmp_path, vocab=5000):
    rng = np.random.default_rng(1)
    docs = {"train": [rng.integers(0, vocab, rng.integers(1, 50)) for _ in range(40)],
            "val": [rng.integers(0, vocab, 7) for _ in range(3)]}
    b = DatasetBuilder(tmp_path / "ds", "toy", vocab, {"<eot>": 0})
    b.write_unit("u0", docs)
    b.finalize(["u0"], command="test")
    return tmp_path / "ds", docs


def test_dataset_round_trip(tmp_path):
    folder, docs = _dataset(tmp_path)
    ds = Dataset(folder)
    for split in ("train", "val"):
        got = list(ds.documents(split))
        assert len(got) == len(docs[split])
        assert all(np.array_equal(a, b) for a, b in zip(got, docs[split], strict=True))
    assert ds.manifest.splits["train"]["docs"] == 40
    assert validate_dataset(folder) == []


def test_manifest_vocab_contradicts_shard(tmp_path):
    folder, _ = _dataset(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["vocab_size"] = 4000
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="header vocab size 5000 contradicts manifest vocab size 4000"):
        Dataset(folder)
    assert any("contradicts" in p for p in validate_dataset(folder))


def test_manifest_counts_do_not_match_shards(tmp_path):
    folder, _ = _dataset(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][0]["num_tokens"] += 1
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="manifest does not match its shards"):
        Dataset(folder)


def test_missing_shard_and_missing_manifest(tmp_path):
    folder, _ = _dataset(tmp_path)
    (folder / "val" / "u0.bin").unlink()
    with pytest.raises(ShardError, match=r"u0\.bin: shard missing"):
        Dataset(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        Dataset(folder)


def test_unit_resume_records(tmp_path):
    b = DatasetBuilder(tmp_path, "toy", 100, {})
    assert b.load_unit("u0") is None
    recs = b.write_unit("u0", {"train": [np.arange(5)]})
    assert b.load_unit("u0") == recs
    (tmp_path / recs[0].file).unlink()  # a record whose shard vanished is redone
    assert b.load_unit("u0") is None
    assert DatasetBuilder(tmp_path, "other", 100, {}).load_unit("u0") is None
