"""Autoregressive sampling from a decoder: `generate` (temperature, top-k, top-p, seed, KV
cache, EOS, a logits-processor hook) and the logit filters it uses.

Shape legend: B batch, T0 prompt length, t tokens so far, V the tokenizer's vocab_size
(model rows beyond V are vocabulary padding and are cut off before any choice, so a padded id
can never be produced).

The model is called as `model(ids, cache=cache, last_only=True)` -> (logits (B, 1, V'), _):
only the last position is projected onto the vocabulary (nanoGPT's `lm_head(x[:, [-1]])`), so a
long prompt's prefill never builds its (B, T0, V') logits. `Decoder` and `LSTMLM` take it.

Sequences longer than the model's context are not handled here (no sliding window): asking
for prompt + new tokens > max_seq_len is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from amtrain.errors import UserError

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept too), -inf elsewhere. (B, V)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to >= p (always at least the most likely one), -inf elsewhere. (B, V).
    p >= 1 keeps everything (no fp32 cumsum rounding can drop a token then)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p, so it stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _check_args(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError(f"prompt: expected token ids of shape (batch, length >= 1), got {tuple(prompt.shape)}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise UserError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                        f"exceeds the model's context max_seq_len={model.cfg.max_seq_len}; "
                        "shorten the prompt or ask for fewer tokens")
    if int(prompt.max()) >= model.cfg.vocab_size or int(prompt.min()) < 0:
        raise UserError(f"prompt: token ids must lie in [0, {model.cfg.vocab_size}) (the model's vocab_size)")
    if max_new_tokens < 0 or temperature < 0:
        raise UserError("max_new_tokens and temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p: must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Choose one id per row from logits (B, V): greedy at temperature 0, else sample from the
    filtered, tempered distribution. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, logits_processor: LogitsProcessor | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Continue each row of `prompt` (B, T0) by up to `max_new_tokens` ids; returns (B, T0 + n).

    temperature 0 is greedy; top_k / top_p filter before sampling; `seed` makes the draws
    reproducible (a private torch.Generator, the global RNG is untouched); `use_cache` decodes
    with the KV cache (same tokens as without, much faster). `logits_processor(logits (B, V),
    generated (B, t)) -> logits` runs before the filters (e.g. to forbid ids by grammar).
    With `eos_id`, a row that produced it is padded with eos_id from then on and generation
    stops early (n < max_new_tokens) once every row has. The model runs in eval mode and is
    put back in its previous mode afterwards.
    """
    _check_args(model, prompt, max_new_tokens, temperature, top_k, top_p)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompt, max_new_tokens, temperature, top_k, top_p, generator,
                       use_cache, logits_processor, eos_id)
    finally:
        model.train(was_training)


def _decode(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, use_cache,
            logits_processor, eos_id) -> torch.Tensor:
    B, T0 = prompt.shape
    vocab_size = model.cfg.vocab_size
    cache = model.new_cache(B, T0 + max_new_tokens, device=prompt.device) if use_cache else None
    seq = prompt
    feed = prompt  # what the next forward consumes: the prompt, then one token at a time
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits, _ = model(feed if use_cache else seq, cache=cache, last_only=True)
        logits = logits[:, -1, :vocab_size].float()  # (B, V): padded rows cut off
        if logits_processor is not None:
            logits = logits_processor(logits, seq)
        tok = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            tok = tok.masked_fill(done[:, None], eos_id)
            done |= tok[:, 0] == eos_id
        seq = torch.cat([seq, tok], dim=1)  # (B, t + 1)
        feed = tok
        if eos_id is not None and bool(done.all()):
            break
    return seq
