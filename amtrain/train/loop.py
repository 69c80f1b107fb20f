"""`train(cfg)`: the training entry point of every launcher and test.

    d = init_distributed(...)            # the process group (a group of one without a launcher)
    with run_dir_lock(out_dir, d):       # one run per train.out_dir at a time (amtrain.train.lock)
        Trainer(cfg, d).fit() -> RunResult   # amtrain.train.trainer: builders, loop, cadences

A rank that loses contact with another (a dead or hung peer: a collective raises or times out
after train.dist_timeout_s) ends with one `UserError` line instead of a traceback or a hang.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from amtrain.config import RunConfig
from amtrain.errors import UserError
from amtrain.train.engine import init_distributed
from amtrain.train.lock import run_dir_lock
from amtrain.train.trainer import RunResult, Trainer


def train(cfg: RunConfig) -> RunResult:
    d = init_distributed(cfg.train.dist_timeout_s)
    try:
        with run_dir_lock(cfg.train.out_dir, d):
            return Trainer(cfg, d).fit()
    except RuntimeError as e:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        if not _raised_in_collective(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"rank {d.rank}: lost contact with another rank ({first}); a rank died or hung "
                        f"(collectives time out after train.dist_timeout_s = {cfg.train.dist_timeout_s:g} s), "
                        f"see the other ranks' output") from None


def _raised_in_collective(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"torch{os.sep}distributed" in tb.tb_frame.f_code.co_filename
