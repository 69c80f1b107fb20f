"""LSTM baseline: sizes matched to the decoder, causality, state-as-cache parity, it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amtrain.models.decoder import Decoder
from amtrain.models.lstm import LSTM_SIZES, LSTMLM
from amtrain.registry import family
from amtrain.store import Dataset

PINNED_NON_EMBEDDING = {"debug": 97_900, "tiny": 988_528, "small": 4_727_358, "medium": 21_230_840, "large": 50_363_148}


@pytest.mark.parametrize("size", list(LSTM_SIZES))
def test_sizes_match_decoder_non_embedding_counts(size):
    lstm = LSTMLM(family("lstm").config(size, vocab_size=50257))
    assert lstm.num_params(non_embedding=True) == PINNED_NON_EMBEDDING[size]
    with torch.device("meta"):
        dec = Decoder(family("decoder").config(size, vocab_size=50257))
    assert lstm.num_params(non_embedding=True) == pytest.approx(dec.num_params(non_embedding=True), rel=0.01)


def test_causal_by_gradient():
    torch.manual_seed(0)
    m = LSTMLM(family("lstm").config("debug", vocab_size=300))
    x = torch.randint(0, 300, (1, 12))
    emb = m.embed(x).detach().requires_grad_(True)
    y, _ = m.lstm(emb)
    y[0, 5].sum().backward()
    g = emb.grad[0].abs().sum(-1)
    assert torch.all(g[6:] == 0) and torch.all(g[:6] > 0)


def test_state_cache_equals_full_forward():
    torch.manual_seed(0)
    m = LSTMLM(family("lstm").config("debug", vocab_size=300)).eval()
    x = torch.randint(0, 300, (2, 20))
    full, _ = m(x)
    cache = m.new_cache(2, 20)
    parts = [m(x[:, :7], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 20


def test_last_only_logits_are_the_full_forwards_last_row():
    torch.manual_seed(0)
    m = LSTMLM(family("lstm").config("debug", vocab_size=300)).eval()
    x = torch.randint(0, 300, (2, 20))
    full, _ = m(x)
    last, _ = m(x, last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        m(x, targets=x, last_only=True)


def test_generate_with_and_without_cache_agree():
    from amtrain.generate.loop import generate

    torch.manual_seed(0)
    m = LSTMLM(family("lstm").config("debug", vocab_size=300)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    a = generate(m, prompt, 15, temperature=0.8, top_k=20, seed=3, use_cache=True)
    b = generate(m, prompt, 15, temperature=0.8, top_k=20, seed=3, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 20) and int(a.max()) < 300


def test_loss_falls_on_real_text(kjv_ascii):
    torch.manual_seed(0)
    tokens = np.concatenate(Dataset(kjv_ascii).tokens("train")).astype(np.int64)
    m = LSTMLM(family("lstm").config("debug", vocab_size=258))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        starts = rng.integers(0, tokens.size - 65, 16)
        batch = torch.from_numpy(np.stack([tokens[s:s + 65] for s in starts]))
        _, loss = m(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_save_load_round_trip(tmp_path):
    from amtrain.models.io import load_pretrained, save_pretrained

    torch.manual_seed(0)
    m = LSTMLM(family("lstm").config("debug", vocab_size=300)).eval()
    save_pretrained(m, tmp_path / "export", {"tokenizer": "ascii"})
    back, meta = load_pretrained(tmp_path / "export")
    x = torch.randint(0, 300, (2, 9))
    assert isinstance(back, LSTMLM) and meta["tokenizer"] == "ascii"
    torch.testing.assert_close(back(x)[0], m(x)[0], rtol=0, atol=0)
