"""What a run writes about itself (rank 0 only).

    RUN/config.yaml      the resolved run config (every field)
    RUN/ds_config.json   the engine JSON DeepSpeed was given (batch keys filled in)
    RUN/run_info.json    git revision, package versions, world size, devices, command, peak FLOP/s
    RUN/metrics.jsonl    one JSON object per record: {"kind": "train"|"val", "step", ...}
    RUN/tb/              TensorBoard events of the same scalars

Train records: loss, lr, grad_norm, tokens_per_s (all ranks), mfu, mem_gb, tokens_seen,
bad_steps. Validation records: val_loss and val_bpt (bits per token = loss / ln 2).
MFU = tokens/s per device x model.flops_per_token(seq_len) / peak FLOP/s of one device, the
peak being `train.peak_flops` or, by default, measured at start with a dense matmul in the
training precision (`measure_peak_flops`).
"""

from __future__ import annotations

import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from amtrain.config import RunConfig, to_yaml
from amtrain.fileio import write_bytes_atomic

PACKAGES = ("torch", "deepspeed", "numpy", "tiktoken", "safetensors", "tensorboard", "pyyaml", "rich")


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense matmul FLOP/s on this device in `dtype`: the best of many short timed rounds.
    On CPU a round is one 512^3 matmul (~5 ms), short enough that on a machine shared with other
    jobs some rounds run undisturbed; on CUDA four 8192^3 matmuls."""
    n, per_round = (8192, 4) if device.type == "cuda" else (512, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(per_round):
            a @ b
        sync()
        best = max(best, per_round * 2 * n**3 / (time.perf_counter() - t0))
    return best


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, else max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def git_revision(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def record_run(run_dir: Path, cfg: RunConfig, ds_config: dict, info: dict) -> None:
    from amtrain.config import REPO_ROOT

    write_bytes_atomic(run_dir / "config.yaml", to_yaml(cfg).encode())
    write_bytes_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=1).encode())
    body = {"git_revision": git_revision(REPO_ROOT), "packages": package_versions(),
            "command": shlex.join([sys.executable, *sys.argv]), "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    write_bytes_atomic(run_dir / "run_info.json", json.dumps(body, indent=1).encode())


class MetricsLog:
    """metrics.jsonl + TensorBoard (rank 0), appended across resumed segments."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, kind: str, step: int, values: dict) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, int | float):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class Progress:
    """A rich progress bar (rank 0) with the latest loss on a terminal, or nothing. Lines go
    through its console on a terminal, else (a pipe, a log file, a SLURM log) are printed as
    they are: nothing wraps them at 80 columns."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[status]}"))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, status="")

    def update(self, step: int, status: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=status)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
