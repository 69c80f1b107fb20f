"""Shards checked before training reads them: the one gate both loaders go through.

`checked_tokens(dataset, split)` is `dataset.tokens(split)` (one memmap per shard) after one
pass over each shard that recomputes its CRC32 and finds its largest id:

  * an id >= the vocabulary (the header's and the manifest's vocab_size) stops the run, naming
    the shard, the token index and its byte offset in the file. Such an id would otherwise
    train silently (an id in [vocab, padded vocab): an embedding row no tokenizer writes) or
    crash at an arbitrary step with an `IndexError` that names no file (past the padded vocab);
  * a CRC32 that differs from the header's (a flipped bit, an edited byte: the position cannot
    be known from a checksum) or a header checksum that differs from manifest.json's (the
    shard was replaced) stops the run naming the shard.

Each is one `ShardError` line. `unusable_split` says why a split has nothing to read. `Dataset` already checked every header against its file and
the manifest (magic, version, dtype, size) on open; this is the full scan `amtrain inspect
--validate` does, made cheap enough for every start: zlib's CRC32 and numpy's max run at
memory speed, in chunks, without copying the memmap. Every rank scans the shards of the
splits it reads, once, when its loader is built (the OS page cache shares the reads).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from amtrain.errors import ShardError
from amtrain.store import Dataset, open_shard, read_header
from amtrain.store.format import HEADER_BYTES

CHUNK_TOKENS = 1 << 24  # 32-64 MiB of tokens per pass of crc32 / max


def checked_tokens(dataset: Dataset, split: str) -> list[np.ndarray]:
    """`dataset.tokens(split)` once every shard of the split passed `check_shard`."""
    for record in dataset.require_split(split):
        check_shard(dataset.folder / record.file, dataset.vocab_size, record.crc32)
    return dataset.tokens(split)


def check_shard(path: Path, vocab_size: int, manifest_crc32: int) -> None:
    """Recompute the shard's CRC32 and find its first id >= vocab_size; ShardError naming the
    shard (and the offset, for an id) if either is wrong."""
    header = read_header(path)
    tokens = open_shard(path)
    crc, first_bad = 0, None
    for lo in range(0, tokens.size, CHUNK_TOKENS):
        chunk = tokens[lo: lo + CHUNK_TOKENS]
        crc = zlib.crc32(chunk.data, crc)
        if first_bad is None and int(chunk.max()) >= vocab_size:
            first_bad = lo + int(np.argmax(chunk >= vocab_size))
    damaged = crc != header.crc32
    if first_bad is not None:
        cause = ("the token bytes changed after prep (its checksum no longer matches)" if damaged else
                 "the shard was written with another vocabulary")
        raise ShardError(f"{path}: token {first_bad:,} (byte offset {HEADER_BYTES + first_bad * tokens.itemsize:,}) "
                         f"is id {int(tokens[first_bad])}, outside the vocabulary of {vocab_size} ids: {cause}; "
                         f"re-run prep for this dataset")
    if damaged:
        raise ShardError(f"{path}: checksum mismatch (crc32 {crc:#010x}, the header says {header.crc32:#010x}): "
                         f"the token bytes changed after prep; re-run prep (`amtrain inspect --validate` on the "
                         f"dataset lists every damaged shard)")
    if header.crc32 != manifest_crc32:
        raise ShardError(f"{path}: checksum {header.crc32:#010x} differs from manifest.json's {manifest_crc32:#010x}: "
                         f"the shard was replaced after prep; re-run prep for this dataset")


def unusable_split(dataset: Dataset, split: str) -> str | None:
    """Why `split` has nothing to read: missing from the dataset, or holding no tokens (None:
    it has some). Training says so at start for the validation split instead of skipping it."""
    shards = dataset.shards(split)
    if not shards:
        return f"{dataset.folder} has no '{split}' split (it has: {', '.join(sorted(dataset.manifest.splits)) or 'none'})"
    if not sum(s.num_tokens for s in shards):
        return f"{dataset.folder}'s '{split}' split holds no tokens"
    return None
