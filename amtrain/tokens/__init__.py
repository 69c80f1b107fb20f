"""Vocabularies. Each tokenizer owns a documented id layout and round-trips its own output.

A tokenizer is looked up by the id written into a dataset's manifest (`get_tokenizer(name,
**params)`), so a reader can always decode what a writer made. Factories are named as
"module:attribute" strings and imported on first use, keeping heavy modalities lazy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from amtrain.errors import UserError

IGNORE_INDEX = -100
"""Label id the losses skip (PyTorch's cross_entropy default): padding and unlabelled positions."""


@runtime_checkable
class Tokenizer(Protocol):
    """What every vocabulary offers: an id layout of `vocab_size` ids, its specials, a
    human-readable `decode` (text for text; a rendering of events or codes otherwise) and the
    parameters that rebuild it from a manifest. What `encode` takes depends on the kind of input
    (`TextTokenizer`: strings; `AudioTokenizer.encode`: codes (K, T)), so it is not part of the
    common protocol."""

    name: str
    vocab_size: int
    eot_id: int
    special_ids: dict[str, int]

    def decode(self, ids) -> str: ...

    def params(self) -> dict:
        """Constructor parameters recorded in the manifest (`get_tokenizer(name, **params)`)."""
        ...


@runtime_checkable
class TextTokenizer(Tokenizer, Protocol):
    """A tokenizer of strings (gpt2, ascii, and MIDI's textual event form)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]: ...


_REGISTRY: dict[str, str | Callable[..., Tokenizer]] = {
    "gpt2": "amtrain.tokens.text:GPT2Tokenizer",
    "ascii": "amtrain.tokens.text:AsciiTokenizer",
    "midi": "amtrain.tokens.midi:MidiTokenizer",
    "audio": "amtrain.tokens.audio:AudioTokenizer",
    "nvd": "amtrain.tokens.nvd:NvdTokenizer",
    "abc": "amtrain.tokens.abc:AbcTokenizer",
}


def register_tokenizer(name: str, factory: str | Callable[..., Tokenizer]) -> None:
    """Make `get_tokenizer(name, **params)` build `factory(**params)` (a callable, or a
    "module:attribute" string imported on first use). Plugins call it at import time."""
    _REGISTRY[name] = factory


def tokenizer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_tokenizer(name: str, **params) -> Tokenizer:
    if name not in _REGISTRY:
        from amtrain.registry import load_plugins

        load_plugins()  # a plugin's tokenizer (AMTRAIN_PLUGINS) registers on import
    if name not in _REGISTRY:
        raise UserError(f"unknown tokenizer {name!r}: choose one of {', '.join(tokenizer_names())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**params)
