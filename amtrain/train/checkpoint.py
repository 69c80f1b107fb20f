"""Checkpoints: DeepSpeed's engine state plus amtrain's run state, written so that a checkpoint
interrupted mid-write is never taken as the latest.

    RUN/checkpoints/
      latest                      text: the tag of the newest COMPLETE checkpoint
      step_00000200/              DeepSpeed files (mp_rank_*_model_states.pt, *_optim_states.pt)
        amtrain_state.json        RunState (step, tokens seen, data position, ...), world size,
                                  ZeRO stage, resolved config (rank 0)
        rng/rank_00000.pt         python / numpy / torch RNG of each rank
        universal/                made on demand when resuming at another world size
      .tmp-step_00000300/         being written (ignored, removed on the next save)

A save goes into `.tmp-<tag>`; after a barrier (every rank's shards are on disk) rank 0 writes
amtrain_state.json, renames the folder to `<tag>` and then replaces `latest` (both atomic
renames). Retention then deletes all but the last `keep_last` complete checkpoints.
The file system must be shared by all ranks (as for DeepSpeed's own checkpoints).

Resuming at another world size: DeepSpeed's ZeRO shards are cut for one data-parallel size, so
amtrain converts the checkpoint once with `deepspeed.checkpoint.ds_to_universal`
(`--inject_missing_state`) into `<tag>/universal` and loads it with `load_universal`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
from argparse import Namespace
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic

STATE_FILE = "amtrain_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"


@dataclass
class RunState:
    """What the loop needs beyond the engine to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed over all ranks."""
    loader: dict = field(default_factory=dict)
    """TrainLoader.state_dict()."""
    objective: dict = field(default_factory=dict)
    """The objective's state (T5: the curriculum's levels, loss windows and pending events)."""
    num_bad_steps: int = 0
    """Steps skipped for a NaN/inf loss, in total."""
    bad_streak: int = 0
    """Consecutive skipped steps right now."""
    elapsed_s: float = 0.0
    """Training wall time accumulated over all segments of the run."""


@dataclass(frozen=True)
class ResumePoint:
    folder: Path       # RUN/checkpoints/step_X
    meta: dict         # amtrain_state.json
    universal: bool    # needs the universal-checkpoint path (world size changed)

    @property
    def tag(self) -> str:
        return self.folder.name + (f"/{UNIVERSAL}" if self.universal else "")

    @property
    def load_dir(self) -> Path:
        return self.folder.parent


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder named by `latest`, or None."""
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    folder = ckpt_dir / marker.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def read_meta(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a complete amtrain checkpoint (no {STATE_FILE}); pass a folder "
                        f"RUN/checkpoints/step_N or a run folder")
    return json.loads(path.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder or one checkpoint folder -> a checkpoint folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise UserError(f"{path}: no complete checkpoint here (looked for {STATE_FILE} and checkpoints/{LATEST}); "
                    f"pass a run folder or RUN/checkpoints/step_N")


def find_resume(resume: str, ckpt_dir: Path, world_size: int) -> ResumePoint | None:
    if resume == "never":
        if latest_checkpoint(ckpt_dir) is not None:
            raise UserError(f"{ckpt_dir}: holds checkpoints but train.resume = never; choose another "
                            f"train.out_dir or use train.resume auto")
        return None
    folder = latest_checkpoint(ckpt_dir) if resume == "auto" else resolve_checkpoint(resume)
    if folder is None:
        return None
    meta = read_meta(folder)
    return ResumePoint(folder, meta, universal=meta["world_size"] != world_size)


def make_universal(point: ResumePoint, rank: int) -> None:
    """Convert point.folder into point.folder/universal once (rank 0; the others wait)."""
    out = point.folder / UNIVERSAL
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = point.folder / f"{TMP_PREFIX}{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(input_folder=str(point.folder), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        ds_to_universal.main(args)
        os.replace(tmp, out)
    dist.barrier()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(d: dict) -> None:
    random.setstate(d["python"])
    np.random.set_state(d["numpy"])
    torch.set_rng_state(d["torch"])
    if d["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def save(engine, ckpt_dir: Path, state: RunState, extra_meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint folder."""
    rank = dist.get_rank()
    tag = tag_for(state.step)
    tmp_tag = TMP_PREFIX + tag
    final = ckpt_dir / tag
    if rank == 0:
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    rng_file = ckpt_dir / tmp_tag / "rng" / f"rank_{rank:05d}.pt"
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), rng_file)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        meta = {"run_state": asdict(state), "world_size": dist.get_world_size(), "time": time.time(), **extra_meta}
        write_bytes_atomic(ckpt_dir / tmp_tag / STATE_FILE, json.dumps(meta, indent=1).encode())
        if final.exists():  # an older save of the same step (a rerun): replace it
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        write_bytes_atomic(ckpt_dir / LATEST, tag.encode())
        _retain(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _retain(ckpt_dir: Path, keep_last: int) -> None:
    for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last:
        complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / STATE_FILE).is_file())
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine, point: ResumePoint) -> RunState:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; return the RunState."""
    if point.universal:
        make_universal(point, dist.get_rank())
    path, _ = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{point.folder}: DeepSpeed could not load this checkpoint")
    rng_file = point.folder / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file() and not point.universal:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return RunState(**point.meta["run_state"])


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint as one state dict, without DeepSpeed's engine: ZeRO shards
    gathered by deepspeed.utils.zero_to_fp32; ZeRO-0 checkpoints hold the full module already."""
    if any(folder.glob("*_optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress notes would mix into `amtrain sample`
            sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{folder}: no DeepSpeed model states in this checkpoint; it is incomplete")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}
