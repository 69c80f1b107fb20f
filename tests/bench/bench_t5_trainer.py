"""Benchmark: T5 training tokens/s against the decoder at the same non-embedding parameter
count, both through the amtrain trainer (`amtrain.train.loop.train`: one rank, ZeRO-2, fp32,
CPU gloo), in one run.

    python tests/bench/bench_t5_trainer.py [--inputs-length 256] [--micro-batch 8] [--steps 10] [--rounds 2]

The T5 run is the trainer's T5 path as configured by ds_configs/t5_debug.yaml (DenoisingBatcher
batches under a curriculum at level 0: R .8 / X .1 / S .1; targets padded to what every
curriculum denoiser needs). The decoder (4 parallel blocks of width 64, F 256: the T5 debug's
non-embedding parameter count) trains on windows of inputs + targets tokens, so both see the
same tokens per example and per step. Tokens/s is the trainer's own `tokens_per_s` (tokens per
step / step time), median over the steps after the first two, of each run; runs alternate
T5 / decoder `--rounds` times so a change of machine load hits both. Prints a markdown table and
the ratio T5 / decoder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.prep.text import prep_text  # noqa: E402
from amtrain.train.loop import train  # noqa: E402
from tests.train_helpers import from_args, metrics  # noqa: E402

DECODER = {"num_layers": 4, "num_heads": 4, "d_model": 64, "d_ff": 256}


def common(data: Path, out: Path, micro: int, steps: int) -> dict:
    return {"data.path": str(data), "train.out_dir": str(out), "train.resume": "never", "model.size": "debug",
            "batch.micro_batch": micro, "batch.grad_accum": 1, "train.max_steps": steps, "train.log_every": 1,
            "train.eval_every": 0, "data.val_split": '""', "train.checkpoint_every": 0,
            "train.checkpoint_minutes": 0, "train.progress": False, "train.peak_flops": 1e11,
            "ds_config": str(REPO / "ds_configs" / "zero2.json")}


def tokens_per_s(out: Path) -> float:
    rows = metrics(out)
    return statistics.median(r["tokens_per_s"] for r in rows[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results: dict[str, list[float]] = {"t5": [], "decoder": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep_text([str(REPO / "data/kjv/kjv_pentateuch.txt")], tmp / "kjv", tokenizer="gpt2", show_progress=False)
        info = {}
        for r in range(args.rounds):
            out = tmp / f"t5_{r}"
            train(from_args({**common(tmp / "kjv", out, args.micro_batch, args.steps), "model.arch": "t5",
                             "denoise.inputs_length": args.inputs_length, "denoise.curriculum": {"mode": "schedule"}}))
            results["t5"].append(tokens_per_s(out))
            info["t5"] = json.loads((out / "run_info.json").read_text())
            seq_len = info["t5"]["tokens_per_step"] // args.micro_batch  # inputs + targets
            out = tmp / f"decoder_{r}"
            train(from_args({**common(tmp / "kjv", out, args.micro_batch, args.steps), "data.seq_len": seq_len,
                             "model.overrides": DECODER}))
            results["decoder"].append(tokens_per_s(out))
            info["decoder"] = json.loads((out / "run_info.json").read_text())
    from amtrain.data.span_corruption import T5Vocab
    from amtrain.models.decoder import Decoder, DecoderConfig
    from amtrain.models.t5 import T5
    from amtrain.registry import family

    vocab = T5Vocab(50257)  # gpt2 + T5 specials and sentinels, as the trainer builds it
    t5 = T5(family("t5").config("debug", vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                               decoder_start_token_id=vocab.pad_id))
    dec = Decoder(DecoderConfig(vocab_size=50257, max_seq_len=seq_len, **DECODER))
    print(f"\nmicro-batch {args.micro_batch}, T5 inputs {args.inputs_length} + targets "
          f"{seq_len - args.inputs_length}, decoder windows {seq_len}; one rank, ZeRO-2, fp32, 1 thread; "
          f"{args.steps} steps x {args.rounds} rounds\n")
    print("| model | non-embedding params | params | tokens/step | tokens/s (per round) | median tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, model in (("t5", t5), ("decoder", dec)):
        per_round = ", ".join(f"{v:,.0f}" for v in results[name])
        print(f"| {name} | {model.num_params(non_embedding=True):,} | {info[name]['num_params']:,} | "
              f"{info[name]['tokens_per_step']:,} | {per_round} | {statistics.median(results[name]):,.0f} |")
    ratio = statistics.median(results["t5"]) / statistics.median(results["decoder"])
    print(f"\nT5 / decoder tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
