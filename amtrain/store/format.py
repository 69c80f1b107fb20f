"""The token-shard file: one binary format for every modality.

Layout (little-endian):

    offset  size  field
    0       8     magic b"AMTSHRD\\0"
    8       4     format version (uint32) = 1
    12      4     dtype code (uint32): 2 = uint16, 4 = uint32 (bytes per token)
    16      8     num_tokens (uint64)
    24      8     vocab_size (uint64): every token id is < vocab_size
    32      4     crc32 of the token bytes (uint32), checked by `validate`
    36      28    zero
    64      ...   num_tokens tokens of the dtype

uint16 is used whenever the vocabulary fits (vocab_size <= 65536), else uint32. Files are
written to a temporary name, fsynced and renamed into place, so a crash never leaves a file
under the final name; the header is written last, so a half-written temp file never passes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amtrain.errors import ShardError
from amtrain.fileio import atomic_target

MAGIC = b"AMTSHRD\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, dtype code, num_tokens, vocab_size, crc32
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int
    crc32: int


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> ShardHeader:
    """Write `tokens` (any integer array, all < vocab_size) as one shard, atomically."""
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        raise ShardError(
            f"{path}: token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the "
            f"vocabulary of {vocab_size}; fix the tokenizer or the vocab size"
        )
    payload = np.ascontiguousarray(tokens, dtype=dtype).tobytes()
    header = ShardHeader(VERSION, dtype, tokens.size, vocab_size, zlib.crc32(payload))
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        f.write(payload)
        f.seek(0)
        f.write(_pack(header))
    return header


def _pack(h: ShardHeader) -> bytes:
    raw = _HEADER.pack(MAGIC, h.version, h.dtype.itemsize, h.num_tokens, h.vocab_size, h.crc32)
    return raw.ljust(HEADER_BYTES, b"\0")


def read_header(path: str | Path) -> ShardHeader:
    """Read and check a shard's header against the file; raise ShardError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard missing; re-run the prep command that made this dataset") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; the file is truncated, re-run prep")
    magic, version, code, num_tokens, vocab_size, crc = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not an amtrain shard (magic {magic!r}); nanoGPT/modded-nanogpt .bin files import with `amtrain import-bin`")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this amtrain reads {VERSION}; re-run prep")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code} in header (expected 2 or 4); the file is corrupt, re-run prep")
    dtype = _DTYPES[code]
    if dtype != dtype_for_vocab(vocab_size):
        raise ShardError(f"{path}: dtype {dtype.name} does not match vocab size {vocab_size} (expected {dtype_for_vocab(vocab_size).name}); the file is corrupt, re-run prep")
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    if size != expected:
        raise ShardError(f"{path}: {size} bytes but the header promises {num_tokens} tokens ({expected} bytes); the file is truncated or corrupt, re-run prep")
    return ShardHeader(version, dtype, num_tokens, vocab_size, crc)


def open_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map, after checking its header."""
    h = read_header(path)
    if h.num_tokens == 0:
        return np.zeros(0, dtype=h.dtype)
    return np.memmap(path, dtype=h.dtype, mode="r", offset=HEADER_BYTES, shape=(h.num_tokens,))


def validate_shard(path: str | Path, vocab_size: int | None = None) -> list[str]:
    """Scan a whole shard: header, checksum and every id against the vocabulary.
    Returns the problems found (empty when the shard is sound)."""
    try:
        h = read_header(path)
    except ShardError as e:
        return [str(e)]
    problems = []
    if vocab_size is not None and h.vocab_size != vocab_size:
        problems.append(f"{path}: header vocab size {h.vocab_size} contradicts the manifest's {vocab_size}")
    tokens = open_shard(path)
    if zlib.crc32(tokens.tobytes()) != h.crc32:
        problems.append(f"{path}: checksum mismatch, the token bytes were changed or damaged; re-run prep")
    if tokens.size and int(tokens.max()) >= h.vocab_size:
        problems.append(f"{path}: token id {int(tokens.max())} >= vocab size {h.vocab_size}")
    return problems
