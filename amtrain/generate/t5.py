"""Sampling from the T5 denoiser: sentinel in-filling and prefix-LM continuation, both through
the one decode loop (`amtrain.generate.loop.t5_generate`: the decoder over a fixed encoder
output, preallocated KV cache; use_cache=False re-runs the decoder over all positions each
step, the same tokens, tested).

In-filling (`t5_infill`): segments s_0 .. s_n around n gaps become the input

    [X] s_0 <s_0> s_1 <s_1> ... <s_{n-1}> s_n EOS

and the target is decoded under `SpanGrammar`: it opens with <s_0>, each span holds whole
units (3 ids per MIDI event, K per audio frame) of base-vocabulary ids obeying the modality's
constraint, and span i closes with <s_{i+1}> (or EOS after the last). Exact span `lengths`
force each span to its gap's length (audio: the waveform keeps its duration); `forced` ids
inside the gaps go through `ForcedTokens`. The spans are put back between the segments
(`SpanGrammar.spans`), so every segment s_i is kept exactly.

Continuation (`t5_continue`): the UL2 S-denoiser, input `[S] prefix EOS`, target = the next
tokens; beyond `context` input tokens the prefix is the tape's last window (header + aligned
tail, as the decoder's sliding window) and each round adds up to `stride` tokens. One round is
`t5_prefix_round`; MIDI's continuation (`amtrain.generate.amt.amt_t5_continue`) runs the same
rounds over time-shifted windows.

The encoder's memory grows with the square of its input (attention scores and the relative
position bias are (B, H, S, S)), so no path feeds it the whole prompt: continuation shows it one
window a round, and in-filling shows it `InfillWindow` - the segments with the first one's head
and the last one's tail cut so the input fits `context` tokens; the cut ids go back on the tape
unchanged (`InfillWindow.restore`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.generate.grammar import Constraint, IdsBelow, SpanGrammar
from amtrain.generate.loop import t5_generate
from amtrain.generate.processors import ForcedTokens, LogitsProcessorList
from amtrain.generate.window import window_start
from amtrain.models.base import SequenceModel


def t5_infill(model: SequenceModel, vocab, segments: list[np.ndarray], num_samples: int = 1, *, mode: str = "X",
              unit: int = 1, inner: Constraint | None = None, lengths: list[int] | None = None,
              forced: dict[int, int] | None = None, max_span: int = 256, **sampling) -> list[np.ndarray]:
    """Fill the gaps between segments; returns one merged tape per sample (segments kept).
    `forced` maps an index into the gaps' ids, counted over the gaps in order (0 = the first id
    of the first gap), to the id it must be; it needs exact `lengths`."""
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
    processors = LogitsProcessorList([grammar])
    if forced:
        if lengths is None:
            raise ValueError("forced ids in a gap need exact span lengths")
        processors.append(ForcedTokens(_target_positions(forced, lengths)))
    budget = (sum(lengths) if lengths else num_gaps * max_span) + num_gaps + 1
    out = t5_generate(model, x, budget, logits_processor=processors, eos_id=vocab.eos_id, **sampling).cpu().numpy()
    tapes = []
    for row in out:  # the segments with each gap's span put back in place
        pieces = [segments[0]]
        for span, segment in zip(grammar.spans(row), segments[1:], strict=True):
            pieces += [span, segment]
        tapes.append(np.concatenate(pieces).astype(np.int64))
    return tapes


def _target_positions(forced: dict[int, int], lengths: list[int]) -> dict[int, int]:
    """Gap-id index -> target position: target 0 is <s_0>, gap i's ids follow the sentinel
    that opens it."""
    positions: list[int] = []
    start = 1
    for length in lengths:
        positions += range(start, start + length)
        start += length + 1
    return {positions[k]: v for k, v in forced.items()}


def t5_continue(model: SequenceModel, vocab, prompt: np.ndarray, max_new_tokens: int, num_samples: int = 1, *,
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
        n = min(remaining, stride)
        processors = [] if inner_for is None else [inner_for(tape)]
        if forced:
            processors.append(ForcedTokens(forced, start=-(max_new_tokens - remaining)))
        new = t5_prefix_round(model, vocab, np.concatenate([tape[:, :header], tape[:, start:]], 1), n, processors,
                              seed=None if seed is None else seed + r, **sampling)
        tape = np.concatenate([tape, new], 1)
        remaining -= n
        r += 1
    return tape


def t5_prefix_round(model: SequenceModel, vocab, prefix: np.ndarray, n: int, processors: list, **sampling) -> np.ndarray:
    """One S-denoiser round: the encoder sees `[S] prefix EOS` (N, p + 2), the decoder samples n
    base-vocabulary ids (no sentinel, EOS or mode id) under `processors`; returns them (N, n)."""
    N = prefix.shape[0]
    x = np.concatenate([np.full((N, 1), vocab.mode_id("S")), prefix, np.full((N, 1), vocab.eos_id)], 1)
    rules = LogitsProcessorList([IdsBelow(vocab.base_vocab_size), *processors])
    return t5_generate(model, torch.tensor(x, device=_device(model)), n, logits_processor=rules,
                       **sampling).cpu().numpy()


@dataclass
class InfillWindow:
    """The part of in-fill segments the encoder sees: `segments` with the first one's ids
    [header, header + cut_head) and the last one's final cut_tail ids left out."""

    segments: list[np.ndarray]
    header: int
    cut_head: np.ndarray
    cut_tail: np.ndarray

    def restore(self, tape: np.ndarray) -> np.ndarray:
        """A merged tape of the windowed segments -> the tape of the whole segments."""
        h = self.header
        return np.concatenate([tape[:h], self.cut_head, tape[h:], self.cut_tail]).astype(np.int64)

    @property
    def num_cut(self) -> int:
        return len(self.cut_head) + len(self.cut_tail)


def infill_window(segments: list[np.ndarray], context: int, *, header: int = 0, unit: int = 1) -> InfillWindow:
    """Fit the in-fill input `[X] s_0 <s_0> ... s_n EOS` into `context` tokens by cutting s_0's
    head (after its first `header` ids) and s_n's tail, in whole units, half of the room on each
    side of the gaps (a side shorter than its half gives the rest to the other). The segments
    between gaps are kept whole."""
    first, last = segments[0], segments[-1]
    if 2 + len(segments) - 1 + sum(len(s) for s in segments) <= context:
        return InfillWindow(list(segments), header, first[:0], last[:0])
    middle = sum(len(s) for s in segments[1:-1])
    room = context - 2 - (len(segments) - 1) - header - middle  # mode id, EOS, one sentinel per gap
    if room < 2 * unit:
        raise UserError(f"--t5-context {context}: too small for the {middle} tokens between the gaps "
                        f"(and {2 * unit} of context on either side); raise it")
    body = len(first) - header
    cut = -(-(body - min(body, max(room // 2, room - len(last)))) // unit) * unit  # whole units
    right = len(last) if len(last) <= room - (body - cut) else (room - (body - cut)) // unit * unit
    return InfillWindow([np.concatenate([first[:header], first[header + cut:]]), *segments[1:-1], last[:right]],
                        header, first[header:header + cut], last[right:])


def _device(model: SequenceModel) -> torch.device:
    return next(model.parameters()).device
