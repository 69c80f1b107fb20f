"""`amtrain scaling run`: one training run per (architecture, size) under identical settings.

Every run uses the same data, sequence length, tokens per step, schedule (warm-up + cosine over
its own steps) and token budget, so only the model differs. Each run is a separate process of
`launchers/train.py` (or `torchrun --nproc_per_node N` of it) writing to OUT/runs/<arch>-<size>;
when it ends, its row goes into OUT/results.csv. A study killed midway resumes: finished rows
are skipped, and an unfinished run resumes from its own last checkpoint (`train.resume=auto`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from amtrain.errors import UserError
from amtrain.registry import study_families
from amtrain.scaling.results import append_result, finished, read_results

REPO = Path(__file__).resolve().parents[2]


@dataclass
class StudySettings:
    data: Path
    out: Path
    tokens: int | None = None
    """Token budget per run; None = one epoch of the train split."""
    seq_len: int = 128
    micro_batch: int = 8
    grad_accum: int = 1
    nproc: int = 1
    ds_config: str = "ds_configs/zero2.json"
    lr: float | None = None
    extra: tuple[str, ...] = ()
    """More `--key value` overrides passed to every run."""
    rollout_prompts: tuple[str, ...] = ()
    """Prompts every run rolls out (`train.rollout_prompts`); the statistics of its last rollout
    (`amtrain.evaluate`) become `rollout_<name>` columns of results.csv."""
    rollout_every: int = 0
    """Steps between rollouts (0: once, at the last step)."""
    rollout_length: int = 64


def tokens_per_step(s: StudySettings) -> int:
    return s.micro_batch * s.grad_accum * s.nproc * s.seq_len


def budget(s: StudySettings) -> tuple[int, int]:
    """(tokens, steps): the token budget rounded up to whole steps."""
    from amtrain.store import Dataset

    tokens = s.tokens or sum(r.num_tokens for r in Dataset(s.data).require_split("train"))
    steps = max(1, math.ceil(tokens / tokens_per_step(s)))
    return steps * tokens_per_step(s), steps


def count_params(arch: str, size: str, vocab_size: int, seq_len: int) -> tuple[int, int]:
    """(total, non-embedding) parameters of a study arch, counted on the meta device (nothing
    allocated), with the fields a run gets from its data (vocabulary, context)."""
    fam = study_families()[arch]
    with torch.device("meta"):
        model = fam.build(fam.config(size, vocab_size=vocab_size, max_seq_len=seq_len))
    return model.num_params(), model.num_params(non_embedding=True)


def run_command(s: StudySettings, arch: str, size: str, steps: int, run_dir: Path) -> list[str]:
    warmup = max(1, steps // 10)
    args = ["launchers/train.py", "--ds_config", s.ds_config, "--data", str(s.data),
            "--model.arch", study_families()[arch].name, "--model.size", size, "--data.seq_len", str(s.seq_len),
            "--batch.micro_batch", str(s.micro_batch), "--batch.grad_accum", str(s.grad_accum),
            "--train.max_steps", str(steps), "--optim.warmup_steps", str(warmup),
            "--train.eval_every", "0", "--train.checkpoint_every", str(max(1, steps // 4)),
            "--train.out_dir", str(run_dir), "--train.progress", "false"]
    if s.lr is not None:
        args += ["--optim.lr", str(s.lr)]
    if s.rollout_prompts:
        args += ["--train.rollout_every", str(s.rollout_every or steps), "--train.rollout_length", str(s.rollout_length),
                 "--train.rollout_prompts", json.dumps(list(s.rollout_prompts))]
    launcher = [sys.executable] if s.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={s.nproc}"]
    return [*launcher, *args, *s.extra]


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """The environment of one run: each run is its own job, so a process group this study was
    started inside (its RANK, MASTER_PORT, ...) must not leak into it — the run would try to
    join it, or bind a port already taken."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def summarize(run_dir: Path, study_dir: Path, arch: str, size: str, tokens: int, vocab: int, seq_len: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    if not train or not val:
        raise UserError(f"{run_dir}/metrics.jsonl: no train or val records; the run did not finish — rerun the study")
    total, non_emb = count_params(arch, size, vocab, seq_len)
    info_file = run_dir / "run_info.json"
    active = json.loads(info_file.read_text()).get("num_params_active", total) if info_file.is_file() else total
    tail = train[-3:]
    rollouts = [r for r in records if r["kind"] == "rollout"]
    stats = {f"rollout_{k}": v for k, v in rollouts[-1].items()
             if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)} if rollouts else {}
    return stats | {"arch": arch, "size": size, "params": total, "non_embedding_params": non_emb,
                    "active_params": active, "tokens": tokens,
            "train_loss": sum(r["loss"] for r in tail) / len(tail), "val_loss": val[-1]["val_loss"],
            "wall_s": round(train[-1]["elapsed_s"], 2), "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train),
            "peak_mem_gb": max(r["mem_gb"] for r in train), "run_dir": str(run_dir.relative_to(study_dir)),
            "bits_per_second": val[-1].get("bits_per_second")}


def run_study(s: StudySettings, archs: list[str], sizes: list[str], log=print) -> Path:
    from amtrain.store import Dataset

    unknown = [a for a in archs if a not in study_families()]
    if unknown:
        raise UserError(f"--arch {','.join(unknown)}: unknown; choose from {', '.join(study_families())}")
    vocab = Dataset(s.data).vocab_size
    tokens, steps = budget(s)
    results = s.out / "results.csv"
    for arch in archs:
        for size in sizes:
            done = read_results(results) if results.is_file() else []
            if finished(done, arch, size, tokens):
                log(f"{arch} {size}: finished earlier, skipped")
                continue
            run_dir = s.out / "runs" / f"{arch}-{size}"
            cmd = run_command(s, arch, size, steps, run_dir)
            log(f"{arch} {size}: {steps} steps x {tokens_per_step(s)} tokens  ->  {shlex.join(cmd)}")
            proc = subprocess.run(cmd, cwd=REPO, env=child_env())
            if proc.returncode:
                raise UserError(f"{arch} {size}: training exited {proc.returncode} (log above); fix and rerun — finished runs are kept")
            append_result(results, summarize(run_dir, s.out, arch, size, tokens, vocab, s.seq_len))
    return results
