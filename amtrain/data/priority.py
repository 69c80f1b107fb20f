"""Priority sampling of training chunks: P(document) ∝ priority ** (1 / temperature).

prep-audio cuts every file into chunks and scores each (`amtrain.prep.audio_features`); each
chunk is one document of the token dataset. `chunk_priorities(dataset_folder, split)` reads the
scores (prep-audio's parquet tables, checked by `read_scores`) in the split's document order,
and `PrioritySampler` is the document choice the T5 objective hands to
`amtrain.data.span_corruption.DenoisingBatcher` (its `document_sampler` hook) when
`denoise.priority` is set: each example draws a document with P ∝ priority ** (1 / T) among
the documents long enough for the example's chunk, then the batcher takes a uniform window
inside it. temperature -> 0 approaches argmax, 1 is proportional, large is uniform.

The sampler keeps no state of its own: it draws from the generator the batcher passes, which
the objective reseeds from (seed, step, rank) every step, so a resumed run draws exactly as the
uninterrupted one (`amtrain.train.objective`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


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
    """Document choice by priority, for `DenoisingBatcher(document_sampler=...)`: one probability
    per document of the split (`chunk_probabilities`), renormalized over the documents that
    hold at least one window of the length asked for."""

    def __init__(self, priorities, temperature: float = 1.0):
        self.probs = chunk_probabilities(priorities, temperature)

    @property
    def num_documents(self) -> int:
        return self.probs.size

    def choose(self, rng: np.random.Generator, num_windows: np.ndarray) -> int:
        """A document index drawn from `rng`; `num_windows` (num_documents,) counts each
        document's valid windows (0: too short, never drawn)."""
        p = self.probs * (num_windows > 0)
        if p.sum() == 0:
            raise ValueError("no document long enough for the chunk has a priority above 0; "
                             "raise denoise.priority_temperature or lower denoise.inputs_length")
        return int(rng.choice(len(p), p=p / p.sum()))


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
