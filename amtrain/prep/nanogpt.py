"""Import nanoGPT / modded-nanogpt token files (`amtrain import-bin`).

modded-nanogpt (data/fineweb.py): a 1024-byte header of 256 int32 — magic 20240520, version 1,
token count — then uint16 tokens. nanoGPT (data/*/prepare.py): raw uint16 tokens, no header.
Both hold GPT-2 ids; documents are found at end-of-text ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.errors import ShardError
from amtrain.prep.common import begin_dataset
from amtrain.store import DatasetBuilder
from amtrain.tokens import get_tokenizer

MODDED_MAGIC = 20240520
MODDED_HEADER_INTS = 256


def read_bin(path: Path) -> np.ndarray:
    """Tokens of a modded-nanogpt shard (header checked) or a raw nanoGPT uint16 file."""
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=MODDED_HEADER_INTS) if size >= 1024 else np.zeros(0)
    if header.size and header[0] == MODDED_MAGIC:
        if header[1] != 1:
            raise ShardError(f"{path}: modded-nanogpt shard version {header[1]}, only version 1 is known")
        n = int(header[2])
        if size != 1024 + 2 * n:
            raise ShardError(f"{path}: header promises {n} tokens ({1024 + 2 * n} bytes) but the file has {size}; truncated")
        return np.memmap(path, dtype="<u2", mode="r", offset=1024, shape=(n,))
    if size % 2:
        raise ShardError(f"{path}: odd byte count {size}; not a uint16 nanoGPT .bin file")
    return np.memmap(path, dtype="<u2", mode="r")


def import_bins(files: list[Path], out: Path, split_of: dict[Path, str], tokenizer: str = "gpt2") -> None:
    tok = get_tokenizer(tokenizer)
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "text", "imported_from": "nanogpt-bin", "eot_prepended": True})
    with builder.lock():
        begin_dataset(builder, files, append=False)
        unit_ids = []
        for i, path in enumerate(files):
            tokens = read_bin(path)
            if tokens.size and int(tokens.max()) >= tok.vocab_size:
                raise ShardError(f"{path}: token id {int(tokens.max())} >= {tok.name} vocab size {tok.vocab_size}; pass the right --tokenizer")
            cuts = np.flatnonzero(tokens == tok.eot_id)
            if cuts.size == 0 or cuts[0] != 0:
                cuts = np.concatenate([[0], cuts])
            docs = np.split(np.asarray(tokens), cuts[1:])
            uid = f"{i:05d}-bin"
            builder.write_unit(uid, {split_of[path]: docs}, source=str(path))
            unit_ids.append(uid)
        builder.finalize(unit_ids)
