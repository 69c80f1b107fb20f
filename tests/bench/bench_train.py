"""Training throughput under amtrain against a minimal hand-written PyTorch loop, same run.

    OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/work/.torch_extensions THP_MEM_ALLOC_ENABLE=1 \
        python tests/bench/bench_train.py [--steps 10] [--rounds 2] [--two-ranks]

Model: the `small` decoder with 12 layers (d 256, 8 heads) on ascii tokens of the bundled KJV
corpus: 9.5M parameters. Batch: 8 windows x 256 tokens per step, AdamW (lr 1e-3, wd 0.1),
clip 1.0, fp32, one thread per rank.

* baseline: model + torch.optim.AdamW + clip_grad_norm_ + LambdaLR, the same batches
  (amtrain's loader) — the least a training loop does;
* amtrain: `train(cfg)` with one rank, ZeRO-2 (ds_configs/zero2.json);
* tokens/s ratio amtrain / baseline (target >= 0.9) over the timed steps (the first `warmup`
  steps of each run are not timed), baseline and amtrain alternating for `--rounds` rounds so
  load drift on a shared machine hits both sides alike; reported as the median step and the
  best step (the least disturbed by other jobs);
* MFU = tokens/s x flops_per_token(256) / peak, the peak measured here: the best 512^3 fp32 matmul
  on one thread over 3 s (amtrain.train.metrics.measure_peak_flops) (target >= 45%);
* --two-ranks: `deepspeed --num_accelerators 2` with the same per-rank batch; global tokens/s
  against the one-rank figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SEQ_LEN, MICRO, LR = 256, 8, 1e-3
MODEL = {"model.size": "small", "model.overrides": json.dumps({"num_layers": 12}), "data.seq_len": SEQ_LEN,
         "batch.micro_batch": MICRO, "optim.lr": LR, "optim.min_lr": LR / 10, "optim.warmup_steps": 2}


def prep_data(folder: Path) -> Path:
    from amtrain.prep.text import prep_text

    prep_text([str(REPO / "data" / "kjv" / "kjv_pentateuch.txt")], folder, tokenizer="ascii", show_progress=False)
    return folder


def run_args(data: Path, out: Path, steps: int) -> list[str]:
    args = {**MODEL, "data.path": str(data), "train.out_dir": str(out), "train.max_steps": steps,
            "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 0, "train.checkpoint_every": 0,
            "train.progress": "false", "ds_config": str(REPO / "ds_configs" / "zero2.json")}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def baseline(data: Path, steps: int, warmup: int) -> tuple[list[float], float]:
    """Per-step tokens/s of a plain PyTorch loop over the same model, batches and optimizer."""
    from amtrain.config import parse_args
    from amtrain.data.loader import TrainLoader
    from amtrain.store import Dataset
    from amtrain.train.builders import build_model

    cfg = parse_args(run_args(data, Path("unused"), steps))
    torch.manual_seed(cfg.train.seed)
    ds = Dataset(data)
    model = build_model(cfg, ds)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.optim.lr_at(s, steps) / LR)
    loader = TrainLoader(ds, "train", SEQ_LEN, MICRO, 1, 0, 1, cfg.train.seed)
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        (x, y), = loader.next_step()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        if step >= warmup:
            rates.append(MICRO * SEQ_LEN / (time.perf_counter() - t0))
    return rates, model.flops_per_token(SEQ_LEN)


def amtrain_rates(run_dir: Path, warmup: int) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > warmup]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating baseline / amtrain rounds")
    ap.add_argument("--two-ranks", action="store_true")
    a = ap.parse_args()
    from amtrain.config import parse_args
    from amtrain.train.loop import train
    from amtrain.train.metrics import measure_peak_flops

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = prep_data(tmp / "kjv_ascii")
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=3.0)
    base, ours = [], []
    for r in range(a.rounds):
        rates, fpt = baseline(data, a.steps, a.warmup)
        base += rates
        train(parse_args(run_args(data, tmp / f"amtrain{r}", a.steps)))
        ours += amtrain_rates(tmp / f"amtrain{r}", a.warmup)
    med_b, med_o = statistics.median(base), statistics.median(ours)
    best_b, best_o = max(base), max(ours)
    from amtrain.store import Dataset
    from amtrain.train.builders import build_model

    report = {"params": build_model(parse_args(run_args(data, tmp, 1)), Dataset(data)).num_params(),
              "flops_per_token": fpt, "peak_gflops": round(peak / 1e9, 1),
              "baseline_tok_s": {"median": round(med_b), "best": round(best_b)},
              "amtrain_tok_s": {"median": round(med_o), "best": round(best_o)},
              "ratio_median": round(med_o / med_b, 3), "ratio_best": round(best_o / best_b, 3),
              "mfu_amtrain": {"median": round(med_o * fpt / peak, 3), "best": round(best_o * fpt / peak, 3)},
              "mfu_baseline": {"median": round(med_b * fpt / peak, 3), "best": round(best_b * fpt / peak, 3)}}
    if a.two_ranks:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", "29871", str(REPO / "launchers" / "train.py"),
               *run_args(data, tmp / "two", a.steps)]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
        two = amtrain_rates(tmp / "two", a.warmup)
        report["two_ranks_tok_s"] = {"median": round(statistics.median(two)), "best": round(max(two))}
        report["two_vs_one"] = {"median": round(statistics.median(two) / med_o, 3), "best": round(max(two) / best_o, 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
