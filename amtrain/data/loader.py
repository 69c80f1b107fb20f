"""Training and validation batches: fixed-length windows cut from a token dataset.

Every shard of a split is cut into windows of seq_len+1 tokens at stride seq_len (inputs
w[:-1], targets w[1:]); windows never straddle shards. An epoch is a permutation of all
windows drawn from (seed, epoch) alone. Optimizer step s takes the global batch
perm[s*G : (s+1)*G] (G = micro x accum x world); rank r takes the contiguous slice
[r*micro*accum, (r+1)*micro*accum) of it, one micro-batch at a time. So:

  * the order is deterministic per seed and epoch, whatever the world size;
  * ranks get disjoint windows;
  * the position is one small state {epoch, consumed} (windows consumed in the epoch, counted
    globally) that does not depend on the world size: a resumed run, even on another number of
    ranks, continues exactly where the interrupted one stopped.

An epoch's tail shorter than a global batch is dropped. Tokens are read only through
`amtrain.store.Dataset` (memory maps), each shard checked once first (`amtrain.data.checks`).

With a `FimSpec` (data.fim_rate > 0) each training window, cut to the step's length, goes through
the fill-in-the-middle transform (`amtrain.data.fim`), whose draws depend on (seed, epoch, window
id) alone: the properties above hold for FIM batches too. Validation windows stay plain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amtrain.data.checks import checked_tokens
from amtrain.data.fim import FimSpec, FimWindows
from amtrain.errors import UserError
from amtrain.store import Dataset


@dataclass
class LoaderState:
    epoch: int = 0
    consumed: int = 0  # windows of this epoch already handed out, over all ranks


class WindowIndex:
    """(shard, start) of every window of a split."""

    def __init__(self, dataset: Dataset, split: str, seq_len: int):
        self.shards = checked_tokens(dataset, split)  # memmaps, manifest order; CRC and ids checked
        counts = [max(0, (s.size - 1) // seq_len) for s in self.shards]
        self.shard_of = np.repeat(np.arange(len(self.shards)), counts)  # (N,)
        self.start_of = np.concatenate([np.arange(c, dtype=np.int64) * seq_len for c in counts]) if counts else np.zeros(0, np.int64)
        self.seq_len = seq_len
        self.split = split
        self.folder = dataset.folder

    def __len__(self) -> int:
        return int(self.shard_of.size)

    def window(self, i: int) -> np.ndarray:
        s = self.start_of[i]
        return self.shards[self.shard_of[i]][s: s + self.seq_len + 1]

    def stack(self, ids: np.ndarray) -> torch.Tensor:
        """(B,) window ids -> (B, seq_len+1) int64."""
        return torch.from_numpy(np.stack([self.window(i).astype(np.int64) for i in ids]))

    def stack_fim(self, ids: np.ndarray, length: int, fim: FimWindows, epoch: int) -> torch.Tensor:
        """(B,) window ids -> their first length+1 tokens, each through the FIM transform. (B, length+1)"""
        return torch.from_numpy(np.stack([
            fim.window(self.window(i)[:length + 1].astype(np.int64), epoch, int(i), int(self.shard_of[i]),
                       int(self.start_of[i])) for i in ids]))


def check_vocab(dataset: Dataset, model_vocab: int, key: str = "model.vocab_size") -> None:
    if dataset.vocab_size > model_vocab:
        raise UserError(f"{dataset.folder}: the data's vocabulary ({dataset.vocab_size} ids, tokenizer "
                        f"{dataset.manifest.tokenizer}) exceeds the model's ({key} = {model_vocab}); "
                        f"raise {key} or leave it unset to use the data's")


class TrainLoader:
    """Endless iterator of (inputs, targets) micro-batches for one rank, resumable."""

    def __init__(self, dataset: Dataset, split: str, seq_len: int, micro_batch: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, fim: FimSpec | None = None):
        """`fim`: turn windows into fill-in-the-middle examples (None: plain windows)."""
        self.index = WindowIndex(dataset, split, seq_len)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        if len(self.index) < self.global_batch:
            raise UserError(f"{dataset.folder}: split '{split}' holds {len(self.index)} windows of {seq_len + 1} tokens, "
                            f"fewer than one global batch ({self.global_batch}); use more data, a shorter "
                            f"data.seq_len or a smaller batch")
        self.fim = None
        if fim is not None:
            starts = [dataset.doc_starts(r) for r in dataset.shards(split)] if fim.needs_documents else None
            self.fim = FimWindows(fim, seed, starts)
        self.state = LoaderState()
        self._perm_epoch = -1
        self._perm: np.ndarray = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            self._perm_epoch = epoch
        return self._perm

    def _next_step_ids(self) -> np.ndarray:
        """This rank's windows for the next optimizer step; advances the state by one global batch."""
        if self.state.consumed + self.global_batch > len(self.index):
            self.state = LoaderState(self.state.epoch + 1, 0)
        perm = self._permutation(self.state.epoch)
        lo = self.state.consumed + self.rank * self.micro_batch * self.grad_accum
        self.state.consumed += self.global_batch
        return perm[lo: lo + self.micro_batch * self.grad_accum]

    def next_step(self, length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches of the next optimizer step: [(x (B,T), y (B,T)), ...],
        T = `length` (windows cut from the full ones, e.g. during a sequence-length warm-up)
        or seq_len."""
        ids = self._next_step_ids()
        T = self.index.seq_len if length is None else length
        out = []
        for a in range(self.grad_accum):
            chunk = ids[a * self.micro_batch: (a + 1) * self.micro_batch]
            if self.fim is None:
                w = self.index.stack(chunk)[:, :T + 1]  # (B, T+1)
            else:
                w = self.index.stack_fim(chunk, T, self.fim, self.state.epoch)
            out.append((w[:, :-1], w[:, 1:]))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "consumed": self.state.consumed, "seed": self.seed,
                "global_batch": self.global_batch, "seq_len": self.index.seq_len}

    def load_state_dict(self, d: dict) -> None:
        if d["seq_len"] != self.index.seq_len or d["seed"] != self.seed:
            raise UserError(f"checkpoint data position was made with data.seq_len={d['seq_len']}, train.seed={d['seed']}; "
                            f"this run has {self.index.seq_len}, {self.seed}: resume with the same values")
        self.state = LoaderState(int(d["epoch"]), int(d["consumed"]))


def val_batches(dataset: Dataset, split: str, seq_len: int, micro_batch: int, num_batches: int,
                rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the first num_batches x world x micro windows of the split in
    order (fewer if the split is small), rank r taking every world-th micro-batch."""
    index = WindowIndex(dataset, split, seq_len)
    total = min(len(index) // (micro_batch * world_size), num_batches)
    if total == 0:
        raise UserError(f"{dataset.folder}: split '{split}' holds {len(index)} windows of {seq_len + 1} tokens, "
                        f"too few for one validation batch per rank; lower data.seq_len or set data.val_split ''")
    out = []
    for b in range(total):
        lo = (b * world_size + rank) * micro_batch
        w = index.stack(np.arange(lo, lo + micro_batch))
        out.append((w[:, :-1], w[:, 1:]))
    return out
