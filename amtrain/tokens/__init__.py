"""Vocabularies. Each tokenizer owns a documented id layout and round-trips its own output.

A tokenizer is looked up by the id written into a dataset's manifest (`get_tokenizer(name,
**params)`), so a reader can always decode what a writer made. Factories are named as
"module:attribute" strings and imported on first use, keeping heavy modalities lazy.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from amtrain.errors import UserError

IGNORE_INDEX = -100
"""Label id the losses skip (PyTorch's cross_entropy default): padding and unlabelled positions."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int
    special_ids: dict[str, int]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def params(self) -> dict:
        """Constructor parameters recorded in the manifest (`get_tokenizer(name, **params)`)."""
        ...


_REGISTRY: dict[str, str] = {
    "gpt2": "amtrain.tokens.text:GPT2Tokenizer",
    "ascii": "amtrain.tokens.text:AsciiTokenizer",
    "midi": "amtrain.tokens.midi:MidiTokenizer",
    "audio": "amtrain.tokens.audio:AudioTokenizer",
}


def tokenizer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_tokenizer(name: str, **params) -> Tokenizer:
    if name not in _REGISTRY:
        raise UserError(f"unknown tokenizer {name!r}: choose one of {', '.join(tokenizer_names())}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)(**params)
