"""Held-out data for evaluation: the loss of a left-to-right model on a split, and excerpts of
its documents to compare samples with."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def heldout_loss(model, docs: list[np.ndarray], window: int, max_tokens: int = 16384, batch: int = 8) -> dict:
    """Mean next-token cross-entropy (nats) of a left-to-right model over the split's documents
    joined into one stream, in non-overlapping windows of `window` tokens, at most `max_tokens`
    predicted -> {"loss", "bits_per_token", "tokens"}."""
    stream = np.concatenate([np.asarray(d, np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    stream = stream[:max_tokens + 1]
    n = (stream.size - 1) // window
    if n < 1:
        window, n = stream.size - 1, 1 if stream.size > 1 else 0
    if n == 0:
        return {"loss": float("nan"), "bits_per_token": float("nan"), "tokens": 0}
    dev = next(model.parameters()).device
    x = torch.as_tensor(stream[:n * window].reshape(n, window), device=dev)
    y = torch.as_tensor(stream[1:n * window + 1].reshape(n, window), device=dev)
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        _, loss = model(x[i:i + batch], targets=y[i:i + batch])
        total += float(loss) * x[i:i + batch].numel()
    model.train(was)
    ce = total / (n * window)
    return {"loss": ce, "bits_per_token": ce / math.log(2), "tokens": int(n * window)}


def excerpts(docs: list[np.ndarray], length: int, count: int) -> list[np.ndarray]:
    """The openings (`length` ids) of up to `count` documents, spread evenly over the split."""
    if not docs or count < 1:
        return []
    picks = np.unique(np.linspace(0, len(docs) - 1, min(count, len(docs))).round().astype(int))
    return [np.asarray(docs[i][:length], np.int64) for i in picks]
