"""A model family and a modality added through the registry alone (`AMTRAIN_PLUGINS=tests.toy_plugin`).

Nothing else in the tree knows them: tests/test_architecture.py prepares a dataset of this
modality, trains this family through `launchers/train.py` and rolls it out through `amtrain
rollout`, with only this module named in the environment.

- family `bigram`: a next-token MLP over the current token's embedding (a bigram model with a
  hidden layer), left to right, trained by the causal-LM objective; its "cache" is a position.
- modality `dna`: sequences over A C G T (tokenizer `dna`: ids 0-3, <eot> 4), prompts and
  outputs as plain .txt letters; validation reports bits per base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amtrain.fileio import write_text_atomic
from amtrain.modalities import Modality
from amtrain.modalities.base import save_npy
from amtrain.models.base import SequenceModel
from amtrain.registry import ModelFamily, register_family, register_modality
from amtrain.tokens import IGNORE_INDEX, register_tokenizer

BASES = "ACGT"


# ---------------------------------------------------------------- the family
@dataclass
class BigramConfig:
    vocab_size: int
    d_model: int = 16
    max_seq_len: int = 64


@dataclass
class Position:
    pos: int
    max_len: int


class BigramLM(SequenceModel):
    def __init__(self, cfg: BigramConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hidden = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, idx, targets=None, cache: Position | None = None, last_only: bool = False):
        if cache is not None:
            cache.pos += idx.shape[1]
        h = torch.tanh(self.hidden(self.embed(idx[:, -1:] if last_only else idx)))  # (B, T, D)
        logits = h @ self.embed.weight.T  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> Position:
        return Position(0, max_len)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.num_params()


register_family(ModelFamily(
    name="bigram", config_cls=BigramConfig, model_cls=BigramLM, sizes={"debug": {"d_model": 16}},
    objective="amtrain.train.objective:LMObjective", left_to_right=True, description="toy bigram MLP"))


# ---------------------------------------------------------------- the modality
class DnaTokenizer:
    name = "dna"
    vocab_size = 5
    eot_id = 4
    special_ids = {"eot": 4}

    def encode(self, text: str) -> list[int]:
        return [BASES.index(c) for c in text.upper() if c in BASES]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(BASES[i] if i < 4 else "\n" for i in ids)

    def params(self) -> dict:
        return {}


register_tokenizer("dna", DnaTokenizer)


class DnaModality(Modality):
    name = "dna"
    tokenizers = ("dna",)
    prompt_files = ".txt of A C G T"

    def val_metrics(self, ce_per_token: float) -> dict[str, float]:
        return {"bits_per_base": ce_per_token / math.log(2)}

    def document_prefix(self, tokenizer) -> list[int]:
        return [tokenizer.eot_id]

    def read_prompt(self, rm, path: Path, cfg, codec=None) -> list[np.ndarray]:
        return [np.array(rm.tokenizer.encode(path.read_text()), np.int64)]

    def write_tape(self, rm, tape, stem: Path, codec=None, prompt=None) -> list[Path]:
        ids = np.asarray(tape, np.int64)
        write_text_atomic(stem.with_suffix(".txt"), rm.tokenizer.decode(ids[ids != 4].tolist()) + "\n")
        return [stem.with_suffix(".txt"), save_npy(ids, stem)]


register_modality(DnaModality())
