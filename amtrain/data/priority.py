"""Priority sampling of training chunks: P(chunk i) ∝ priority_i ** (1 / temperature).

One global stream of draws, a pure function of (seed, draw index): draw g is made from block
g // BLOCK, whose generator is seeded with (seed, block), so any position can be resumed
without replaying. Rank r of W takes the draws g ≡ r (mod W): ranks never share a draw, their
union is exactly the single-process stream, and a `state_dict` (the global position) resumes at
any world size. temperature -> 0 approaches argmax, 1 is proportional, large is uniform.

`chunk_priorities(dataset_folder, split)` reads prep-audio's parquet tables in the dataset's
document order, so draw i names document i of that split (one document per chunk).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

BLOCK = 4096  # draws generated per seeded block


def chunk_probabilities(priorities, temperature: float) -> np.ndarray:
    p = np.asarray(priorities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("priorities must be a non-empty 1-D array")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if np.any(~np.isfinite(p)) or np.any(p <= 0):
        raise ValueError("priorities must be finite and > 0")
    w = np.exp((np.log(p) - np.log(p).max()) / temperature)  # stable p ** (1/T)
    return w / w.sum()


class PrioritySampler:
    """Iterate chunk indices for one rank; `state_dict` / `load_state_dict` resume exactly."""

    def __init__(self, priorities, temperature: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.probs = chunk_probabilities(priorities, temperature)
        self.cdf = np.cumsum(self.probs)
        self.cdf[-1] = 1.0
        self.temperature, self.seed, self.rank, self.world_size = temperature, seed, rank, world_size
        self.position = 0  # global draws consumed by all ranks together (a multiple of world_size)
        self._block_id, self._block = -1, np.zeros(0, np.int64)

    @property
    def num_chunks(self) -> int:
        return self.probs.size

    def _draw(self, g: int) -> int:
        b = g // BLOCK
        if b != self._block_id:
            u = np.random.default_rng([self.seed, b]).random(BLOCK)
            self._block_id, self._block = b, np.searchsorted(self.cdf, u, side="right")
        return int(self._block[g % BLOCK])

    def __iter__(self):
        return self

    def __next__(self) -> int:
        idx = self._draw(self.position + self.rank)
        self.position += self.world_size
        return idx

    def take(self, n: int) -> np.ndarray:
        return np.fromiter((next(self) for _ in range(n)), dtype=np.int64, count=n)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "temperature": self.temperature,
                "num_chunks": self.num_chunks}

    def load_state_dict(self, state: dict) -> None:
        if state["num_chunks"] != self.num_chunks or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_chunks']} chunks / seed {state['seed']}, "
                             f"this sampler has {self.num_chunks} / {self.seed}")
        pos = int(state["position"])
        self.position = -(-pos // self.world_size) * self.world_size  # next whole round of draws


SCORES_FORMAT = "amtrain-audio-chunks"
SCHEMA_VERSION = 1
_UNIT = re.compile(r"^(.*-[0-9a-f]{10})(?:-\d+)?$")  # shard stem = unit id (+ "-part")


def read_scores(path: str | Path):
    """A prep-audio chunk table, checked for its format and schema version -> pyarrow.Table."""
    import pyarrow.parquet as pq

    from amtrain.errors import UserError

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: chunk-score table unreadable ({e}); re-run prep-audio") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("format") != SCORES_FORMAT or meta.get("schema_version") != str(SCHEMA_VERSION):
        raise UserError(f"{path}: not an amtrain chunk-score table of schema version {SCHEMA_VERSION}; re-run prep-audio")
    return table


def chunk_priorities(dataset_folder: str | Path, split: str = "train") -> np.ndarray:
    """Priorities of every document (chunk) of a prep-audio dataset's split, in document order."""
    from amtrain.errors import ShardError
    from amtrain.store import Dataset

    ds = Dataset(dataset_folder)
    scores_dir = ds.folder / ds.manifest.extra.get("scores_dir", "scores")
    out, tables = [], {}
    for rec in ds.require_split(split):
        m = _UNIT.match(Path(rec.file).stem)
        uid = m[1] if m else Path(rec.file).stem
        if uid not in tables:
            tables[uid] = [read_scores(scores_dir / f"{uid}.parquet").column("priority").to_numpy(), 0]
        pri, used = tables[uid]
        if used + rec.num_docs > pri.size:
            raise ShardError(f"{ds.folder / rec.file}: more documents than its score table {uid}.parquet has chunks; re-run prep-audio")
        out.append(pri[used:used + rec.num_docs])
        tables[uid][1] += rec.num_docs
    return np.concatenate(out)


class PriorityDocuments:
    """Priority-sampled documents (= chunks) of a prep-audio dataset split, as token arrays
    (read-only memmap views): the sampler's draws mapped through the shards' document index."""

    def __init__(self, dataset_folder: str | Path, split: str = "train", temperature: float = 1.0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        from amtrain.store import Dataset
        from amtrain.store.format import open_shard

        ds = Dataset(dataset_folder)
        self.sampler = PrioritySampler(chunk_priorities(dataset_folder, split), temperature, seed, rank, world_size)
        self._shards, spans = [], []
        for i, rec in enumerate(ds.require_split(split)):
            toks = open_shard(ds.folder / rec.file)
            bounds = np.append(ds.doc_starts(rec).astype(np.int64), toks.size)
            self._shards.append(toks)
            spans.append(np.stack([np.full(rec.num_docs, i), bounds[:-1], bounds[1:]], axis=1))
        self._spans = np.concatenate(spans)  # (num_docs, 3): shard, start, end

    def document(self, index: int) -> np.ndarray:
        shard, a, b = self._spans[index]
        return self._shards[shard][a:b]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.document(next(self.sampler))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
