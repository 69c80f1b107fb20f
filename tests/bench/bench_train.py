"""Training throughput under amtrain against a minimal hand-written PyTorch loop, same run.

    OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/work/.torch_extensions THP_MEM_ALLOC_ENABLE=1 \
        python tests/bench/bench_train.py [--steps 8] [--two-ranks]

Model: the `small` decoder with 12 layers (d 256, 8 heads) on ascii tokens of the bundled KJV
corpus: 9.5M parameters. Batch: 8 windows x 256 tokens per step, AdamW (lr 1e-3, wd 0.1),
clip 1.0, fp32, one thread per rank.

* baseline: model + torch.optim.AdamW + clip_grad_norm_ + LambdaLR, the same batches
  (amtrain's loader) — the least a training loop does;
* amtrain: `train(cfg)` with one rank, ZeRO-2 (ds_configs/zero2.json);
* tokens/s ratio amtrain / baseline (target >= 0.9), each the median over the timed steps
  (the first `warmup` steps are not timed); the baseline runs before and after amtrain and its
  two medians are averaged, so load drift on a shared machine hits both sides alike;
* MFU = tokens/s x flops_per_token(256) / peak, the peak measured here: the best 512^3 fp32 matmul
  on one thread over 3 s (amtrain.train.logging.measure_peak_flops) (target >= 45%);
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
    from data_prep.text import prep_text

    prep_text([str(REPO / "data" / "kjv" / "kjv_pentateuch.txt")], folder, tokenizer="ascii", show_progress=False)
    return folder


def run_args(data: Path, out: Path, steps: int) -> list[str]:
    args = {**MODEL, "data.path": str(data), "train.out_dir": str(out), "train.max_steps": steps,
            "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 0, "train.checkpoint_every": 0,
            "train.progress": "false", "ds_config": str(REPO / "ds_configs" / "zero2.json")}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def baseline(data: Path, steps: int, warmup: int) -> float:
    """Median tokens/s of a plain PyTorch loop over the same model, batches and optimizer."""
    from amtrain.config import parse_args
    from amtrain.data.loader import TrainLoader
    from amtrain.store import Dataset
    from amtrain.train.loop import build_model

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
    return statistics.median(rates), model.flops_per_token(SEQ_LEN)


def amtrain_rate(run_dir: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > warmup)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--two-ranks", action="store_true")
    a = ap.parse_args()
    from amtrain.config import parse_args
    from amtrain.train.logging import measure_peak_flops
    from amtrain.train.loop import train

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = prep_data(tmp / "kjv_ascii")
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=3.0)
    base1, fpt = baseline(data, a.steps, a.warmup)
    train(parse_args(run_args(data, tmp / "amtrain", a.steps)))
    ours = amtrain_rate(tmp / "amtrain", a.warmup)
    base2, _ = baseline(data, a.steps, a.warmup)
    base = (base1 + base2) / 2
    report = {"params": None, "peak_gflops": peak / 1e9, "baseline_tok_s": [round(base1), round(base2)],
              "amtrain_tok_s": round(ours), "ratio": ours / base, "mfu_amtrain": ours * fpt / peak,
              "mfu_baseline": base * fpt / peak, "flops_per_token": fpt}
    from amtrain.store import Dataset
    from amtrain.train.loop import build_model

    report["params"] = build_model(parse_args(run_args(data, tmp, 1)), Dataset(data)).num_params()
    if a.two_ranks:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", "29871", str(REPO / "launchers" / "train.py"),
               *run_args(data, tmp / "two", a.steps)]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
        two = amtrain_rate(tmp / "two", a.warmup)
        report.update(two_rank_tok_s=round(two), two_vs_one=two / ours)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
