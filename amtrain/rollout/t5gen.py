"""Sampling from the T5 denoiser: sentinel in-filling and prefix-LM continuation.

`t5_generate` samples targets through `T5.generate` (the decoder's KV cache: self-attention
keys grow per step, cross-attention keys computed once) with a `choose` that applies the
rollout's logits processor and sampler, or, with use_cache=False, by running the decoder over
all positions each step: the same tokens either way (tested).

In-filling (`t5_infill`): segments s_0 .. s_n around n gaps become the input

    [X] s_0 <s_0> s_1 <s_1> ... <s_{n-1}> s_n EOS

and the target is decoded under `SpanGrammar`: it opens with <s_0>, each span holds whole
units (3 ids per MIDI event, K per audio frame) of base-vocabulary ids obeying the modality's
constraint, and span i closes with <s_{i+1}> (or EOS after the last). `exact` span lengths
force each span to its gap's length (audio: the waveform keeps its duration). The spans are
put back in place with `merge_inputs_targets`, so every segment s_i is kept exactly.

Continuation (`t5_continue`): the UL2 S-denoiser, input `[S] prefix EOS`, target = the next
tokens; beyond `context` input tokens the prefix is the tape's last window (header + aligned
tail, as the decoder's sliding window) and each round adds up to `stride` tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from amtrain.errors import UserError
from amtrain.rollout.constraints import Constraint, block_mask
from amtrain.rollout.sampling import next_token
from amtrain.rollout.window import window_start


class _Chooser:
    """`T5.generate`'s `choose`: the logits processor sees the targets so far (B, t), then
    `next_token` samples; the model's loop feeds the choice back through its KV cache."""

    def __init__(self, batch: int, device, processor, temperature, top_k, top_p, generator):
        self.seq = torch.empty(batch, 0, dtype=torch.long, device=device)
        self.processor, self.generator = processor, generator
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.processor is not None:
            logits = self.processor(logits, self.seq)
        tok = next_token(logits, self.temperature, self.top_k, self.top_p, self.generator)  # (B, 1)
        self.seq = torch.cat([self.seq, tok], 1)
        return tok


@torch.no_grad()
def t5_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                use_cache: bool = True, logits_processor=None, eos_id: int | None = None) -> torch.Tensor:
    """input_ids (B, S) -> generated target ids (B, n) (the start token not included). With the
    cache this is `T5.generate` with a sampling `choose`; without it, the same choices with
    the decoder re-run over all positions each step (the reference the cache is tested against)."""
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    choose = _Chooser(input_ids.shape[0], input_ids.device, logits_processor, temperature, top_k, top_p, gen)
    if use_cache:
        return model.generate(input_ids, max_new_tokens=max_new_tokens, eos_id=eos_id, choose=choose)[:, 1:]
    was_training = model.training
    model.eval()
    B = input_ids.shape[0]
    enc = model.encode(input_ids)  # (B, S, D)
    seq = torch.full((B, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.decode(seq, enc)[:, -1, :model.cfg.vocab_size].float()  # (B, V)
        tok = choose(logits)
        if eos_id is not None:
            tok = tok.masked_fill(done[:, None], eos_id)
            done |= tok[:, 0] == eos_id
        seq = torch.cat([seq, tok], 1)
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return seq[:, 1:]


class SpanGrammar(Constraint):
    """Targets `<s_0> span_0 <s_1> span_1 ... EOS` for num_gaps gaps (see the module doc).
    `inner(span (B, j), V)` gives the allowed ids inside a span (None: any base id)."""

    def __init__(self, vocab, num_gaps: int, unit: int = 1, inner: Constraint | None = None,
                 lengths: list[int] | None = None, max_span: int | None = None):
        self.vocab, self.num_gaps, self.unit, self.inner = vocab, num_gaps, unit, inner
        self.lengths, self.max_span = lengths, max_span

    def _close(self, i: int) -> int:
        return self.vocab.sentinel(i + 1) if i + 1 < self.num_gaps else self.vocab.eos_id

    def allowed(self, generated: torch.Tensor, vocab: int) -> torch.Tensor:
        B, t = generated.shape
        dev = generated.device
        if t == 0:
            return block_mask(B, vocab, self.vocab.sentinel(0), self.vocab.sentinel(0) + 1, dev)
        out = torch.zeros(B, vocab, dtype=torch.bool, device=dev)
        is_mark = self.vocab.is_sentinel(generated.cpu().numpy()) | (generated.cpu().numpy() == self.vocab.eos_id)
        for b in range(B):
            marks = np.flatnonzero(is_mark[b])
            i, j = len(marks) - 1, t - 1 - marks[-1]  # current span and its length so far
            if int(generated[b, marks[-1]]) == self.vocab.eos_id:
                out[b, self.vocab.eos_id] = True  # finished: EOS padding
                continue
            target = self.lengths[i] if self.lengths is not None else None
            can_close = j >= self.unit and j % self.unit == 0 and (target is None or j == target)
            must_close = (target is not None and j >= target) or (self.max_span is not None and j >= self.max_span)
            if can_close or must_close:
                out[b, self._close(i)] = True
            if not must_close:
                span = generated[b:b + 1, marks[-1] + 1:]
                inner = (self.inner.allowed(span, vocab)[0] if self.inner is not None
                         else block_mask(1, vocab, 0, self.vocab.base_vocab_size, dev)[0])
                out[b] |= inner & (torch.arange(vocab, device=dev) < self.vocab.base_vocab_size)
        return out


def t5_infill(model: nn.Module, vocab, segments: list[np.ndarray], num_samples: int = 1, *, mode: str = "X",
              unit: int = 1, inner: Constraint | None = None, lengths: list[int] | None = None,
              max_span: int = 256, **sampling) -> list[np.ndarray]:
    """Fill the gaps between segments; returns one merged tape per sample (segments kept)."""
    num_gaps = len(segments) - 1
    if num_gaps < 1:
        raise UserError("in-filling needs a gap: give a prefix and a suffix (a gap marker in the prompt, "
                        "or --infill-range START:END)")
    if num_gaps > vocab.num_sentinels:
        raise UserError(f"{num_gaps} gaps but the checkpoint has {vocab.num_sentinels} sentinels")
    body = [segments[0]]
    for i, s in enumerate(segments[1:]):
        body += [np.array([vocab.sentinel(i)]), s]
    body = np.concatenate(body).astype(np.int64)
    inputs = np.concatenate([[vocab.mode_id(mode)], body, [vocab.eos_id]])
    x = torch.tensor(np.tile(inputs, (num_samples, 1)), dtype=torch.long, device=_device(model))
    grammar = SpanGrammar(vocab, num_gaps, unit, inner, lengths, None if lengths else max_span)
    budget = (sum(lengths) if lengths else num_gaps * max_span) + num_gaps + 1
    out = t5_generate(model, x, budget, logits_processor=grammar, eos_id=vocab.eos_id, **sampling).cpu().numpy()
    from amtrain.data.span_corruption import merge_inputs_targets

    tapes = []
    for row in out:
        end = np.flatnonzero(row == vocab.eos_id)
        row = row[:end[0]] if end.size else row
        tapes.append(merge_inputs_targets(body, row, vocab))
    return tapes


class _BaseOnly(Constraint):
    """Continuation targets: base-vocabulary ids only (no sentinel, EOS or mode id), under an
    optional inner constraint, with forced ids at given new-token indices."""

    def __init__(self, base: int, inner: Constraint | None, forced: dict[int, int], num_before: int):
        self.base, self.inner, self.forced, self.num_before = base, inner, forced, num_before

    def allowed(self, generated, vocab):
        i = self.num_before + generated.shape[1]
        if i in self.forced:
            return block_mask(generated.shape[0], vocab, self.forced[i], self.forced[i] + 1, generated.device)
        m = (torch.arange(vocab, device=generated.device)[None] < self.base).expand(generated.shape[0], vocab)
        return m & self.inner.allowed(generated, vocab) if self.inner is not None else m


def t5_continue(model: nn.Module, vocab, prompt: np.ndarray, max_new_tokens: int, num_samples: int = 1, *,
                context: int = 512, stride: int | None = None, header: int = 0, unit: int = 1,
                inner_for=None, forced: dict[int, int] | None = None, seed: int | None = None,
                **sampling) -> np.ndarray:
    """Prefix-LM continuation by rounds; returns tapes (N, len(prompt) + max_new_tokens).
    `inner_for(tape (N, t))` builds the round's constraint on the new ids (positions from 0);
    `forced` maps new-token indices (over all rounds) to the id they must be."""
    stride = context // 2 if stride is None else stride
    keep = context - stride
    tape = np.tile(np.asarray(prompt, np.int64), (num_samples, 1))
    remaining, r = max_new_tokens, 0
    while remaining > 0:
        start = window_start(tape.shape[1], keep, header, unit) if tape.shape[1] > keep else header
        prefix = np.concatenate([tape[:, :header], tape[:, start:]], 1)
        x = np.concatenate([np.full((num_samples, 1), vocab.mode_id("S")), prefix,
                            np.full((num_samples, 1), vocab.eos_id)], 1)
        n = min(remaining, stride)
        inner = inner_for(tape) if inner_for is not None else None
        new = t5_generate(model, torch.tensor(x, device=_device(model)), n,
                          logits_processor=_BaseOnly(vocab.base_vocab_size, inner, forced or {},
                                                     max_new_tokens - remaining),
                          seed=None if seed is None else seed + r, **sampling).cpu().numpy()
        tape = np.concatenate([tape, new], 1)
        remaining -= n
        r += 1
    return tape


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
