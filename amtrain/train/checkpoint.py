"""Checkpoints: DeepSpeed's engine state plus amtrain's run state, written so that a checkpoint
interrupted mid-write is never taken as the latest, loaded only as plain data, and verified
before use.

    RUN/checkpoints/
      latest                      text: the tag of the last checkpoint saved (for people and tools;
                                  resume does not trust it, see below)
      step_00000200/              DeepSpeed files (mp_rank_*_model_states.pt, *_optim_states.pt)
        amtrain_state.json        RunState (step, tokens seen, data position, ...), world size,
                                  ZeRO stage, resolved config, and `files`: the size and sha256
                                  of every other file of the checkpoint (rank 0)
        rng/rank_00000.pt         python / numpy / torch RNG of each rank
        universal/                made on demand when resuming at another world size
      .tmp-step_00000300/         being written (ignored, removed on the next save)

A save goes into `.tmp-<tag>`; after a barrier (every rank's shards are on disk) the ranks hash
the files (each a share), rank 0 writes amtrain_state.json, renames the folder to `<tag>` and
then replaces `latest` (both atomic renames). The file system must be shared by all ranks (as
for DeepSpeed's own checkpoints).

Which checkpoint resume takes: the complete one (amtrain_state.json present) with the highest
step number, found by scanning `step_*` (numbers compared, not names), whatever `latest` says: a
deleted or stale `latest`, or a newest step without its amtrain_state.json, never makes a run
start fresh while complete checkpoints exist. `train.resume never` with complete checkpoints
present is refused.

Retention keeps the checkpoint just saved and the `keep_last - 1` complete ones below it, and
never deletes one with a higher step (a run resumed from an older checkpoint replaces those only
when it saves the same step again).

Before anything is loaded (resume, export, sample, rollout) the checkpoint is verified
(`verify`): every file recorded at save is present with its size and sha256, and no `.pt` file's
pickle names a type outside the allow-list (`amtrain.train.safe_load`). A failure is one
UserError naming the file and the newest intact older checkpoint to use instead. Every load
is `torch.load(weights_only=True)`, DeepSpeed's included (`safe_load.checkpoint_engine`,
`safe_load.forced_weights_only`). Checkpoints saved before amtrain recorded `files` are loaded
with a warning after the pickle check alone.

Resuming at another world size: DeepSpeed's ZeRO shards are cut for one data-parallel size, so
amtrain converts the checkpoint once with `deepspeed.checkpoint.ds_to_universal`
(`--inject_missing_state`) into `<tag>/universal` and loads it with `load_universal`.
Resuming under another ZeRO stage: ZeRO-1 and ZeRO-2 share DeepSpeed's optimizer and shard
layout and load each other directly; every other change is refused in one line
(`check_zero_stage`). The universal checkpoint does not bridge them in DeepSpeed 0.19.8: its
layout differs between ZeRO-1/2 and ZeRO-3 (zero/optimizer_state.pt keys, shaped vs flat
tensors, step.pt), and a ZeRO-0 checkpoint has no ZeRO shards to convert.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import random
import re
import shutil
import sys
import time
from argparse import Namespace
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from amtrain.errors import UserError
from amtrain.fileio import file_sha256, write_errors, write_json_atomic, write_text_atomic
from amtrain.train.experts import (
    expert_shards,
    restore_expert_shards,
    sharded_experts,
    write_universal,
)
from amtrain.train.safe_load import check_pickle, checkpoint_engine, forced_weights_only, safe_load

STATE_FILE = "amtrain_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"
STEP_NAME = re.compile(r"step_(\d+)")


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


def step_of(folder: Path) -> int | None:
    """step_00000200 -> 200; None for any other name."""
    found = STEP_NAME.fullmatch(folder.name)
    return int(found.group(1)) if found else None


def _step(folder: Path) -> int:
    """The step of a folder known to be named step_N."""
    step = step_of(folder)
    assert step is not None, folder
    return step


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders holding an amtrain_state.json, by step number (oldest first)."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (`latest` is not consulted)."""
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def read_meta(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a complete amtrain checkpoint (no {STATE_FILE}); pass a folder "
                        f"RUN/checkpoints/step_N or a run folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder or one checkpoint folder -> a checkpoint folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise UserError(f"{path}: no complete checkpoint here (looked for {STATE_FILE} and checkpoints/step_*/{STATE_FILE}); "
                    f"pass a run folder or RUN/checkpoints/step_N")


def find_resume(resume: str, ckpt_dir: Path, world_size: int, expert_shards: int = 1) -> ResumePoint | None:
    """The checkpoint to continue from (verified; collective when a process group runs), or None.
    `expert_shards`: the ep_size this run shards its experts over (1: not sharded); a checkpoint
    saved with another sharding loads through the universal path too."""
    if resume == "never":
        if latest_checkpoint(ckpt_dir) is not None:
            raise UserError(f"{ckpt_dir}: holds checkpoints but train.resume = never; choose another "
                            f"train.out_dir or use train.resume auto")
        return None
    folder = latest_checkpoint(ckpt_dir) if resume == "auto" else resolve_checkpoint(resume)
    if folder is None:
        return None
    if resume == "auto":
        _note_stale_latest(ckpt_dir, folder)
    verify(folder, collective=True)
    meta = read_meta(folder)
    return ResumePoint(folder, meta, universal=meta["world_size"] != world_size
                       or meta.get("expert_shards", 1) != expert_shards)


def _note_stale_latest(ckpt_dir: Path, folder: Path) -> None:
    marker = ckpt_dir / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    if named != folder.name and _is_main():
        said = f"names {named!r}, which is not the newest complete checkpoint" if named else "is missing"
        print(f"note: {marker} {said}; resuming from {folder} (the complete checkpoint with the highest step)",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- integrity

def verify(folder: Path, collective: bool = False) -> None:
    """Raise one UserError naming the first missing, truncated, altered or unsafe file of the
    checkpoint and the newest intact checkpoint below it. `collective`: every rank of the
    process group calls it and each checks a share of the files."""
    problem = _problem(folder, collective)
    if problem is None:
        return
    step = step_of(folder)
    older = [p for p in complete_checkpoints(folder.parent) if step is not None and _step(p) < step]
    intact = next((p for p in reversed(older) if _problem(p, collective) is None), None)
    instead = (f"use the newest intact checkpoint instead: {intact}" if intact is not None
               else f"no older intact checkpoint in {folder.parent}")
    raise UserError(f"{problem}; {instead}")


def _problem(folder: Path, collective: bool) -> str | None:
    """None, or the first problem of the checkpoint in `folder` as one line."""
    try:
        files = read_meta(folder).get("files")
    except UserError as e:
        return str(e)
    if files is None and _is_main():
        print(f"warning: {folder}: saved without file hashes (by an older amtrain); only checking that its "
              f"files are safe to unpickle", file=sys.stderr, flush=True)
    names = sorted(set(files or {}) | set(_pickles(folder)))
    problems = _spread(functools.partial(_file_problem, folder, files), names, collective)
    return next((p for p in problems if p is not None), None)


def _pickles(folder: Path) -> list[str]:
    """The .pt files of a checkpoint, relative to it, without the derived universal/ folder."""
    skip = (UNIVERSAL, TMP_PREFIX + UNIVERSAL)
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*.pt") if p.relative_to(folder).parts[0] not in skip]


def _file_problem(folder: Path, files: dict | None, name: str) -> str | None:
    path = folder / name
    try:
        if files is not None:
            record = files.get(name)
            if record is None:
                return f"{path}: not part of this checkpoint (not recorded in {STATE_FILE} at save); remove it"
            if not path.is_file():
                return f"{path}: missing (recorded in {STATE_FILE} at save)"
            size = path.stat().st_size
            if size != record["size"]:
                return f"{path}: {size} bytes, {record['size']} at save; the file is truncated or damaged"
            if file_sha256(path) != record["sha256"]:
                return f"{path}: altered since it was saved (its sha256 differs from the one in {STATE_FILE})"
        return check_pickle(path) if path.suffix == ".pt" else None
    except (OSError, UserError) as e:  # a result, not a raise: the other ranks wait for this one's answer
        return str(e) if isinstance(e, UserError) else f"{path}: cannot be read ({e})"


def _record_files(folder: Path) -> dict[str, dict]:
    """Collective: {relative path: {"size", "sha256"}} of every file under `folder`."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if _is_main() else []
    if _group_size() > 1:
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    records = _spread(lambda name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)},
                      names, collective=True)
    return dict(zip(names, records, strict=True))


def _spread(fn, items: list, collective: bool) -> list:
    """[fn(x) for x in items]; with `collective` in a process group of several ranks, each rank
    computes every world-th item and all ranks receive all results."""
    world = _group_size() if collective else 1
    if world == 1:
        return [fn(x) for x in items]
    rank = dist.get_rank()
    mine = {i: fn(items[i]) for i in range(rank, len(items), world)}
    parts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    merged = {i: r for part in parts for i, r in part.items()}
    return [merged[i] for i in range(len(items))]


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_main() -> bool:
    return _group_size() == 1 or dist.get_rank() == 0


# ---------------------------------------------------------------- save / load

def make_universal(point: ResumePoint, rank: int) -> None:
    """Convert point.folder into point.folder/universal once (rank 0; the others wait)."""
    out = point.folder / UNIVERSAL
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = point.folder / f"{TMP_PREFIX}{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(input_folder=str(point.folder), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with forced_weights_only():
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
    tmp = ckpt_dir / (TMP_PREFIX + tag)
    final = ckpt_dir / tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with _save_errors(tmp, ckpt_dir):
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
        rng_file = tmp / "rng" / f"rank_{rank:05d}.pt"
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng_file)
    dist.barrier()  # every rank's shards are on disk
    shards = expert_shards(engine.module)
    if shards > 1:  # rank-local expert groups: a world-size-independent copy for resume elsewhere and export
        with _save_errors(tmp, ckpt_dir):
            write_universal(engine, tmp / UNIVERSAL)
        dist.barrier()
    files = _record_files(tmp)
    if rank == 0:
        meta = {"run_state": asdict(state), "world_size": dist.get_world_size(), "time": time.time(), **extra_meta,
                "expert_shards": shards, "files": files}
        write_json_atomic(tmp / STATE_FILE, meta)
        _publish(tmp, final)
        write_text_atomic(ckpt_dir / LATEST, tag)
        _retain(ckpt_dir, keep_last, final)
    dist.barrier()
    return final


@contextlib.contextmanager
def _save_errors(tmp: Path, ckpt_dir: Path):
    """A save the file system refuses is one line naming the folder, the cause and the newest
    checkpoint that is still intact; the half-written folder is removed. torch reports a full
    disk as a RuntimeError from its zip writer (`inline_container.cc ... file write failed` /
    `unexpected pos`), not as an OSError: it is read as ENOSPC when the disk is indeed full."""
    try:
        with write_errors(tmp):
            try:
                yield
            except RuntimeError as e:
                text = str(e)
                if not any(k in text for k in ("inline_container", "file write failed", "unexpected pos")):
                    raise
                free = shutil.disk_usage(ckpt_dir).free
                raise OSError(errno.ENOSPC if free < 64 << 20 else errno.EIO, text.splitlines()[0][:200]) from e
    except (UserError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        newest = latest_checkpoint(ckpt_dir)
        keep = f"; the newest complete checkpoint {newest} is intact" if newest else ""
        if isinstance(e, UserError):
            raise UserError(f"checkpoint save: {e}{keep}") from e
        raise UserError(f"checkpoint save: {tmp}: cannot write ({e.strerror or e}); free space or set train.out_dir "
                        f"elsewhere{keep}") from e


def _publish(tmp: Path, final: Path) -> None:
    """Rename the written folder to its tag; an older save of the same step (a run resumed from
    an earlier checkpoint reaching it again) is moved aside first and removed after."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _retain(ckpt_dir: Path, keep_last: int, kept: Path) -> None:
    """Remove leftovers of interrupted saves and all but `keep_last` complete checkpoints counted
    down from `kept`; checkpoints with a higher step than `kept` are never removed."""
    for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last:
        older = [p for p in complete_checkpoints(ckpt_dir) if _step(p) < _step(kept)]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine, point: ResumePoint) -> RunState:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; return the RunState.
    Every file is read with weights_only (point.folder was verified by find_resume)."""
    check_zero_stage(point, engine.zero_optimization_stage())
    if point.universal:
        make_universal(point, dist.get_rank())
        if expert_shards(engine.module) > 1:
            fit_universal_to_shards(point.load_dir / point.tag, engine)
    engine.checkpoint_engine = checkpoint_engine(engine._config)
    with forced_weights_only():  # the optimizers' universal-checkpoint readers call torch.load themselves
        path, _ = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{point.folder}: DeepSpeed could not load this checkpoint")
    _match_schedule_groups(engine.lr_scheduler)
    restore_expert_shards(engine.module)
    if point.universal:
        restore_buffers(engine.module, point.folder)
    rng_file = point.folder / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file() and point.meta["world_size"] == dist.get_world_size():
        _set_rng_state(safe_load(rng_file))
    return RunState(**point.meta["run_state"])


def _match_schedule_groups(sched) -> None:
    """Sharded experts have a parameter group of their own (amtrain.train.experts): a schedule
    saved with another number of groups gets one entry per group of this run, the same warm-up
    and cosine LambdaLR for every group (`engine.build_engine`), and every group the saved lr."""
    groups = sched.optimizer.param_groups
    if len(sched.base_lrs) != len(groups):
        sched.base_lrs = [sched.base_lrs[0]] * len(groups)
        sched._last_lr = [sched._last_lr[0]] * len(groups)
        for g, lr in zip(groups, sched._last_lr, strict=True):  # a group the checkpoint lacks kept its initial lr
            g["lr"] = lr


def fit_universal_to_shards(universal: Path, engine) -> None:
    """A universal folder made from a checkpoint with whole experts, loaded into sharded ones
    (rank 0, once; idempotent): each expert parameter's files marked as such, so DeepSpeed's
    universal load takes this rank's experts from the full tensors, and the optimizer's saved
    groups completed with the experts' own group (DeepSpeed restores only the groups it pairs
    with a saved one)."""
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS

    if dist.get_rank() == 0:
        for name, p in sharded_experts(engine.module):
            for f in sorted((universal / "zero" / name).glob("*.pt")):
                d = safe_load(f)
                if isinstance(d, dict) and EP_IS_EXPERT_PARAM not in d:
                    torch.save({**d, EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: p.amtrain_experts}, f)  # type: ignore[attr-defined]
        f = universal / "zero" / "optimizer_state.pt"
        optim = safe_load(f)
        saved, current = optim["param_groups"], engine.optimizer.param_groups
        if len(saved) < len(current):
            extra = [{**saved[0], **{k: g[k] for k in ("name", "moe") if k in g}} for g in current[len(saved):]]
            torch.save({**optim, "param_groups": saved + extra}, f)
    dist.barrier()


def restore_buffers(module: torch.nn.Module, folder: Path) -> None:
    """The module's persistent buffers (e.g. the MoE selection biases) from the checkpoint's
    saved module state: DeepSpeed's universal-checkpoint load (world size changed) restores the
    parameters and the optimizer state but leaves buffers as built."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        return
    saved = safe_load(files[0], map_location="cpu")["module"]
    skip = {f"{n}.{b}" if n else b for n, m in module.named_modules() for b in m._non_persistent_buffers_set}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name not in skip and name in saved:
                buf.copy_(saved[name])


def check_zero_stage(point: ResumePoint, stage: int) -> None:
    """A checkpoint saved under another ZeRO stage loads only between ZeRO-1 and ZeRO-2 (one
    optimizer class and shard layout in DeepSpeed); any other change is one UserError."""
    saved = point.meta["zero_stage"]
    if saved != stage and not {saved, stage} <= {1, 2}:
        raise UserError(f"{point.folder}: saved with ZeRO stage {saved}, this run uses stage {stage}; DeepSpeed cannot "
                        f"carry the optimizer state from ZeRO-{saved} to ZeRO-{stage} (only ZeRO-1 and ZeRO-2 load each "
                        f"other's checkpoints); resume with a ZeRO-{saved} DeepSpeed config (e.g. ds_configs/zero{saved}.json)")


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint as one state dict, without DeepSpeed's engine: ZeRO shards
    gathered by deepspeed.utils.zero_to_fp32; ZeRO-0 checkpoints hold the full module already.
    The checkpoint is verified first; every file is read with weights_only."""
    verify(folder)
    if read_meta(folder).get("expert_shards", 1) > 1:  # written at save (amtrain.train.experts.write_universal)
        saved = safe_load(folder / UNIVERSAL / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        zero = folder / UNIVERSAL / "zero"
        sd = {k: safe_load(zero / k / "fp32.pt")["param"] if (zero / k / "fp32.pt").is_file() else v
              for k, v in saved.items()}
    elif any(folder.glob("*_optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress notes and tqdm bars (stderr) would mix into `amtrain sample` / `rollout`'s
        # output; it calls torch.load itself
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                forced_weights_only():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{folder}: no DeepSpeed model states in this checkpoint; it is incomplete")
        sd = safe_load(files[0], map_location="cpu")["module"]
    return {k: v.float() for k, v in sd.items()}
