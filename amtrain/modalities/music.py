"""Bits per second of music: one figure that compares symbolic encodings (amt, nvd, abc, ...).

A model's held-out cross-entropy summed over a piece, divided by the piece's duration (AMT's
evaluation reports it; arXiv 2306.08620). Token counts per second differ between encodings,
bits per token do not compare; bits per second do.

Cheap form used in validation: the validation windows are the first windows of the split in
order (`amtrain.data.loader.val_batches`), so the documents they reach are known before
training. For those documents `tokens_per_second` = (their tokens) / (their seconds of music),
read once through the modality's `notes` (so it works for every encoding that implements it),
and at every evaluation

    bits_per_second = val_loss / ln 2 * tokens_per_second

which is Σ CE / Σ seconds over the evaluated documents when the windows cover them (the mean
per-token loss times the tokens of the music). A document's seconds run from its first onset to
the end of its last note.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from amtrain.tokens import get_tokenizer

if TYPE_CHECKING:
    from amtrain.midi.events import Notes
    from amtrain.modalities.base import Modality
    from amtrain.store import Dataset

MAX_DOCS = 2048
"""Most documents decoded for the rate (validation sets beyond it are sampled by their start)."""


def seconds_of(notes: Notes) -> float:
    """From the first onset to the end of the last note, in seconds (10 ms bins)."""
    if not len(notes):
        return 0.0
    end = notes.time + np.maximum(notes.dur, 0)
    return float(end.max() - notes.time.min()) / 100


def bits_per_second(ce_per_token: float, tokens_per_second: float) -> float:
    return ce_per_token / math.log(2) * tokens_per_second


def piece_bits_per_second(ce_sum_nats: float, seconds: float) -> float:
    """A piece's summed cross-entropy (nats) over its duration, in bits per second."""
    return ce_sum_nats / math.log(2) / seconds


def tokens_per_second(modality: Modality, tokenizer, docs) -> float | None:
    """Tokens per second of music over documents (id arrays); None if the modality has no notes
    (not symbolic music) or the documents hold no music."""
    tokens, seconds = 0, 0.0
    for ids in docs:
        notes = modality.notes(tokenizer, np.asarray(ids, np.int64))
        if notes is None:
            return None
        tokens += len(ids)
        seconds += seconds_of(notes)
    return tokens / seconds if seconds > 0 else None


def val_tokens_per_second(dataset: Dataset, split: str, seq_len: int, num_windows: int,
                          modality: Modality) -> float | None:
    """`tokens_per_second` of the documents the first `num_windows` windows of `seq_len`
    (+1) tokens of a split reach (the validation windows), at most MAX_DOCS of them."""
    from amtrain.modalities.base import Modality

    if type(modality).notes is Modality.notes:  # not symbolic music: skip building its tokenizer
        return None
    manifest = dataset.manifest
    tokenizer = get_tokenizer(manifest.tokenizer, **manifest.tokenizer_params)
    if modality.notes(tokenizer, np.zeros(0, np.int64)) is None:
        return None
    docs: list[np.ndarray] = []
    left = num_windows
    for rec, toks in zip(dataset.shards(split), dataset.tokens(split), strict=True):
        if left <= 0 or len(docs) >= MAX_DOCS:
            break
        n = min(left, max(0, (toks.size - 1) // seq_len))
        left -= n
        reach = n * seq_len + 1
        bounds = np.append(dataset.doc_starts(rec).astype(np.int64), toks.size).tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if a >= reach or len(docs) >= MAX_DOCS:
                break
            docs.append(toks[a:b])
    return tokens_per_second(modality, tokenizer, docs)
