"""Shared pieces of the training tests: a tiny run config, launching subprocesses with the right
environment, reading a run's metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "train.py")
BIN = Path(sys.executable).parent


def tiny(data: Path, out: Path, **over) -> dict[str, object]:
    """Dotted keys of a few-step debug run: 64-token windows, 512 tokens per step whatever the
    world size (so runs at different world sizes see the same global batches)."""
    args = {"data.path": str(data), "train.out_dir": str(out), "model.size": "debug", "data.seq_len": 64,
            "batch.micro_batch": 4, "batch.global_tokens": 512, "optim.lr": 3e-3, "optim.warmup_steps": 2,
            "optim.min_lr": 3e-4, "train.max_steps": 8, "train.log_every": 1, "train.eval_every": 0,
            "train.eval_batches": 2, "train.checkpoint_every": 0, "train.keep_last": 0, "train.progress": False,
            "train.dist_timeout_s": 60, "ds_config": str(REPO / "ds_configs" / "zero2.json")}
    args.update(over)
    return args


def argv(args: dict[str, object]) -> list[str]:
    out = []
    for k, v in args.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, bool | list | dict) else str(v)]
    return out


def env(**extra) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"),
             PATH=f"{BIN}:{e.get('PATH', '')}", PYTHONPATH=str(REPO))
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=kw.pop("env", env()), capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def from_args(args: dict[str, object]):
    from amtrain.config import parse_args

    return parse_args(argv(args))


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    """Per-step losses of two runs at the same global batch agree (rel 1e-4: summation order
    differs across ranks)."""
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4), (s, a, b)
