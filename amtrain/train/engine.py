"""Process group, DeepSpeed config and engine: the only place the run meets DeepSpeed's knobs.

* `init_distributed`: ranks from the launcher's environment (deepspeed, torchrun) or a single
  process when none is set; gloo on CPU, nccl on CUDA; a timeout on every collective so a dead
  or hung rank ends the run with an error instead of a hang; a taken master port moved (one
  rank) or named in one line (several: `check_master_port`).
* `load_ds_config`: the user's DeepSpeed JSON, checked against DeepSpeed's own schema
  (`amtrain.train.ds_check`).
* `resolve_ds_config`: the user's DeepSpeed JSON + what the run config decides (batch
  arithmetic, clipping, precision). A DeepSpeed key that contradicts the run config is one
  `UserError` naming both keys.
* `build_engine`: AdamW (torch, or bitsandbytes 8-bit) over decay / no-decay groups and a
  warm-up + cosine LambdaLR, handed to `deepspeed.initialize`. A torch optimizer avoids
  DeepSpeed's JIT-built fused/CPU Adam (about a minute of compiling on first use on CPU).
* `gathered`: ZeRO-3's full parameters (and sharded experts' full weights) around a generate or rollout that only some ranks run.
* `cpu_comm_op`: DeepSpeed's CPU shared-memory comm op (inference only) is neither built nor loaded.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from amtrain.config import BatchPlan, OptimConfig, RunConfig, apply_batch_plan
from amtrain.errors import UserError
from amtrain.train.ds_check import check_ds_config


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    """Whether rank 0's TCPStore could not listen on `port` (it binds every interface, with
    SO_REUSEADDR, so a port in TIME_WAIT is not taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def check_master_port() -> None:
    """Rank 0's rendezvous port (MASTER_PORT), before the process group is made: taken by
    another process, a run of one rank moves to a free port (nobody else connects to it); a run
    of several ranks stops with one line naming the port and `--master_port`, instead of
    `DistNetworkError: EADDRINUSE` after the op build. Not checked where torchrun's agent holds
    the store on that port itself (TORCHELASTIC_USE_AGENT_STORE) or without a MASTER_PORT."""
    port = os.environ.get("MASTER_PORT")
    if (os.environ.get("RANK") != "0" or port is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            or not _port_taken(int(port))):
        return
    if os.environ.get("WORLD_SIZE") == "1":
        os.environ["MASTER_PORT"] = str(_free_port())
        return
    raise UserError(f"master port {port} (MASTER_PORT) is taken by another process, maybe another training run; "
                    f"pass a free one: deepspeed --master_port N ... (torchrun --master_port N ...)")


def init_distributed(timeout_s: float) -> DistInfo:
    """Join (or, run as a plain single process, create) the process group."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:  # plain `python launchers/train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        check_master_port()
        with cpu_comm_op(cuda):
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


@contextlib.contextmanager
def cpu_comm_op(cuda: bool) -> Iterator[None]:
    """Around the start of DeepSpeed's process group on CPU, which would JIT-compile its
    shared-memory comm op (`deepspeed_shm_comm`: 35 s to 2 minutes the first time on a machine)
    and then take a lock file in its build folder on every start, which every other rank polls
    until it goes: a rank killed while holding it leaves later runs on the machine waiting
    forever. The op serves only `inference_all_reduce` (DeepSpeed's tensor-parallel inference,
    which amtrain does not use; without the op DeepSpeed falls back to the process group's
    all_reduce), so on CPU it is neither built nor loaded."""
    ds_comm = importlib.import_module("deepspeed.comm.torch")  # (`deepspeed.comm.torch` as an attribute is torch)
    if cuda:
        yield
        return
    build, ds_comm.build_shm_op = ds_comm.build_shm_op, lambda: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        ds_comm.build_shm_op = build  # type: ignore[attr-defined]


def load_ds_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: DeepSpeed config not found; pass one of ds_configs/*.json with --ds_config")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in d:
            raise UserError(f"{path}: `{key}` belongs in the run config (optim.*), not the DeepSpeed config; remove it")
    check_ds_config(d, str(path))
    return d


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_ds_config(ds: dict, cfg: RunConfig, plan: BatchPlan, precision: str, ds_name: str) -> dict:
    """The engine JSON this run uses: ds + batch plan + clipping + precision, checked."""
    out = apply_batch_plan(ds, plan, ds_name)
    clip = ds.get("gradient_clipping")
    if cfg.optim.grad_clip is not None and clip is not None and float(clip) != cfg.optim.grad_clip:
        raise UserError(f"{ds_name} gradient_clipping = {clip} contradicts the run config's optim.grad_clip = "
                        f"{cfg.optim.grad_clip}; set only one of them")
    out["gradient_clipping"] = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else (clip if clip is not None else 1.0)
    for key in ("bf16", "fp16"):
        enabled = bool(ds.get(key, {}).get("enabled", False))
        want = precision == key
        if key in ds and enabled != want:
            raise UserError(f"{ds_name} {key}.enabled = {str(enabled).lower()} contradicts the run config's "
                            f"train.precision = {cfg.train.precision} (resolves to {precision} here); "
                            f"remove {key} from {ds_name}, amtrain sets it")
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    out["zero_allow_untested_optimizer"] = True  # ours: torch AdamW + SkipStepMixin (engine.py)
    out.setdefault("steps_per_print", 1 << 30)  # amtrain logs; keep DeepSpeed quiet
    out.setdefault("wall_clock_breakdown", False)
    return out


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


class SkipStepMixin:
    """While `skip` is True, `step()` is a no-op. The loop sets it on every rank together for a
    step whose loss was NaN/inf, so a bad batch never writes into the weights or the moments.
    (A flag rather than a one-shot: ZeRO-1/2 call step() once per parameter group.)"""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in nanoGPT `configure_optimizers`, for every model family: matrices
    (embeddings, Linear and LSTM weights) decay, 1-D gains and biases do not. Each parameter
    appears once (a tied one counted once)."""
    params = list(model.parameters())
    groups = [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if any(not getattr(p, "allreduce", True) for p in params):  # sharded experts (amtrain.train.experts)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay)
    if optim.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.optimizer = adamw8bit needs bitsandbytes: pip install 'amtrain[bnb]'") from None
        base: type[torch.optim.Optimizer] = bnb.optim.AdamW8bit
    else:
        base = torch.optim.AdamW
    cls = type(f"Skipping{base.__name__}", (SkipStepMixin, base), {})
    return cls(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict):
    """-> (DeepSpeed engine, the torch optimizer inside it)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg.optim)
    peak, max_steps = cfg.optim.lr, cfg.train.max_steps

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.optim.lr_at(s, max_steps) / peak)

    with _moe_engine(model):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=ds_config)
    engine.has_moe_layers = False  # save / load the ordinary way (amtrain.train.experts.write_universal)
    return engine, optimizer


@contextlib.contextmanager
def _moe_engine(model: torch.nn.Module) -> Iterator[None]:
    """Sharded experts (`amtrain.train.experts`): DeepSpeed's engine turns on its MoE handling
    (expert-data-parallel groups in the ZeRO optimizer) only for its own `MoE` layer class, found
    by isinstance; our MoE layers count as such while the engine is built."""
    from deepspeed.runtime import engine as ds_engine

    from amtrain.models.moe import MoEFeedForward

    if not any(hasattr(m, "num_experts") for m in model.modules() if isinstance(m, MoEFeedForward)):
        yield
        return
    cls = ds_engine.MoE
    ds_engine.MoE = (cls, MoEFeedForward)
    try:
        yield
    finally:
        ds_engine.MoE = cls


class gathered:
    """ZeRO-3: every rank gathers the full parameters for the block and the ZeRO-3 module hooks
    are taken off meanwhile (DeepSpeed's `unwrap_model_for_generation`), so that a generate or a
    rollout run by some ranks only (rank 0's rollouts; early-stopping greedy decodes) issues no
    collective of its own. A no-op at other stages. Every rank must enter it."""

    def __init__(self, engine):
        self.engine = engine
        self.ctx = None

    def __enter__(self):
        from amtrain.train.experts import expert_weights_gathered

        self.experts = expert_weights_gathered(self.engine.module).__enter__()
        if self.engine.zero_optimization_stage() == 3:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            self.ctx = unwrap_model_for_generation(self.engine)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.experts.__exit__(*exc)
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
