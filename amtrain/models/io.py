"""Pretrained-model folders: `save_pretrained` / `load_pretrained`, no DeepSpeed needed.

    OUT/
      model.safetensors   fp32 weights; a tied parameter is stored once (under its first name)
      config.json         {"arch": "decoder", "model": {DecoderConfig fields}, **meta}

Both files are written to a temporary name and moved into place (`os.replace`), config.json
last, so a folder with a config.json is complete. `load_pretrained` picks the model class by
"arch" from a small registry; other model families call `register_arch` at import time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from amtrain.errors import UserError
from amtrain.models.decoder import Decoder, DecoderConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

ARCHS: dict[str, tuple[type, type[nn.Module]]] = {}


def register_arch(name: str, config_cls: type, model_cls: type[nn.Module]) -> None:
    """Make `model_cls(config_cls(**cfg))` loadable under "arch": name. The model keeps its
    config dataclass as `model.cfg`."""
    ARCHS[name] = (config_cls, model_cls)


register_arch("decoder", DecoderConfig, Decoder)


def arch_of(model: nn.Module) -> str:
    for name, (_, model_cls) in ARCHS.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture; call register_arch first")


def save_pretrained(model: nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write `model.safetensors` (fp32) and `config.json` into out_dir; return out_dir.
    `meta` (tokenizer, step, dataset...) is merged into config.json beside "arch" and "model"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # named_parameters() yields a tied parameter once, so safetensors sees no shared storage.
    state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters()}
    state |= {n: b.detach().to("cpu").contiguous() for n, b in _persistent_buffers(model)}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    config = {"arch": arch_of(model), "model": asdict(model.cfg), **(meta or {})}
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, out / CONFIG)
    return out


def _persistent_buffers(model: nn.Module):
    non_persistent = {f"{mn}.{bn}" if mn else bn for mn, m in model.named_modules()
                      for bn in m._non_persistent_buffers_set}
    return [(n, b) for n, b in model.named_buffers() if n not in non_persistent]


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a folder made by `save_pretrained` (or the path of a file inside it): return the
    model in eval mode on `map_location`, and config.json's other keys as meta."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config = _read_config(folder)
    arch = config.pop("arch")
    if arch not in ARCHS:
        raise UserError(f"{folder / CONFIG}: unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    model_cfg = config.pop("model")
    unknown = set(model_cfg) - {f.name for f in fields(config_cls)}
    if unknown:
        raise UserError(f"{folder / CONFIG}: unknown model fields {sorted(unknown)} for arch {arch!r}; "
                        "was it written by a newer amtrain?")
    model = model_cls(config_cls(**model_cfg))
    _load_weights(model, folder / WEIGHTS)
    return model.to(map_location).eval(), config


def _read_config(folder: Path) -> dict:
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: not found; point at a folder written by save_pretrained "
                            "or `amtrain export` (it holds config.json and model.safetensors)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / CONFIG}: not valid JSON ({e}); re-export the model") from None
    for key in ("arch", "model"):
        if key not in config:
            raise UserError(f"{folder / CONFIG}: missing key {key!r}; re-export the model")
    return config


def _load_weights(model: nn.Module, file: Path) -> None:
    state = load_file(str(file))
    all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = all_names - {n for n, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{file}: weights do not match config.json ({str(e).splitlines()[-1].strip()}); "
                        "re-export the model") from None
    missing = set(missing) - tied
    if missing or unexpected:
        raise UserError(f"{file}: weights do not match config.json (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}); re-export the model")
