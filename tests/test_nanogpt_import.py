"""modded-nanogpt (headered) and nanoGPT (raw uint16) .bin files import into amtrain datasets."""

from __future__ import annotations

import numpy as np
import pytest

from amtrain.errors import ShardError
from amtrain.prep.nanogpt import import_bins
from amtrain.store import Dataset
from amtrain.tokens import get_tokenizer
from tests.conftest import KJV


def _gpt2_stream(n_docs=30):
    tok = get_tokenizer("gpt2")
    docs = KJV.read_text().split("\n\n")[:n_docs]
    stream = []
    for d in docs:
        stream += [tok.eot_id] + tok.encode(d)
    return np.array(stream, dtype=np.uint16), n_docs


def write_modded(path, tokens):
    """As modded-nanogpt data/fineweb.py write_datafile: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def test_import_modded_and_raw(tmp_path):
    tokens, n_docs = _gpt2_stream()
    write_modded(tmp_path / "fineweb_train_000001.bin", tokens)
    tokens[:1000].tofile(tmp_path / "val.bin")  # nanoGPT prepare.py: raw uint16
    files = [tmp_path / "fineweb_train_000001.bin", tmp_path / "val.bin"]
    import_bins(files, tmp_path / "ds", {files[0]: "train", files[1]: "val"})
    ds = Dataset(tmp_path / "ds")
    assert np.array_equal(np.concatenate(ds.tokens("train")), tokens)
    assert np.array_equal(np.concatenate(ds.tokens("val")), tokens[:1000])
    docs = list(ds.documents("train"))
    assert len(docs) == n_docs and all(d[0] == 50256 for d in docs)


def test_truncated_modded_file(tmp_path):
    tokens, _ = _gpt2_stream(3)
    write_modded(tmp_path / "t.bin", tokens)
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-10])
    with pytest.raises(ShardError, match="truncated"):
        import_bins([tmp_path / "t.bin"], tmp_path / "ds", {tmp_path / "t.bin": "train"})
