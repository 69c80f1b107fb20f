"""Mixture of experts and latent attention, each against its baseline in the same run.

    PYTHONPATH=. python tests/bench/bench_moe.py [--steps 200] [--context 1024] [--new 64] [--threads 1]

(a) MoE vs dense at the same ACTIVE parameters: the debug decoder (MHA) with its dense MLP
    (d_ff 256) against 1 shared + 4 routed experts of width 128, top-1 (a token uses 128 + 128 =
    256 hidden units, as the dense MLP), trained through `amtrain.train.loop.train` on the
    bundled corpus (ascii tokens: a 128-row vocabulary, so the blocks dominate the cost) with the same seed, data order and tokens. Held-out loss (the
    run's validation set) and training tokens/s (mean of the train records after the first).
(b) MLA vs MHA of the same width (the `small` decoder, 256 wide, 8 heads, 6 layers): KV-cache
    bytes per token (all layers, fp32) and their ratio, and generation tokens/s with the cache
    for a prompt of context - new tokens plus `new` sampled tokens (random weights: speed does
    not depend on them).
(c) Expert load after training: max/mean tokens per expert (1 = even) of the MoE run of (a)
    (bias rule on, speed 0.01, the nano-GPT-v3 value) against the same run with speed 0.001
    (DeepSeek-V3's value) and 0 (no rule); mean over the last 20 steps and the layers.
Prints markdown tables; the figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from amtrain.generate.loop import generate
from amtrain.models.decoder import Decoder
from amtrain.registry import family
from amtrain.train.loop import train
from tests.train_helpers import from_args, metrics, tiny

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv" / "kjv_pentateuch.txt"
GPT2_VOCAB = 50257
MOE = {"n_routed_experts": 4, "top_k_experts": 1, "n_shared_experts": 1, "moe_d_ff": 128}


def run(data: Path, out: Path, steps: int, overrides: dict) -> dict:
    res = train(from_args(tiny(data, out, **{
        "model.overrides": overrides, "train.max_steps": steps, "data.seq_len": 128, "batch.micro_batch": 8,
        "batch.global_tokens": 2048, "optim.warmup_steps": steps // 10, "train.eval_batches": 8,
        "train.log_every": 10, "optim.lr": 3e-3, "optim.min_lr": 3e-4})))
    train_recs = metrics(out)[1:]
    moe = metrics(out, "moe")[-20:]
    layers = sorted({k.split("/")[0] for r in moe for k in r if k.endswith("max_over_mean")})
    return {"val_loss": res.val_loss, "tok_s": statistics.mean(r["tokens_per_s"] for r in train_recs),
            "tokens": res.state.tokens_seen,
            "max_over_mean": statistics.mean(r[f"{k}/max_over_mean"] for r in moe for k in layers) if moe else None}


def bench_moe(steps: int) -> None:
    from amtrain.prep.text import prep_text

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "kjv"
        prep_text([str(KJV)], data, tokenizer="ascii", show_progress=False)
        fam = family("decoder")
        shapes = {name: fam.build(fam.config("debug", vocab_size=128, **ov)).num_params
                  for name, ov in (("dense", {}), ("moe", MOE))}
        rows = {"dense MLP (d_ff 256)": ({}, "dense"),
                "MoE 1 shared + 4 routed x 128, top-1, bias rule": ({**MOE, "bias_update_speed": 0.01}, "moe"),
                "MoE, same, bias speed 0.001": ({**MOE, "bias_update_speed": 0.001}, "moe"),
                "MoE, same, no bias rule (speed 0)": ({**MOE, "bias_update_speed": 0.0}, "moe")}
        results = {name: run(data, Path(tmp) / f"run{i}", steps, ov) for i, (name, (ov, _)) in enumerate(rows.items())}
    print(f"(a) debug decoder on the bundled corpus (ascii bytes), {steps} steps x 2048 tokens, 1 process, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print("| FFN | active params | total params | held-out loss | train tokens/s |")
    print("|---|---|---|---|---|")
    for name, (_, kind) in list(rows.items())[:2]:
        r = results[name]
        count = shapes[kind]
        print(f"| {name} | {count(active=True):,} | {count():,} | {r['val_loss']:.4f} | {r['tok_s']:,.0f} |")
    print()
    print("(c) expert load after training: max/mean tokens per expert (1 = even), last 20 steps, both layers")
    print("| run | max/mean load |")
    print("|---|---|")
    for name in list(rows)[1:]:
        print(f"| {name} | {results[name]['max_over_mean']:.3f} |")


def bench_mla(context: int, new: int) -> None:
    fam = family("decoder")
    print()
    print(f"(b) `small` decoder (6 x 256 wide, 8 heads), gpt2 vocab, prompt {context - new} + {new} new = {context} "
          f"tokens, KV cache, fp32, {torch.get_num_threads()} thread(s)")
    print("| attention | cache bytes / token | ratio to MHA | generated tokens/s |")
    print("|---|---|---|---|")
    base = None
    for name, ov in (("MHA", {}), ("MLA (kv_lora_rank 128, rope key 16)", {"attention": "mla"}),
                     ("MLA (kv_lora_rank 64, rope key 16, q_lora_rank 128)",
                      {"attention": "mla", "kv_lora_rank": 64, "q_lora_rank": 128})):
        torch.manual_seed(0)
        model = Decoder(fam.config("small", vocab_size=GPT2_VOCAB, max_seq_len=context, **ov)).eval()
        cache = model.new_cache(1, context)
        per_token = sum(t.numel() * t.element_size() for t in vars(cache).values() if torch.is_tensor(t)) // context
        base = base or per_token
        prompt = torch.randint(0, GPT2_VOCAB, (1, context - new), generator=torch.Generator().manual_seed(0))
        generate(model, prompt[:, :32], 4, temperature=1.0, top_k=50, seed=0)  # warm-up
        start = time.perf_counter()
        generate(model, prompt, new, temperature=1.0, top_k=50, seed=0)
        seconds = time.perf_counter() - start
        print(f"| {name} | {per_token:,} | {per_token / base:.3f} | {new / seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_moe(args.steps)
    bench_mla(args.context, args.new)


if __name__ == "__main__":
    main()
