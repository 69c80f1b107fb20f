"""AudioTokenizer: every layout round-trips exactly; malformed streams are rejected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amtrain.tokens import get_tokenizer
from amtrain.tokens.audio import LAYOUTS, AudioTokenizer


@st.composite
def code_grids(draw):
    k = draw(st.integers(1, 32))
    t = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).integers(0, 1024, size=(k, t))


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(codes=code_grids())
def test_every_layout_round_trips_exactly(layout, codes):
    tok = AudioTokenizer(num_codebooks=codes.shape[0], layout=layout)
    ids = tok.encode(codes)
    assert ids.dtype == np.uint16
    back = tok.codes(ids)
    assert back.shape == codes.shape and np.array_equal(back, codes)
    k, t = codes.shape
    assert ids.size == ((t + k - 1) * k if layout == "delay" else t * k)
    real = ids[ids < tok.eot_id].astype(np.int64)
    # codebook k lives at offset k*1024: the id's block says which codebook it came from
    assert np.array_equal(np.sort(np.bincount(real // 1024, minlength=k)[:k]), np.full(k, t))


def test_layouts_documented_order():
    codes = np.array([[1, 2], [3, 4], [5, 6]])  # K=3, T=2
    flat = AudioTokenizer(3, "flatten").encode(codes).tolist()
    assert flat == [1, 1024 + 3, 2048 + 5, 2, 1024 + 4, 2048 + 6]
    assert AudioTokenizer(3, "parallel").encode(codes).tolist() == flat
    p = 3 * 1024 + 1
    assert AudioTokenizer(3, "delay").encode(codes).tolist() == [1, p, p, 2, 1024 + 3, p, p, 1024 + 4, 2048 + 5, p, p, 2048 + 6]
    assert AudioTokenizer(3, "flatten").tokens_per_step == 1
    assert AudioTokenizer(3, "delay").tokens_per_step == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_malformed_streams_rejected(layout):
    tok = AudioTokenizer(4, layout)
    ids = tok.encode(np.arange(20).reshape(4, 5)).astype(np.int64)
    with pytest.raises(ValueError):
        tok.codes(ids[:-1])  # not whole steps
    bad = ids.copy()
    bad[1] = 5  # codebook 1's slot holds a codebook-0 id
    with pytest.raises(ValueError):
        tok.codes(bad)
    with pytest.raises(ValueError):
        tok.encode(np.full((4, 2), 1024))
    with pytest.raises(ValueError):
        tok.encode(np.zeros((3, 2), int))


def test_registry_params_and_decode():
    tok = get_tokenizer("audio", num_codebooks=8, layout="delay")
    assert tok.params() == {"num_codebooks": 8, "layout": "delay", "codebook_size": 1024}
    assert tok.vocab_size == 8 * 1024 + 2 and tok.special_ids == {"eot": 8192, "pad": 8193}
    again = get_tokenizer("audio", **tok.params())
    codes = np.random.default_rng(0).integers(0, 1024, (8, 10))
    stream = np.concatenate([[tok.eot_id], tok.encode(codes), [tok.eot_id], again.encode(codes[:, :2])])
    docs = again.split_documents(stream)
    assert [d.shape for d in docs] == [(8, 10), (8, 2)] and np.array_equal(docs[0], codes)
    text = tok.decode(stream)
    assert text.startswith("<eot> <delay K=8 T=10> (" + ",".join(map(str, codes[:, 0]))) and text.count("<eot>") == 2
    assert len(text) < 400
    # a slice of a stream (inspect shows the first 64 tokens) renders instead of raising
    part = tok.decode(stream[:64])
    assert part.startswith("<eot> <delay K=8, 63 tokens, not whole frames> 0:" + str(codes[0, 0]) + " _ _")
    assert tok.decode([tok.pad_id, 99999]).endswith("_ ?99999")
