"""Pretrained-model folders: `save_pretrained` / `load_pretrained`, no DeepSpeed needed.

    OUT/
      model.safetensors   fp32 weights; a tied parameter is stored once (under its first name)
      config.json         {"arch": "decoder", "model": {DecoderConfig fields}, **meta}

Both files are written atomically (`amtrain.fileio`), config.json last, so a folder with a
config.json is complete. "arch" names the model family (`amtrain.registry`), which gives
`load_pretrained` the config and model classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from amtrain.errors import UserError
from amtrain.fileio import atomic_target, write_json_atomic
from amtrain.models.base import SequenceModel
from amtrain.registry import family, family_names, family_of

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model: SequenceModel, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write `model.safetensors` (fp32) and `config.json` into out_dir; return out_dir.
    `meta` (tokenizer, step, dataset...) is merged into config.json beside "arch" and "model"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # named_parameters() yields a tied parameter once, so safetensors sees no shared storage.
    state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters()}
    state |= {n: b.detach().to("cpu").contiguous() for n, b in _persistent_buffers(model)}
    with atomic_target(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / CONFIG, {"arch": family_of(model).name, "model": asdict(model.cfg), **(meta or {})})
    return out


def _persistent_buffers(model: nn.Module):
    non_persistent = {f"{mn}.{bn}" if mn else bn for mn, m in model.named_modules()
                      for bn in m._non_persistent_buffers_set}
    return [(n, b) for n, b in model.named_buffers() if n not in non_persistent]


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SequenceModel, dict]:
    """Load a folder made by `save_pretrained` (or the path of a file inside it): return the
    model in eval mode on `map_location`, and config.json's other keys as meta."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config = _read_config(folder)
    arch = config.pop("arch")
    if arch not in family_names():
        raise UserError(f"{folder / CONFIG}: unknown arch {arch!r}; known: {', '.join(family_names())}")
    fam = family(arch)
    model = fam.build(fam.config_from_dict(config.pop("model"), str(folder / CONFIG)))
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
    if "arch" not in config and "model_type" in config:
        raise UserError(f"{folder}: a transformers folder (model_type {config['model_type']!r}); convert it with "
                        f"`amtrain import-hf {folder} OUT` and pass OUT")
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
