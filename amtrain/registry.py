"""The two open sets of amtrain, each registered once: model families and modalities.

A **model family** (`ModelFamily`) is one spec: its config dataclass, model class, size table,
training objective, whether it generates left to right, its name in scaling studies and its
export adapters. Config validation, `amtrain.models.io`, the trainer, scaling studies and
rollouts all ask `family(name)`; none keeps a list of its own.

A **modality** (`amtrain.modalities.Modality`) is one object per token kind (text, MIDI events,
audio codes, plain ids): its tokenizers, T5 span unit, validation metrics, prompt reader, output
writer, generation grammar and rollout strategies. Code asks `modality_of(tokenizer_name)`
instead of comparing names.

Built-in families register themselves at the bottom of their model module, built-in
modalities in `amtrain/modalities/`; both are imported on the first lookup. More come from
plugins: modules named in the `AMTRAIN_PLUGINS` environment variable (comma-separated) and the
`amtrain.plugins` entry-point group are imported then too, so a new family or modality needs no
edit anywhere else (tests/toy_plugin.py is one, trained and sampled through the launcher).

Standard library only: the specs' classes live in the modules that register them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from amtrain.errors import UserError

if TYPE_CHECKING:
    from amtrain.modalities import Modality
    from amtrain.models.base import SequenceModel

BUILTIN_FAMILIES = ("amtrain.models.decoder", "amtrain.models.lstm", "amtrain.models.t5")
BUILTIN_MODALITIES = ("amtrain.modalities.text", "amtrain.modalities.midi", "amtrain.modalities.audio",
                      "amtrain.modalities.tokens", "amtrain.modalities.nvd", "amtrain.modalities.abc")
PLUGINS_ENV = "AMTRAIN_PLUGINS"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """The value of `model.arch` and of "arch" in an export's config.json."""
    config_cls: type
    """Config dataclass; `model_cls(config_cls(**fields))` builds the model, kept as `model.cfg`."""
    model_cls: type[SequenceModel]
    """The torch module (`amtrain.models.base.SequenceModel`: single-device code; DeepSpeed wraps
    it from `amtrain/train/`)."""
    sizes: Mapping[str, Mapping[str, Any]]
    """Size table: name -> config fields (a `debug` row beside every real size)."""
    objective: str
    """"module:Class" of its training objective (`amtrain.train.objective`): what a batch and its
    loss are, which model fields the data fixes (vocabulary, context), FLOPs per token."""
    left_to_right: bool
    """Generates left to right from a prefix (decoder, LSTM), else a sequence-to-sequence
    denoiser that in-fills sentinel spans (T5)."""
    description: str = ""
    study_name: str | None = None
    """Its name in `amtrain scaling run --arch` (None: not offered there)."""
    adapters: Mapping[str, str] = field(default_factory=dict)
    """Export format -> "module:attr" of an adapter: "hf" = the transformers family it maps to
    exactly (`amtrain.hf.common` states the contract; `export --format hf`, `import-hf`)."""

    def config(self, size: str, **fields_):
        """The config of a named size; keyword fields replace the row's. A wrong size or field is
        a `UserError` naming the config key."""
        if size not in self.sizes:
            raise UserError(f"model.size: unknown {self.name} size {size!r}; valid sizes: {', '.join(self.sizes)}")
        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(fields_) - known)
        if unknown:
            raise UserError(f"model.overrides: {unknown[0]!r} is not a {self.config_cls.__name__} field "
                            f"(fields: {', '.join(sorted(known))})")
        try:
            return self.config_cls(**{**self.sizes[size], **fields_})
        except (TypeError, ValueError) as e:
            raise UserError(f"model.size {size} / model.overrides: {e}") from None

    def build(self, config) -> SequenceModel:
        return self.model_cls(config)

    def config_from_dict(self, d: dict, where: str):
        """A config from a saved dict (export config.json, checkpoint meta)."""
        unknown = sorted(set(d) - {f.name for f in fields(self.config_cls)})
        if unknown:
            raise UserError(f"{where}: unknown model fields {unknown} for arch {self.name!r}; "
                            "was it written by a newer amtrain?")
        return self.config_cls(**d)

    def objective_cls(self) -> Any:
        return load_attr(self.objective)

    def adapter(self, fmt: str):
        if fmt not in self.adapters:
            raise UserError(f"arch {self.name!r} has no {fmt} export; it has: {', '.join(self.adapters) or 'none'}")
        return load_attr(self.adapters[fmt])


_FAMILIES: dict[str, ModelFamily] = {}
_MODALITIES: dict[str, Modality] = {}
_loaded = False


def load_attr(spec: str):
    """"package.module:attr" -> the attribute (imported on use, keeping heavy modules lazy)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_family(spec: ModelFamily) -> ModelFamily:
    """Add a family (at import time of the module that defines it). Registering a name twice
    with another model class is an error; the same spec again (a re-import) is a no-op."""
    have = _FAMILIES.get(spec.name)
    if have is not None and have.model_cls is not spec.model_cls:
        raise ValueError(f"model family {spec.name!r} is registered already (by {have.model_cls.__module__})")
    _FAMILIES[spec.name] = spec
    return spec


def register_modality(modality: Modality) -> Modality:
    have = _MODALITIES.get(modality.name)
    if have is not None and type(have) is not type(modality):
        raise ValueError(f"modality {modality.name!r} is registered already (by {type(have).__module__})")
    _MODALITIES[modality.name] = modality
    return modality


def load_plugins() -> None:
    """Import the built-in families and modalities, then the plugins (once per process)."""
    _load()


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_FAMILIES + BUILTIN_MODALITIES:
        importlib.import_module(module)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"{PLUGINS_ENV}: cannot import plugin {module!r} ({e}); fix the name or PYTHONPATH") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group="amtrain.plugins"):
        ep.load()


def family(name: str) -> ModelFamily:
    _load()
    if name not in _FAMILIES:
        raise UserError(f"model.arch: {name!r} is not a model family; known: {', '.join(family_names())}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load()
    return sorted(_FAMILIES)


def family_of(model) -> ModelFamily:
    """The family whose model class built `model`."""
    _load()
    model = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    for spec in _FAMILIES.values():
        if type(model) is spec.model_cls:
            return spec
    raise ValueError(f"{type(model).__name__} is not the model class of a registered family")


def study_families() -> dict[str, ModelFamily]:
    """Scaling-study name -> family, for the families offered there."""
    _load()
    return {f.study_name: f for f in _FAMILIES.values() if f.study_name}


def modality(name: str) -> Modality:
    _load()
    if name not in _MODALITIES:
        raise UserError(f"unknown modality {name!r}; known: {', '.join(_MODALITIES)}")
    return _MODALITIES[name]


def modality_names() -> list[str]:
    _load()
    return sorted(_MODALITIES)


def encoding(name: str) -> Modality:
    """The symbolic-music modality whose `encoding` is `name` (`amtrain prep-midi --encoding`)."""
    _load()
    for m in _MODALITIES.values():
        if m.encoding == name:
            return m
    raise UserError(f"--encoding {name!r}: not a MIDI encoding; choose one of {', '.join(encoding_names())}")


def encoding_names() -> list[str]:
    """The `--encoding` names of the registered modalities, amt first."""
    _load()
    names = [m.encoding for m in _MODALITIES.values() if m.encoding]
    return sorted(names, key=lambda n: (n != "amt", n))


def modality_of(tokenizer: str) -> Modality:
    """The modality of a dataset's tokenizer; ids of an unknown tokenizer are plain tokens."""
    _load()
    for m in _MODALITIES.values():
        if tokenizer in m.tokenizers:
            return m
    return _MODALITIES["tokens"]
