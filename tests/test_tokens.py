"""Tokenizers: GPT-2's exact ids, parity with tiktoken's own gpt2 encoding, round trips."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from amtrain.errors import UserError
from amtrain.tokens import get_tokenizer
from tests.conftest import KJV, REPO

GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
UNICODE_TEXT = "naïve café — 東京 🎵 Ünïcödé's  spaces\t\ttabs\n\n\nnewlines 12345 3.14 <|endoftext|> don't"


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory, monkeypatch_module):
    """tiktoken's own `get_encoding("gpt2")`, fed GPT-2's original files through its cache."""
    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, url in GPT2_URLS.items():
        shutil.copy(REPO / "tests/data/gpt2_bpe" / name, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_gpt2_exact_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.special_ids == {"<|endoftext|>": 50256}
    assert tok.decode([50256]) == "<|endoftext|>"


def test_gpt2_parity_with_tiktoken_on_real_text(tiktoken_gpt2):
    tok = get_tokenizer("gpt2")
    text = KJV.read_text(encoding="utf-8")
    for sample in (text, UNICODE_TEXT):
        ours = tok.encode(sample)
        assert ours == tiktoken_gpt2.encode_ordinary(sample)
        assert tok.decode(ours) == sample
    assert tok.enc._mergeable_ranks == tiktoken_gpt2._mergeable_ranks


def test_gpt2_batch_equals_single():
    tok = get_tokenizer("gpt2")
    docs = KJV.read_text(encoding="utf-8").split("\n\n")[:20] + [UNICODE_TEXT]
    assert tok.encode_batch(docs, num_threads=2) == [tok.encode(d) for d in docs]


def test_ascii_round_trip_and_layout():
    tok = get_tokenizer("ascii")
    assert tok.vocab_size == 258 and tok.eot_id == 256 and tok.special_ids["<|pad|>"] == 257
    ids = tok.encode(UNICODE_TEXT)
    assert max(ids) < 256 and len(ids) == len(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(ids + [256, 257]) == UNICODE_TEXT  # specials carry no text


def test_unknown_tokenizer_names_choices():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe50k'.*ascii.*gpt2"):
        get_tokenizer("bpe50k")


def test_missing_ranks_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="gpt2.tiktoken"):
        get_tokenizer("gpt2", ranks_file=str(tmp_path / "gpt2.tiktoken"))


def test_gpt2_numpy_batch_equals_encode_ordinary():
    tok = get_tokenizer("gpt2")
    docs = KJV.read_text(encoding="utf-8").split("\n\n")[:30] + [UNICODE_TEXT, ""]
    got = tok.encode_batch_numpy(docs, num_threads=2)
    assert [a.tolist() for a in got] == [tok.encode(d) for d in docs]
