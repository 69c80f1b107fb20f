"""Held-out data for evaluation: the loss of a left-to-right model on a split, and excerpts of
its documents to compare samples with."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def heldout_loss(model, dataset, split: str, window: int, max_tokens: int = 16384, batch: int = 8) -> dict:
    """Mean next-token cross-entropy (nats) of a left-to-right model on the split's first
    windows of `window` tokens — the windows the trainer's validation takes
    (`amtrain.data.loader.WindowIndex`, in order), as many as fit in `max_tokens` ->
    {"loss", "bits_per_token", "tokens"}."""
    from amtrain.data.loader import WindowIndex

    index = WindowIndex(dataset, split, window)
    n = min(len(index), max(1, max_tokens // window))
    if n == 0:
        return {"loss": float("nan"), "bits_per_token": float("nan"), "tokens": 0}
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        w = index.stack(np.arange(i, min(n, i + batch))).to(dev)
        _, loss = model(w[:, :-1], targets=w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
    model.train(was)
    ce = total / (n * window)
    return {"loss": ce, "bits_per_token": ce / math.log(2), "tokens": int(n * window)}


def excerpts(docs: list[np.ndarray], length: int, count: int) -> list[np.ndarray]:
    """The openings (`length` ids) of up to `count` documents, spread evenly over the split."""
    if not docs or count < 1:
        return []
    picks = np.unique(np.linspace(0, len(docs) - 1, min(count, len(docs))).round().astype(int))
    return [np.asarray(docs[i][:length], np.int64) for i in picks]
