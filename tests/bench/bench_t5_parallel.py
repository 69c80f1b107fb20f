"""Benchmark: T5 with parallel sub-blocks against serial T5 at equal parameters, in one run.

    python tests/bench/bench_t5_parallel.py [--size debug] [--tokenizer ascii] [--steps 150]
                                            [--batch-size 16] [--inputs-length 128] [--seeds 0,1]

Serial T5 (`SIZE`: encoder SA -> FFN, decoder SA -> CA -> FFN, a norm before each) against
`SIZE-parallel` (one norm per layer, its branches side by side: x + SA(n) [+ CA(n)] + FFN(n)).
Both have the same weight matrices, so the parameter counts differ only by the 3 x L x D norm
weights the parallel blocks drop (printed; well under 1%); with the same seed both start from the
same matrices (checked). Both train in plain torch (forward + backward + AdamW, fp32, one thread)
on the SAME batches of the bundled KJV corpus (UL2 R/X/S at the curriculum's initial mixture,
drawn once from the train split), step by step in turn (the order alternating each step, so the
machine's load falls on both alike): ms/step is the median over the steps, tokens/s counts input
+ padded target slots as the trainer does. Held-out loss: token-mean cross-entropy of fixed val-
split batches (the same for both) after equal numbers of training tokens. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.data.curriculum import Curriculum, CurriculumConfig  # noqa: E402
from amtrain.data.span_corruption import DenoisingBatcher, T5Vocab, required_targets_length  # noqa: E402
from amtrain.models.t5 import T5  # noqa: E402
from amtrain.prep.text import prep_text  # noqa: E402
from amtrain.registry import family  # noqa: E402
from amtrain.store.dataset import Dataset  # noqa: E402


def tensors(batch) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask),
            "labels": torch.from_numpy(batch.labels)}


def held_out(model: T5, batches: list[dict]) -> float:
    """Token-mean cross-entropy (nats) over all labelled positions of the val batches."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            _, nll = model(**b, return_logits=False, reduction="none")
            total += float(nll.sum())
            count += int((b["labels"] != -100).sum())
    model.train()
    return total / count


def norms_per_layer(model: T5) -> str:
    def count(layer) -> int:
        return sum(isinstance(m, torch.nn.RMSNorm) for m in layer.modules())

    return f"{count(model.encoder.layers[0])} / {count(model.decoder.layers[0])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="debug", help="serial T5 size; SIZE-parallel is its parallel twin")
    parser.add_argument("--tokenizer", default="ascii", help="KJV tokens: ascii (embeddings small) or gpt2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--inputs-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--evals", type=int, default=3, help="held-out evaluations, evenly spaced in tokens")
    parser.add_argument("--seeds", default="0,1", help="comma-separated init/data seeds (one run each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, S = args.batch_size, args.inputs_length
    names = (args.size, f"{args.size}-parallel")
    eval_steps = sorted({round(args.steps * (i + 1) / args.evals) for i in range(args.evals)})

    with tempfile.TemporaryDirectory() as tmp:
        prep_text([str(REPO / "data/kjv/kjv_pentateuch.txt")], Path(tmp), tokenizer=args.tokenizer,
                  show_progress=False)
        ds = Dataset(tmp)
        vocab = T5Vocab(ds.vocab_size)
        first = Curriculum(CurriculumConfig()).decide(0)  # R/X/S at the initial levels and shares
        T = required_targets_length(S, first.denoisers)
        results: dict[str, dict] = {n: {"ms": [], "loss": {s: [] for s in eval_steps}} for n in names}
        counts = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            train = DenoisingBatcher(ds.tokens("train"), vocab, S, T, seed=seed)
            batches = [tensors(train.batch(B, first.denoisers, first.weights)) for _ in range(args.steps)]
            val = DenoisingBatcher(ds.tokens("val"), vocab, S, T, seed=10_000 + seed)
            val_batches = [tensors(val.batch(B, first.denoisers, first.weights)) for _ in range(args.val_batches)]
            models, optimizers = {}, {}
            for n in names:
                torch.manual_seed(seed)
                models[n] = T5(family("t5").config(n, vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                                                   decoder_start_token_id=vocab.pad_id))
                optimizers[n] = torch.optim.AdamW(models[n].parameters(), lr=args.lr, weight_decay=0.0)
                counts[n] = (models[n].num_params(), models[n].num_params(non_embedding=True),
                             norms_per_layer(models[n]))
            serial_sd, parallel_sd = (models[n].state_dict() for n in names)
            assert all(torch.equal(v, serial_sd[k]) for k, v in parallel_sd.items()), "same init expected"
            for step, batch in enumerate(batches, start=1):
                for n in (names if step % 2 else names[::-1]):
                    start = time.perf_counter()
                    _, loss = models[n](**batch, return_logits=False)
                    loss.backward()
                    optimizers[n].step()
                    optimizers[n].zero_grad(set_to_none=True)
                    results[n]["ms"].append(1e3 * (time.perf_counter() - start))
                if step in eval_steps:
                    for n in names:
                        results[n]["loss"][step].append(held_out(models[n], val_batches))
    tokens_per_step = B * (S + T)
    seeds = args.seeds.split(",")
    print(f"KJV ({args.tokenizer}), B={B}, inputs {S} + targets {T} = {tokens_per_step:,} tokens/step, "
          f"{args.steps} steps, lr {args.lr}, fp32, 1 thread, seeds {args.seeds}; held-out: "
          f"{args.val_batches} x {B} val examples\n")
    loss_cols = " | ".join(f"held-out @ {s * tokens_per_step / 1e3:,.0f}k tok" for s in eval_steps)
    print(f"| model | norms / layer (enc / dec) | params | non-embedding | ms/step | tokens/s | {loss_cols} |")
    print("|---|---|---|---|---|---|" + "---|" * len(eval_steps))
    for n in names:
        total, non_emb, norms = counts[n]
        ms = statistics.median(results[n]["ms"])
        losses = " | ".join(f"{statistics.mean(results[n]['loss'][s]):.4f}" for s in eval_steps)
        print(f"| {n} | {norms} | {total:,} | {non_emb:,} | {ms:.1f} | {tokens_per_step / ms * 1e3:,.0f} | {losses} |")
    (ser_total, ser_ne, _), (par_total, par_ne, _) = counts[names[0]], counts[names[1]]
    ms = [statistics.median(results[n]["ms"]) for n in names]
    last = [statistics.mean(results[n]["loss"][eval_steps[-1]]) for n in names]
    print(f"\nparams parallel / serial: {par_total / ser_total:.5f} (non-embedding {par_ne / ser_ne:.4f}); "
          f"step time parallel / serial: {ms[1] / ms[0]:.3f}; final held-out loss parallel - serial: "
          f"{last[1] - last[0]:+.4f} nats")
    if len(seeds) > 1:
        per_seed = [b - a for a, b in zip(results[names[0]]["loss"][eval_steps[-1]],
                                          results[names[1]]["loss"][eval_steps[-1]], strict=True)]
        print("per seed (parallel - serial, final): " + ", ".join(f"{d:+.4f}" for d in per_seed))


if __name__ == "__main__":
    main()
