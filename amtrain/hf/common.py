"""What every Hugging Face adapter shares: the adapter contract, the generic "what cannot be
represented is refused" check, weight tables, and the one-line errors (missing transformers,
hub ids).

An adapter (named by a family's registry entry, `adapters={"hf": "amtrain.hf.NAME:Adapter"}`) is
a class with

    model_types: tuple[str, ...]            transformers `model_type`s it imports
    to_hf(model) -> HFWeights               transformers config + state dict (HF names)
    from_hf(config: dict, state) -> model   an amtrain model of the same function

`to_hf` refuses, in one line naming the config field, whatever the transformers family cannot
compute exactly: `refuse_unmapped` compares every field of the amtrain config that the adapter
does not list as mapped against the field's default, so a field added to a config later
(mixture-of-experts, latent attention...) is refused until an adapter learns to map it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from amtrain.errors import UserError


@dataclass
class HFWeights:
    config: Any
    """A `transformers.PretrainedConfig` (model_type, architectures, shapes)."""
    state: dict[str, torch.Tensor]
    """Weights under the transformers model's names (tied copies written once)."""
    suppress_ids: list[int]
    """Padded vocabulary rows no tokenizer id maps to: `generate` must never produce them."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face interop needs transformers: pip install 'amtrain[hf]'") from None
    return transformers


def refuse_unmapped(cfg: Any, mapped: Iterable[str], target: str) -> None:
    """UserError for the first field of dataclass `cfg` that is neither in `mapped` nor at its
    default: the transformers family `target` has no place for it."""
    mapped = set(mapped)
    for f in fields(cfg):
        if f.name in mapped:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        value = getattr(cfg, f.name)
        if default is MISSING or value != default:
            raise UserError(f"model.{f.name}={value!r} has no equivalent in transformers' {target}; "
                            "--format hf exports only what that family computes exactly")


def check_local_folder(path: str | Path) -> Path:
    """A transformers folder on disk; a hub id (org/name, not a path here) is one clear line."""
    p = Path(path)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{p}: not a transformers model folder (no config.json); pass the folder "
                            "holding config.json and model.safetensors")
        return p
    text = str(path)
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
        raise UserError(f"{text} is a hub id; download it first and pass the folder "
                        f"(e.g. `huggingface-cli download {text} --local-dir DIR`; no folder {text} here, and "
                        "amtrain never downloads)")
    raise UserError(f"{p}: no such folder; pass a local transformers model folder (a hub id must be downloaded "
                    "first; amtrain never downloads)")


# -- weight tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One transformers tensor and where it comes from in an amtrain state dict."""

    ours: str
    hf: str
    part: int | None = None
    """Our fused qkv: rows part*D .. (part+1)*D (q, k, v = 0, 1, 2)."""
    transpose: bool = False
    """GPT-2's Conv1D stores (in, out); a Linear (out, in)."""
    zero: bool = False
    """A bias transformers has and amtrain's block has not: written as zeros (shape: `ours`'s
    rows); read back only if all zero."""


def _take(t: torch.Tensor, pair: Pair) -> torch.Tensor:
    if pair.part is not None:
        t = t.chunk(3, dim=0)[pair.part]
    if pair.zero:
        return torch.zeros(t.shape[0], dtype=t.dtype)
    return (t.t() if pair.transpose else t).contiguous()


def to_hf_state(ours: dict[str, torch.Tensor], table: list[Pair]) -> dict[str, torch.Tensor]:
    return {p.hf: _take(ours[p.ours].detach().to("cpu", torch.float32), p) for p in table}


def from_hf_state(theirs: dict[str, torch.Tensor], table: list[Pair], where: str,
                  why_zero: str = "amtrain's block has no bias there") -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state`: an amtrain state dict; a missing tensor or a non-zero bias that
    amtrain cannot hold is a UserError naming it."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for p in table:
        if p.hf not in theirs:
            raise UserError(f"{where}: tensor {p.hf!r} missing; is this a complete checkpoint of that model?")
        t = theirs[p.hf].to(torch.float32)
        if p.zero:
            if t.abs().max() > 0:
                raise UserError(f"{where}: {p.hf} is not zero ({why_zero}); this checkpoint cannot be "
                                "represented exactly")
            continue
        t = t.t().contiguous() if p.transpose else t
        if p.part is None:
            out[p.ours] = t
        else:
            parts.setdefault(p.ours, {})[p.part] = t
    for name, chunks in parts.items():
        out[name] = torch.cat([chunks[i] for i in sorted(chunks)], dim=0)
    return out


def layer_table(num_layers: int, layer: Callable[[int], list[Pair]], top: list[Pair]) -> list[Pair]:
    return top + [p for i in range(num_layers) for p in layer(i)]
