"""Continuation past the context length: a sliding window with stride stitching.

    context C = model.cfg.max_seq_len, stride S (default C // 2), keep = C - S

    round 0   [ prompt ............ | new ...... ]          up to C tokens
    round 1   [ header | last keep-h tokens | S new ]       re-prefilled window
    round 2   [ header | last keep-h tokens | S new ] ...

Each round generates until the window is full (C tokens); the next window is the `header`
(the first h ids of the prompt, e.g. MIDI's sequence flag or audio's <eot>, which every training
sequence starts with) followed by the last `keep - h` tokens of the tape, cut so that it starts
on a `unit` boundary counted from the header (3 for MIDI triples, K for the K codebooks of an
audio frame), so the model always sees windows shaped like its training data. The new tokens
of every round are stitched onto one tape; nothing of the tape is ever rewritten.

Each round is one call of the decode loop (`amtrain.generate.loop.generate`). Round r draws
with seed `seed + r` (a private generator per round; with one seed per row, row i's generator
is seeded `seed[i] + r`), so a fixed seed reproduces the whole tape, with or without the KV
cache (the cache is rebuilt by one prefill per round).
"""

from __future__ import annotations

import torch

from amtrain.errors import UserError
from amtrain.generate.loop import Seed, generate, offset_seed
from amtrain.generate.processors import ForcedTokens, LogitsProcessor, LogitsProcessorList
from amtrain.models.base import SequenceModel


def window_start(length: int, keep: int, header: int, unit: int) -> int:
    """Index of the first tape token the next window keeps: the tail of at most keep - header
    tokens that starts on a unit boundary after the header."""
    body = max(keep - header, 0)
    over = max(length - header - body, 0)
    return header + -(-over // unit) * unit


def resolve_stride(context: int, stride: int | None, header: int, unit: int) -> int:
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context - header - unit:
        raise UserError(f"--stride {stride}: must be in [1, {context - header - unit}] for a context of "
                        f"{context} tokens (each window keeps the header and at least one {unit}-token unit)")
    return stride


@torch.no_grad()
def generate_long(model: SequenceModel, prompt: torch.Tensor, max_new_tokens: int, *, stride: int | None = None,
                  header: int = 0, unit: int = 1, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: Seed = None, use_cache: bool = True,
                  logits_processor: LogitsProcessor | None = None,
                  forced: dict[int, int] | None = None) -> torch.Tensor:
    """Continue prompt (B, T0) by exactly max_new_tokens ids through as many windows as needed;
    returns the tape (B, T0 + max_new_tokens). A prompt longer than the context starts from its
    own last window. `logits_processor` sees the current window (positions relative to it).
    `forced` maps new-token indices (0 = the first new token, counted over all rounds) to the id
    they must be (`ForcedTokens`, applied after `logits_processor`)."""
    context = model.cfg.max_seq_len
    if header >= context:
        raise UserError(f"header of {header} tokens does not fit the context of {context}")
    keep = context - resolve_stride(context, stride, header, unit)
    tape = prompt
    remaining, r = max_new_tokens, 0
    while remaining > 0:
        window = tape
        if tape.shape[1] >= context:
            window = torch.cat([tape[:, :header], tape[:, window_start(tape.shape[1], keep, header, unit):]], 1)
        n = min(remaining, context - window.shape[1])
        num_before = max_new_tokens - remaining
        processors = LogitsProcessorList([logits_processor] if logits_processor is not None else [])
        if forced:
            processors.append(ForcedTokens(forced, start=window.shape[1] - num_before))
        out = generate(model, window, n, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=offset_seed(seed, r), use_cache=use_cache, logits_processor=processors)
        tape = torch.cat([tape, out[:, window.shape[1]:]], 1)  # (B, t + n)
        remaining -= n
        r += 1
    return tape
