"""Event-level metrics for AMT sequences, as the Anticipatory Music Transformer reports them.

An event is three tokens (time, duration, note), so a model's mean per-token cross-entropy
`ce` (nats) over event tokens gives:

    event perplexity = exp(3 * ce)             (AMT, arXiv 2306.08620, Sec. 5)
    bits per event   = 3 * ce / ln 2

Inputs may be floats or arrays (numpy, or CPU tensors numpy can read); outputs are numpy.
"""

from __future__ import annotations

import math

import numpy as np

from amtrain.tokens.midi import EVENT_SIZE


def event_perplexity(ce_per_token):
    """exp(EVENT_SIZE * ce): perplexity per (time, duration, note) event."""
    return np.exp(EVENT_SIZE * np.asarray(ce_per_token, dtype=np.float64))


def bits_per_event(ce_per_token):
    """EVENT_SIZE * ce / ln 2: information per event in bits."""
    return EVENT_SIZE * np.asarray(ce_per_token, dtype=np.float64) / math.log(2)


def event_metrics(ce_per_token: float) -> dict[str, float]:
    """The pair, as plain floats for logs: {"event_ppl", "bits_per_event"}."""
    return {"event_ppl": float(event_perplexity(ce_per_token)), "bits_per_event": float(bits_per_event(ce_per_token))}
