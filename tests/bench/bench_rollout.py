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
3. Memory of T5 audio rollouts per prompt length (`--table memory`): a debug T5 on EnCodec
   24 kHz codes at 6 kbps (K = 8 codebooks, delay layout, 75 frames/s = 600 tokens/s; random
   codes and weights: memory does not depend on them); for each prompt length one fresh
   subprocess in-fills 1 s in the middle and another continues by 1 s, each reporting its peak
   RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), its RSS before the rollout (Python, torch
   and the model) and the longest encoder input it ran. Each child runs under an address-space
   cap (`--cap-gb`, RLIMIT_AS), so a rollout that would need more fails there with a
   MemoryError instead of waking the OOM killer.

    PYTHONPATH=. python tests/bench/bench_rollout.py --table memory [--seconds 5 10 20 60] [--cap-gb 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


MEMORY_CODEBOOKS, MEMORY_FRAME_RATE = 8, 75.0  # EnCodec 24 kHz at 6 kbps


def memory_child(ckpt: str, seconds: float, mode: str, cap_gb: float) -> dict:
    """One rollout of a `seconds` prompt in this (fresh) process: peak RSS and encoder lengths."""
    import resource

    import numpy as np

    from amtrain.rollout.load import load_rollout_model
    from amtrain.rollout.run import RolloutConfig, rollout

    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rm = load_rollout_model(Path(ckpt))
    lengths, encode = [], rm.model.encode
    rm.model.encode = lambda ids, mask=None: (lengths.append(ids.shape[1]), encode(ids, mask))[1]
    frames = round(seconds * MEMORY_FRAME_RATE)
    codes = np.random.default_rng(0).integers(0, 1024, (MEMORY_CODEBOOKS, frames))
    mid = seconds / 2
    cfg = (RolloutConfig(mode="infill", infill_range=(mid - 0.5, mid + 0.5), frame_rate=MEMORY_FRAME_RATE)
           if mode == "infill" else RolloutConfig(length=1.0, seconds=True, frame_rate=MEMORY_FRAME_RATE))
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, error = time.perf_counter(), ""
    try:
        rollout(rm, codes, cfg)
    except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError past the cap
        error = f"{type(e).__name__} at the {cap_gb:g} GiB cap"
    return {"seconds": seconds, "mode": mode, "prompt_tokens": frames * MEMORY_CODEBOOKS,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mb": base_mb,
            "encoder_max": max(lengths, default=0), "wall_s": time.perf_counter() - start, "error": error}


def memory_table(seconds: list[float], cap_gb: float) -> None:
    from tests.rollout_helpers import t5_ckpt

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = t5_ckpt(Path(tmp) / "t5", "audio", {"num_codebooks": MEMORY_CODEBOOKS, "layout": "delay"})
        rows = []
        for s in seconds:
            for mode in ("infill", "continue"):
                arg = json.dumps([str(ckpt), s, mode, cap_gb])
                out = subprocess.run([sys.executable, __file__, "--memory-child", arg], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{s} s {mode}: the child failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"T5 debug, audio K={MEMORY_CODEBOOKS} delay ({MEMORY_FRAME_RATE:g} frames/s), default --t5-context 512; "
          f"one subprocess per row, RLIMIT_AS {cap_gb:g} GiB; torch {torch.__version__}")
    print("| prompt | prompt tokens | mode | longest encoder input (tokens) | RSS before the rollout (MB) "
          "| peak RSS (MB) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"> {cap_gb * 1024:.0f} ({r['error']})" if r["error"] else f"{r['peak_mb']:.0f}"
        print(f"| {r['seconds']:g} s | {r['prompt_tokens']} | {r['mode']} | {r['encoder_max']} | {r['base_mb']:.0f} "
              f"| {peak} | {r['wall_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("speed", "memory", "all"), default="all")
    ap.add_argument("--size", default="small")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, nargs="+", default=[5, 10, 20, 60], help="memory: prompt lengths")
    ap.add_argument("--cap-gb", type=float, default=12.0, help="memory: address-space cap of each child")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*json.loads(args.memory_child))))
        return
    if args.table in ("speed", "all"):
        speed_tables(args)
    if args.table in ("memory", "all"):
        memory_table(args.seconds, args.cap_gb)


def speed_tables(args) -> None:
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
