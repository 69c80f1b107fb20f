"""Rollout speed, each figure a ratio against a baseline measured in the same run.

    PYTHONPATH=. python tests/bench/bench_rollout.py [--size small] [--context 1024] [--new 64] [--threads 1]

1. amtrain `generate` (KV cache) against Hugging Face `GPT2LMHeadModel.generate` (its KV cache)
   on a model of the same shape (layers, heads, width, d_ff, context, gpt2 vocab; random
   weights: speed does not depend on them): a prompt of context - new tokens, `new` sampled
   tokens (top-k 50), so the last token lands at position `context`.
2. Continuation past the context: `new` tokens after a prompt that already fills the context,
   through `generate_long` (stride stitching: one re-prefill per `stride` tokens, KV cache)
   against the naive sliding window (each token recomputes the last context - 1 tokens, as
   AMT's `add_token` does), same seed; the two tapes differ (different windows), so only the
   speed is compared.
Tokens/s counts generated tokens over the whole call (prefill included).
"""

from __future__ import annotations

import argparse
import time

import torch

from amtrain.generate.loop import generate
from amtrain.generate.window import generate_long
from amtrain.models.decoder import Decoder
from amtrain.registry import family

GPT2_VOCAB = 50257


def hf_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                    n_head=cfg.num_heads, n_inner=cfg.d_ff, attn_implementation="sdpa")
    return GPT2LMHeadModel(hf).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive_sliding(model, prompt, new, seed):
    """Stride 1: every token re-runs the model over the last context - 1 tokens (no cache)."""
    g = torch.Generator().manual_seed(seed)
    seq = prompt
    for _ in range(new):
        logits, _ = model(seq[:, -(model.cfg.max_seq_len - 1):])
        probs = torch.topk(logits[:, -1, :GPT2_VOCAB], 50)
        pick = torch.multinomial(probs.values.softmax(-1), 1, generator=g)
        seq = torch.cat([seq, probs.indices.gather(1, pick)], 1)
    return seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = family("decoder").config(args.size, vocab_size=GPT2_VOCAB, max_seq_len=args.context)
    ours, hf = Decoder(cfg).eval(), hf_gpt2(cfg)
    prompt = torch.randint(0, GPT2_VOCAB, (1, args.context - args.new))
    generate(ours, prompt[:, :32], 4)  # warm-up
    hf.generate(prompt[:, :32], max_new_tokens=4, do_sample=True, top_k=50)
    with torch.no_grad():
        ours_s = timed(lambda: generate(ours, prompt, args.new, top_k=50, seed=0))
        torch.manual_seed(0)
        out = {}
        hf_s = timed(lambda: out.setdefault("x", hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                                max_new_tokens=args.new, min_new_tokens=args.new,
                                                                do_sample=True, top_k=50, pad_token_id=0)))
        assert out["x"].shape[1] == args.context
        full = torch.randint(0, GPT2_VOCAB, (1, args.context))
        win_s = timed(lambda: generate_long(ours, full, args.new, stride=args.stride, top_k=50, seed=0))
        naive_s = timed(lambda: naive_sliding(ours, full, args.new, 0))
    print(f"{args.size}: ours {ours.num_params():,} params, HF GPT2 {hf.num_parameters():,}; context {args.context}, "
          f"{args.new} new tokens, {args.threads} thread(s), torch {torch.__version__}")
    print("| run | seconds | generated tokens/s |")
    print("|---|---|---|")
    print(f"| amtrain generate (KV cache) | {ours_s:.2f} | {args.new / ours_s:.1f} |")
    print(f"| HF GPT2LMHeadModel.generate (KV cache) | {hf_s:.2f} | {args.new / hf_s:.1f} |")
    print(f"| generate_long past the context (stride {args.stride or args.context // 2}, KV cache) | {win_s:.2f} | {args.new / win_s:.1f} |")
    print(f"| naive sliding window (stride 1, recompute) | {naive_s:.2f} | {args.new / naive_s:.2f} |")
    print(f"amtrain / HF: {hf_s / ours_s:.2f}x; stride stitching / naive sliding: {naive_s / win_s:.1f}x")


if __name__ == "__main__":
    main()
