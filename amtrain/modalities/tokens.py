"""Plain token ids: datasets whose tokenizer no other modality claims. The behaviour is the
`Modality` base class's (id files in, .txt ids + .npy out, T5 in-filling at `<gap>`)."""

from __future__ import annotations

from amtrain.modalities.base import Modality
from amtrain.registry import register_modality

TOKENS = register_modality(Modality())
