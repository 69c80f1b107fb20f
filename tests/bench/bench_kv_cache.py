"""Generation speed with vs without the KV cache, measured in the same run.

    PYTHONPATH=. python tests/bench/bench_kv_cache.py [--size small] [--context 1024] [--new 64] [--threads 1]

A `size` decoder (gpt2 vocab, random init: speed does not depend on the weights) continues a
prompt of context - new tokens by `new` tokens, so the last token lands at position `context`.
Both runs use `amtrain.generate.loop.generate` with the same seed and must produce the same
tokens (checked). Tokens/s counts generated tokens over the whole call (prefill included).
Prints one table row per mode and the ratio; figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from amtrain.generate.loop import generate
from amtrain.models.decoder import Decoder
from amtrain.registry import family

GPT2_VOCAB = 50257


def timed_generate(model: Decoder, prompt: torch.Tensor, new: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = generate(model, prompt, new, temperature=1.0, top_k=50, seed=0, use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Decoder(family("decoder").config(args.size, vocab_size=GPT2_VOCAB, max_seq_len=args.context)).eval()
    prompt = torch.randint(0, GPT2_VOCAB, (1, args.context - args.new))
    timed_generate(model, prompt[:, :32], 4, use_cache=True)  # warm-up
    cached_s, cached = timed_generate(model, prompt, args.new, use_cache=True)
    full_s, full = timed_generate(model, prompt, args.new, use_cache=False)
    assert torch.equal(cached, full), "cached and uncached generation disagree"
    print(f"decoder {args.size} ({model.num_params():,} params), prompt {prompt.shape[1]} + {args.new} new "
          f"= {args.context} tokens, {args.threads} thread(s), torch {torch.__version__}")
    print("| mode | seconds | generated tokens/s |")
    print("|---|---|---|")
    print(f"| KV cache | {cached_s:.2f} | {args.new / cached_s:.1f} |")
    print(f"| no cache (full forward per token) | {full_s:.2f} | {args.new / full_s:.2f} |")
    print(f"speed-up with cache: {full_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
