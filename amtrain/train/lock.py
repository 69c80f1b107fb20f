"""One training run per run directory at a time.

Two runs writing one `train.out_dir` would interleave their metrics.jsonl rows, TensorBoard
events and checkpoints. `run_dir_lock` makes the second refuse at start instead: rank 0 holds
an exclusive `fcntl.flock` on RUN/.train.lock for the whole run and writes its pid, host and
start time into it. The OS releases the lock when the process ends, killed or not, so there is
never a stale lock to delete; the file itself stays (removing a lock file races with a run that
just opened it).

Only rank 0 takes the lock (the run directory is shared by all ranks, as checkpoints require);
one all-reduce tells the other ranks whether it did, so a refused run ends on every rank with
one line instead of leaving them waiting in their first collective.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from amtrain.errors import UserError
from amtrain.train.engine import DistInfo

LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def run_dir_lock(out_dir: str | Path, d: DistInfo) -> Iterator[None]:
    """Hold out_dir's run lock (rank 0) for the block; UserError on every rank if another run has it."""
    refusal, fd = None, None
    if d.is_main:
        fd, refusal = _acquire(Path(out_dir))
    refused = torch.tensor([float(refusal is not None)], device=d.device)
    dist.all_reduce(refused)
    try:
        if refused.item():
            raise UserError(refusal or f"rank {d.rank}: rank 0 could not lock {out_dir}: another training run "
                            f"is writing there (see rank 0's error)")
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _acquire(out_dir: Path) -> tuple[int | None, str | None]:
    """(fd holding the lock, None), or (None, the one-line refusal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, (f"{out_dir}: another training run is writing to this train.out_dir ({holder}); wait for it "
                      f"to finish, stop it, or choose another train.out_dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)[:300]}".replace("\n", " ").encode() + b"\n")
    return fd, None
