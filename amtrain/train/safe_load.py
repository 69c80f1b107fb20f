"""Every checkpoint file amtrain reads is unpickled with `torch.load(weights_only=True)`: tensors,
plain containers and numbers, and an allow-list of the few other types the files hold. A
`torch.save`d file is a pickle, and an unrestricted unpickle runs whatever a crafted file asks
(an object's `__reduce__` names any callable); a file that needs a type outside the allow-list
is refused with one `UserError` naming the file and the type.

The allow-list (`torch.serialization.add_safe_globals`, registered on first use):

* DeepSpeed's ZeRO optimizer states (zero_pp_rank_*_optim_states.pt and the universal
  checkpoint's zero/*/*.pt): `LossScaler`, `ZeroStageEnum`, `fragment_address`;
* amtrain's rng/rank_*.pt: numpy's RNG keys are an ndarray (`_reconstruct`, `ndarray`, `dtype`,
  `UInt32DType`: PyTorch's documented recipe for numpy arrays; they rebuild arrays only, and an
  object array's items still go through the restricted unpickler).

Two ways DeepSpeed is made to load like this, and one check before anything loads:

* `checkpoint_engine(config)`: a TorchCheckpointEngine whose `load` is `safe_load`; set as
  `engine.checkpoint_engine`, it reads the model and optimizer states in
  `engine.load_checkpoint` (through its `SDLoader` and `_get_all_zero_checkpoints`).
* `forced_weights_only()`: a context manager that, only while it is open, replaces `torch.load`
  with one that ignores the caller's `weights_only=False` and loads through `safe_load`. Used
  around `zero_to_fp32`, `ds_to_universal` and `engine.load_checkpoint`: those call `torch.load`
  directly in about twenty places (deepspeed/utils/zero_to_fp32.py,
  deepspeed/checkpoint/ds_to_universal.py and deepspeed_checkpoint.py, and the optimizers'
  universal-checkpoint readers in checkpoint/universal_checkpoint.py, runtime/base_optimizer.py
  and runtime/zero/stage3.py), with no hook; re-implementing them on top of `safe_load` would
  mean owning copies of DeepSpeed's shard arithmetic. Patching the module attribute reaches every
  one of them (they look up `torch.load` at call time), undoes itself on exit, and is narrow: it
  only ever makes a load stricter. ds_to_universal runs with one worker, in this process.
* `unsafe_globals(path)`: the types a file would need, read from its pickle without running it
  (`torch.serialization.get_unsafe_globals_in_checkpoint`); `checkpoint.verify` runs it on every
  file of a checkpoint before anything is loaded, so a crafted file is refused even by a command
  that would not read it (export never reads rng/). The static scan is the early, whole-folder
  check; the weights_only load above is the guarantee.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct

from amtrain.errors import UserError

DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")
NUMPY_TYPES = (_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)
"""What numpy pickles the RNG's array of uint32 keys with."""
ALLOWED = frozenset(DEEPSPEED_TYPES) | {f"{t.__module__}.{t.__name__}" for t in NUMPY_TYPES}
"""Pickle globals beyond torch's own weights_only set that a checkpoint file may name."""

_TORCH_LOAD = torch.load  # the real one, also while forced_weights_only() has replaced the attribute


@functools.cache
def allow_checkpoint_types() -> None:
    """Register the allow-list with torch (once; imports DeepSpeed's three classes)."""
    types = [getattr(importlib.import_module(mod), name) for mod, _, name in (t.rpartition(".") for t in DEEPSPEED_TYPES)]
    torch.serialization.add_safe_globals([*types, *NUMPY_TYPES])


def _refusal(path, needs: str) -> UserError:
    return UserError(f"{path}: refused to load: unpickling it needs {needs}, which is not a tensor or an allowed "
                     f"checkpoint type (torch.load weights_only); the file was altered or not written by amtrain/DeepSpeed, "
                     f"do not load it")


def safe_load(path, map_location=None, **kwargs):
    """torch.load(path, weights_only=True) with the allow-list; a refused or unreadable file is one
    UserError naming it."""
    allow_checkpoint_types()
    try:
        return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _refusal(path, found.group(1) if found else "an object that is not plain data") from None
    except (RuntimeError, EOFError) as e:  # a torn zip archive or pickle
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read ({first}); the file is truncated or damaged") from None


def unsafe_globals(path: Path) -> list[str]:
    """The pickle globals `path` names outside torch's weights_only set and ALLOWED, found
    without unpickling. A file in torch's legacy (non-zip) format is loaded with `safe_load`
    instead, which raises if it needs one."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not a zip archive: legacy torch.save format
        safe_load(path, map_location="cpu")
        return []
    return sorted(set(found) - ALLOWED)


def check_pickle(path: Path) -> str | None:
    """None, or the one-line reason `path` is refused."""
    bad = unsafe_globals(path)
    return str(_refusal(path, ", ".join(bad))) if bad else None


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """While open, every `torch.load(...)` loads through `safe_load` (the caller's weights_only
    and pickle arguments are ignored). For DeepSpeed code that calls torch.load itself."""
    def load(f, map_location=None, *, weights_only=None, **kwargs):
        kwargs.pop("pickle_module", None)
        return safe_load(f, map_location, **kwargs)

    allow_checkpoint_types()
    real, torch.load = torch.load, load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real


def checkpoint_engine(config):
    """A DeepSpeed checkpoint engine that saves as DeepSpeed's TorchCheckpointEngine does and
    loads through `safe_load`; set as `engine.checkpoint_engine` before `engine.load_checkpoint`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeCheckpointEngine(config)
