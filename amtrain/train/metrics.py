"""What a run writes about itself (rank 0 only).

    RUN/config.yaml      the resolved run config (every field)
    RUN/ds_config.json   the engine JSON DeepSpeed was given (batch keys filled in)
    RUN/run_info.json    git revision, package versions, world size, devices, command, peak FLOP/s
    RUN/metrics.jsonl    one JSON object per record: {"kind": "train"|"val", "step", ...}
    RUN/tb/              TensorBoard events of the same scalars

Train records: loss, lr, grad_norm, tokens_per_s (all ranks), mfu, mem_gb, tokens_seen,
bad_steps. Validation records: val_loss and val_bpt (bits per token = loss / ln 2).
Mixture-of-experts runs add a "moe" record every step (per-layer expert load and biases,
`amtrain.train.experts`); lists of numbers go to TensorBoard one scalar per element.
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
    """metrics.jsonl + TensorBoard (rank 0), appended across resumed segments, one record per
    (kind, step) whatever was killed where.

    A segment starting at step S (the checkpoint it resumed from; 0 when fresh) first drops the
    records past S that a killed segment wrote after its last checkpoint (an atomic rewrite;
    a torn last line goes too), and opens TensorBoard with `purge_step` S+1, which hides that
    segment's events from S+1 on. A record it writes again at S itself (the final validation of
    a finished run started again) replaces the old one. TensorBoard is flushed with every record,
    so both files hold the same steps when a run is killed."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.start_step = run_dir / "metrics.jsonl", start_step
        kept = rewrite_records(self.path, lambda r: r["step"] <= start_step)
        self.at_start = {r["kind"] for r in kept if r["step"] == start_step}  # kinds S already has
        self.file = open(self.path, "a")
        tb_dir = run_dir / "tb"
        purge = start_step + 1 if any(tb_dir.glob("events.out.tfevents.*")) else None
        self.tb = SummaryWriter(str(tb_dir), purge_step=purge)

    def write(self, kind: str, step: int, values: dict) -> None:
        if step == self.start_step and kind in self.at_start:
            self.file.close()
            rewrite_records(self.path, lambda r: (r["kind"], r["step"]) != (kind, step))
            self.file = open(self.path, "a")
            self.at_start.discard(kind)
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, int | float):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            elif isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):  # e.g. per-expert load
                for j, x in enumerate(v):
                    self.tb.add_scalar(f"{kind}/{k}/{j}", x, step)
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def rewrite_records(path: Path, keep) -> list[dict]:
    """Keep the records of metrics.jsonl that `keep(record)` accepts, dropping lines that are
    not a whole record (a write torn by a kill); the file is rewritten atomically, and only if
    something goes. -> the records kept."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.splitlines()
    kept = [(line, r) for line in lines if (r := _record(line)) is not None and keep(r)]
    if len(kept) != len(lines) or not data.endswith(b"\n"):
        write_bytes_atomic(path, b"".join(line + b"\n" for line, _ in kept))
    return [r for _, r in kept]


def _record(line: bytes) -> dict | None:
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and isinstance(r.get("step"), int) and "kind" in r else None


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
