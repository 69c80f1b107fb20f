"""The one decode loop, for every model family (after litgpt `generate/base.py`):

    logits = step.prefill(prompt)                       one forward over the prompt
    repeat up to max_new_tokens:
        logits = processors(logits, seq)                grammar masks, forced ids (the caller's)
        id = sampler(logits, seq)                       temperature/top-k/top-p, then argmax or a draw
        rows that produced eos repeat eos; stop once every row has
        seq = seq + id;  logits = step.step(seq)        one cached forward per id

A `ModelStep` (`amtrain.generate.steps`) hides the family: `LMStep` for the decoder and the
LSTM, `T5Step` for T5's decoder over a fixed encoder output. `generate` (decoder, LSTM) and
`t5_generate` (T5) are the two entry points; continuation past the context and T5 in-filling
are built on them (`amtrain.generate.window`, `amtrain.generate.t5`).

Shape legend: B batch, T0 prompt length, t ids so far, n new ids, V the tokenizer's vocab_size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch

from amtrain.errors import UserError
from amtrain.generate.processors import LogitsProcessor, sampling_processors
from amtrain.generate.steps import LMStep, ModelStep, T5Step
from amtrain.models.base import SequenceModel
from amtrain.models.t5 import T5

Seed = int | Sequence[int] | None
"""A sampling seed: None (the global RNG), one int (one private generator for the batch), or
one int per batch row (a private generator per row: row i draws exactly what it would draw
alone, as a batch of one, with seed[i])."""


def offset_seed(seed: Seed, offset: int) -> Seed:
    """`seed` moved by `offset` (each row's, for per-row seeds): a window round's or a sample's."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return seed + offset
    return [s + offset for s in seed]


class Sampler:
    """Chooses one id per row from logits (B, V) -> (B, 1): greedy (argmax) at temperature 0,
    else temperature, top-k and top-p (`sampling_processors`) and one draw from the softmax.
    `seed` makes the draws reproducible with a private torch.Generator (the global RNG is
    untouched); one sampler's draws continue from call to call. A list of seeds, one per row,
    gives each row its own generator, drawing for its row alone: the batch's row i gets the
    ids a batch of one with seed[i] gets (the serve worker batches jobs of different seeds)."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: Seed = None, device: torch.device | str = "cpu"):
        self.greedy = temperature == 0
        self.warpers = sampling_processors(temperature, top_k, top_p)
        self.generator: torch.Generator | None = None
        self.row_generators: list[torch.Generator] | None = None
        if isinstance(seed, int):
            self.generator = torch.Generator(device=device).manual_seed(seed)
        elif seed is not None:
            self.row_generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = self.warpers(logits, generated).softmax(dim=-1)
        if self.row_generators is None:
            return torch.multinomial(probs, 1, generator=self.generator)  # (B, 1)
        if len(self.row_generators) != probs.shape[0]:
            raise UserError(f"{len(self.row_generators)} seeds for a batch of {probs.shape[0]} rows: give one a row")
        return torch.cat([torch.multinomial(p[None], 1, generator=g)  # each row as a (1, V) batch of one
                          for p, g in zip(probs, self.row_generators, strict=True)])  # (B, 1)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def decode(step: ModelStep, prompt: torch.Tensor, max_new_tokens: int, sampler: Sampler,
           processors: LogitsProcessor | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Continue each row of `prompt` (B, T0) by up to `max_new_tokens` ids: (B, T0 + n).

    `processors(logits (B, V), seq (B, t)) -> logits` run before the sampler (a
    `LogitsProcessorList` or one processor). With `eos_id`, a row that produced it is padded
    with eos_id from then on and decoding stops early (n < max_new_tokens) once every row has.
    The model runs in eval mode and is put back in its previous mode afterwards."""
    seq = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    with eval_mode(step.model):
        for i in range(max_new_tokens):
            logits = step.prefill(seq, prompt.shape[1] + max_new_tokens) if i == 0 else step.step(seq)  # (B, V)
            if processors is not None:
                logits = processors(logits, seq)
            tok = sampler(logits, seq)  # (B, 1)
            if eos_id is not None:
                tok = tok.masked_fill(done[:, None], eos_id)
                done |= tok[:, 0] == eos_id
            seq = torch.cat([seq, tok], dim=1)  # (B, t + 1)
            if eos_id is not None and bool(done.all()):
                break
    return seq


def generate(model: SequenceModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: Seed = None,
             use_cache: bool = True, logits_processor: LogitsProcessor | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Decoder or LSTM: continue each row of `prompt` (B, T0) by up to `max_new_tokens` ids;
    returns (B, T0 + n). Sampling as `Sampler` (`seed`: one int, or one per row), processors and
    EOS as `decode`. Sequences longer than the model's context are
    `amtrain.generate.window.generate_long`'s: asking for prompt + new tokens > max_seq_len here
    is an error."""
    _check_prompt(model, prompt, max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed, prompt.device)
    return decode(LMStep(model, use_cache), prompt, max_new_tokens, sampler, logits_processor, eos_id)


def t5_generate(model: SequenceModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: Seed = None,
                use_cache: bool = True, logits_processor: LogitsProcessor | None = None,
                eos_id: int | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T5: decode targets for inputs (B, S) (1 = attend in `attention_mask`); returns the
    generated targets (B, n), the decoder start token not included. The processors see the
    targets so far (B, t). Temperature 0 is the greedy decode of exact-match evaluation."""
    sampler = Sampler(temperature, top_k, top_p, seed, input_ids.device)
    targets = input_ids.new_empty((input_ids.shape[0], 0))
    return decode(T5Step(cast(T5, model), input_ids, attention_mask, use_cache), targets, max_new_tokens, sampler,
                  logits_processor, eos_id)


def _check_prompt(model: SequenceModel, prompt: torch.Tensor, max_new_tokens: int) -> None:
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError(f"prompt: expected token ids of shape (batch, length >= 1), got {tuple(prompt.shape)}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise UserError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                        f"exceeds the model's context max_seq_len={model.cfg.max_seq_len}; "
                        "shorten the prompt or ask for fewer tokens")
    if int(prompt.max()) >= model.cfg.vocab_size or int(prompt.min()) < 0:
        raise UserError(f"prompt: token ids must lie in [0, {model.cfg.vocab_size}) (the model's vocab_size)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
