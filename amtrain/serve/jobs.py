"""What a job is: its options (the sampling options of `amtrain rollout`, as RolloutConfig
fields), an optional prompt file (bytes and name), and the limits a worker enforces.

`validate(options, prompt_name, prompt_size, limits) -> RolloutConfig kwargs` raises
`InvalidJob` (a UserError) with one line naming the option and the fix; a worker turns that into
a failed job at once (no retry), never a dead worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from amtrain.errors import UserError
from amtrain.modalities import RolloutConfig


class InvalidJob(UserError):
    """A payload no worker can run: unknown option, wrong type, over a limit."""


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = 8 << 20
    max_length: float = 4096
    """Tokens (or seconds with `seconds`) per continuation."""
    max_samples: int = 16
    max_iterations: int = 32


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt(check):
    return lambda x: x is None or check(x)


def _pair(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(_num(v) for v in x)


# name -> (type check, what it must be); every RolloutConfig field a job may set
OPTIONS: dict[str, tuple[Any, str]] = {
    "mode": (lambda x: isinstance(x, str), "continue | infill | alternate"),
    "length": (_num, "a positive number"),
    "seconds": (lambda x: isinstance(x, bool), "true or false"),
    "num_samples": (_int, "a positive integer"),
    "temperature": (lambda x: _num(x) and x >= 0, "a number >= 0"),
    "top_k": (_opt(lambda x: _int(x) and x > 0), "a positive integer or null"),
    "top_p": (_opt(lambda x: _num(x) and 0 < x <= 1), "a number in (0, 1] or null"),
    "seed": (_opt(_int), "an integer or null"),
    "use_cache": (lambda x: isinstance(x, bool), "true or false"),
    "stride": (_opt(lambda x: _int(x) and x > 0), "a positive integer or null"),
    "infill_range": (_opt(_pair), "[start, end] in seconds or null"),
    "control_instruments": (lambda x: isinstance(x, (list, tuple)) and all(_int(v) and 0 <= v <= 128 for v in x),
                            "a list of instruments 0-128"),
    "gap_marker": (lambda x: isinstance(x, str) and 0 < len(x) <= 64, "a short string"),
    "postfix_repeat": (_int, "a positive integer"),
    "denoiser": (lambda x: isinstance(x, str), "R or X"),
    "max_span": (lambda x: _int(x) and x > 0, "a positive integer"),
    "schedule": (lambda x: isinstance(x, str) and len(x) <= 64, "c/i letters"),
    "iterations": (_int, "a positive integer"),
    "t5_context": (lambda x: _int(x) and 0 < x <= 1 << 16, "a positive integer"),
}
SERVE_OPTIONS: dict[str, tuple[Any, str]] = {
    "priority_rank": (_opt(lambda x: _int(x) and x >= 0), "a chunk rank >= 0 (0 = the highest priority) or null"),
}
PROMPT_SUFFIXES = (".txt", ".npy", ".npz", ".mid", ".midi", ".wav", ".flac", ".ogg", ".mp3")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def validate(options: dict, prompt_name: str | None, prompt_size: int, limits: Limits) -> dict:
    """-> the RolloutConfig keyword arguments of a payload (serve options removed); raises
    InvalidJob naming what is wrong."""
    if not isinstance(options, dict):
        raise InvalidJob("options: must be a JSON object of rollout options")
    known = OPTIONS | SERVE_OPTIONS
    for k, v in options.items():
        if k not in known:
            raise InvalidJob(f"option {k!r}: unknown; jobs take {', '.join(sorted(known))}")
        check, what = known[k]
        if not check(v):
            raise InvalidJob(f"option {k}={json.dumps(v)}: must be {what}")
    if prompt_size > limits.max_prompt_bytes:
        raise InvalidJob(f"prompt {prompt_name}: {prompt_size} bytes, over the worker's limit of "
                         f"{limits.max_prompt_bytes}; send a shorter prompt")
    if prompt_name is not None and not prompt_name.lower().endswith(PROMPT_SUFFIXES):
        raise InvalidJob(f"prompt {prompt_name!r}: unsupported file type; send one of {', '.join(PROMPT_SUFFIXES)}")
    kwargs = {k: v for k, v in options.items() if k in OPTIONS}
    if "infill_range" in kwargs and kwargs["infill_range"] is not None:
        kwargs["infill_range"] = tuple(float(v) for v in kwargs["infill_range"])
    if "control_instruments" in kwargs:
        kwargs["control_instruments"] = tuple(kwargs["control_instruments"])
    if float(kwargs.get("length", 0)) > limits.max_length:
        raise InvalidJob(f"option length={kwargs['length']}: over the worker's limit of {limits.max_length}")
    if int(kwargs.get("num_samples", 1)) > limits.max_samples:
        raise InvalidJob(f"option num_samples={kwargs['num_samples']}: over the worker's limit of {limits.max_samples}")
    if int(kwargs.get("iterations", 1)) > limits.max_iterations:
        raise InvalidJob(f"option iterations={kwargs['iterations']}: over the worker's limit of {limits.max_iterations}")
    try:
        RolloutConfig(**kwargs)  # its own checks: modes, schedule, denoiser, positive lengths
    except UserError as e:
        raise InvalidJob(str(e)) from None
    return kwargs


def batch_key(options: dict, tape_shape: tuple[int, ...]) -> str:
    """Jobs whose options agree and whose prompt tapes are equally long run as one batch. Their
    seeds may differ (each row draws from its own generator, `RolloutConfig.row_seeds`); only
    seeded and unseeded (seed null: the global RNG) jobs are kept apart."""
    rest = {k: v for k, v in options.items() if k != "seed"} | {"seeded": options.get("seed", 0) is not None}
    return json.dumps([sorted(rest.items()), list(tape_shape)], default=str)
