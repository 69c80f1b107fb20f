"""Text corpora (.txt, .jsonl) -> token shards (`amtrain prep-text`).

Documents:
  .txt   `--txt-docs paragraph` (default): blank-line separated; `line`: one per line;
         `file`: the whole file; `sep:MARK`: separated by lines that hold only MARK (fortune
         files: `sep:%`).
  .jsonl one JSON object per line; the document is its `--text-field` (default "text").
Every document is preceded by the end-of-text id (as modded-nanogpt's fineweb.py does), and
goes to train or val by a hash of its UTF-8 bytes, so the split is deterministic and does not
depend on file order or on how the corpus is cut into units.

Units of about `unit_bytes` each become their own shards: a big file is cut into units at
document boundaries, and consecutive small files are packed together into one unit, so a
corpus of many small files gives as few shards (and as many training windows, which never
straddle shards) as one big file of the same documents. Units already finished are skipped,
so a rerun resumes (and is idempotent). Encoding runs tiktoken's BPE (`encode_to_numpy`, one
uint32 buffer per document) on a thread pool over all cores.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import short_hash, source_id
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, progress
from amtrain.store import DatasetBuilder
from amtrain.store.format import dtype_for_vocab
from amtrain.tokens import get_tokenizer

SUFFIXES = (".txt", ".jsonl")
DOC_MODES = ("paragraph", "line", "file")
_SEPARATORS = {"paragraph": b"\n\n", "line": b"\n"}


def check_doc_mode(mode: str) -> str:
    if mode in DOC_MODES or (mode.startswith("sep:") and mode[4:].strip() and "\n" not in mode):
        return mode
    raise UserError(f"--txt-docs {mode!r}: choose one of {', '.join(DOC_MODES)}, or sep:MARK for documents "
                    "separated by lines holding only MARK (e.g. sep:% for fortune files)")


def separator(mode: str) -> bytes | None:
    """The bytes between two documents (where a big file may be cut), None for whole files."""
    if mode.startswith("sep:"):
        return f"\n{mode[4:]}\n".encode()
    return _SEPARATORS.get(mode)
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Piece:
    """A file, or a byte range of a big one."""

    path: Path
    start: int  # nominal byte range; real boundaries move forward to the next separator
    end: int
    sep: bytes | None


@dataclass(frozen=True)
class Unit:
    id: str
    pieces: tuple[Piece, ...]  # one range of a big file, or whole small files packed together

    @property
    def source(self) -> str:
        first = self.pieces[0]
        more = f" and {len(self.pieces) - 1} more file(s)" if len(self.pieces) > 1 else ""
        return f"{first.path}:{first.start}{more}"


@dataclass
class PrepSummary:
    docs: dict[str, int]
    tokens: dict[str, int]
    bytes_read: int
    seconds: float
    units_done: int
    units_skipped_finished: int
    skipped: list[dict]
    out: Path


def plan_units(files: list[Path], txt_docs: str, unit_bytes: int, salt: str) -> list[Unit]:
    """Files bigger than `unit_bytes` (and cuttable: not --txt-docs file) are cut into ranges of
    about `unit_bytes`, each a unit; runs of smaller files are packed into units of up to
    `unit_bytes`. A unit's id hashes its pieces' source ids, ranges and the settings."""
    units: list[Unit] = []
    pack: list[Piece] = []
    packed = 0

    def emit(pieces: list[Piece]) -> None:
        key = "|".join(f"{source_id(p.path, salt)}:{p.start}:{p.end}" for p in pieces)
        units.append(Unit(f"{len(units):05d}-{short_hash(key)}", tuple(pieces)))

    for path in files:
        size = path.stat().st_size
        sep = separator("line" if path.suffix.lower() == ".jsonl" else txt_docs)
        if size > unit_bytes and sep:
            if pack:
                emit(pack)
                pack, packed = [], 0
            num = -(-size // unit_bytes)
            for k in range(num):
                emit([Piece(path, k * unit_bytes, (k + 1) * unit_bytes if k + 1 < num else size, sep)])
            continue
        if pack and packed + size > unit_bytes:
            emit(pack)
            pack, packed = [], 0
        pack.append(Piece(path, 0, size, sep))
        packed += size
    if pack:
        emit(pack)
    return units


def read_piece(piece: Piece) -> bytes:
    """The piece's bytes: from the first separator at/after `start` (0 for a file's first piece)
    up to and including the first separator at/after `end`, so no document is cut."""
    with open(piece.path, "rb") as f:
        begin = 0 if piece.start == 0 or piece.sep is None else _next_boundary(f, piece.start, piece.sep)
        stop = _next_boundary(f, piece.end, piece.sep) if piece.sep else None
        f.seek(begin)
        return f.read() if stop is None else f.read(max(0, stop - begin))


def _next_boundary(f, pos: int, sep: bytes) -> int:
    """Offset just after the first `sep` that ends at or after `pos` (EOF if none)."""
    f.seek(max(0, pos - len(sep) + 1))
    base = f.tell()
    buf = b""
    while True:
        chunk = f.read(1 << 16)
        buf += chunk
        i = buf.find(sep)
        if i >= 0:
            return base + i + len(sep)
        if not chunk:
            return base + len(buf)
        keep = len(sep) - 1
        base += len(buf) - keep
        buf = buf[len(buf) - keep:] if keep else b""


def split_documents(raw: bytes, path: Path, mode: str, text_field: str, errors: str) -> tuple[list[str], int]:
    """-> (documents, number of bad jsonl records). Raises UnicodeDecodeError under errors='strict'."""
    text = raw.decode("utf-8", errors=errors)
    if path.suffix.lower() == ".jsonl":
        docs, bad = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                value = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            if isinstance(value, str) and value:
                docs.append(value)
            else:
                bad += 1
        return docs, bad
    if mode == "file":
        return ([text] if text.strip() else []), 0
    if mode.startswith("sep:"):
        mark = mode[4:].strip()
        parts = re.split(rf"(?m)^[ \t]*{re.escape(mark)}[ \t\r]*$", text)
        return [p.strip("\n") for p in parts if p.strip()], 0
    parts = _PARAGRAPH_SPLIT.split(text) if mode == "paragraph" else text.split("\n")
    return [p.strip("\n") for p in parts if p.strip()], 0


def is_val(doc: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def encode_docs(tok, docs: list[str], num_threads: int) -> list[np.ndarray]:
    """Each document as [EOT, *ids] in the smallest dtype that holds the vocabulary."""
    dtype = dtype_for_vocab(tok.vocab_size)
    if hasattr(tok, "encode_batch_numpy"):
        encoded = tok.encode_batch_numpy(docs, num_threads=num_threads)
    else:
        encoded = tok.encode_batch(docs, num_threads=num_threads)
    out = []
    for ids in encoded:
        a = np.empty(len(ids) + 1, dtype=dtype)
        a[0] = tok.eot_id
        a[1:] = ids
        out.append(a)
    return out


def prep_text(inputs: list[str], out: str | Path, tokenizer: str = "gpt2", txt_docs: str = "paragraph",
              text_field: str = "text", val_fraction: float = 0.05, errors: str = "replace",
              workers: int = 1, unit_bytes: int = 32 << 20, show_progress: bool = True,
              append: bool = False) -> PrepSummary:
    from amtrain.errors import UserError

    check_doc_mode(txt_docs)
    if errors not in ("replace", "strict"):
        raise UserError(f"--errors {errors!r}: choose 'replace' (U+FFFD for bad bytes) or 'strict' (skip the file)")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    tok = get_tokenizer(tokenizer)
    files = expand_inputs(inputs, SUFFIXES)
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "text", "txt_docs": txt_docs, "text_field": text_field,
                                    "val_fraction": val_fraction, "errors": errors, "unit_bytes": unit_bytes,
                                    "eot_prepended": True})
    with builder.lock():
        files = begin_dataset(builder, files, append)
        return _prep_units(files, builder, tok, txt_docs, text_field, val_fraction, errors, workers, unit_bytes,
                           show_progress, Path(out))


def _prep_units(files, builder, tok, txt_docs, text_field, val_fraction, errors, workers, unit_bytes,
                show_progress, out) -> PrepSummary:
    salt = f"{tok.name}|{txt_docs}|{text_field}|{val_fraction}|{errors}|{unit_bytes}"
    units = plan_units(files, txt_docs, unit_bytes, salt)
    skips = SkipReport()
    docs_n = {"train": 0, "val": 0}
    toks_n = {"train": 0, "val": 0}
    done_units, resumed, nbytes = [], 0, 0
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("prep-text", total=len(units), visible=show_progress)
        for unit in units:
            records = builder.load_unit(unit.id)
            earlier = builder.unit_skipped(unit.id) if records is not None else []
            if records is None or any(i["error"] for i in earlier):  # a unit that lost a file is retried
                records, read = _run_unit(unit, tok, builder, txt_docs, text_field, errors, val_fraction, workers, skips)
                nbytes += read
            else:
                skips.restore(earlier)
                resumed += 1
            bar.advance(task)
            done_units.append(unit.id)
            for r in records:
                docs_n[r.split] += r.num_docs
                toks_n[r.split] += r.num_tokens
    builder.finalize(done_units, skipped=skips.items)
    return PrepSummary(docs_n, toks_n, nbytes, time.perf_counter() - t0, len(done_units) - resumed,
                       resumed, skips.items, out)


def _read_docs(piece: Piece, txt_docs: str, text_field: str, errors: str, skips: SkipReport) -> tuple[list[str], int]:
    """-> (the piece's documents, bytes read); a file that cannot be used is reported by name."""
    try:
        raw = read_piece(piece)
    except FileNotFoundError:
        skips.add(piece.path, "file disappeared during the run")
        return [], 0
    except OSError as e:
        skips.add(piece.path, f"unreadable ({e.strerror})")
        return [], 0
    mode = "line" if piece.path.suffix.lower() == ".jsonl" else txt_docs
    try:
        docs, bad = split_documents(raw, piece.path, mode, text_field, errors)
    except UnicodeDecodeError as e:
        skips.add(piece.path, f"invalid UTF-8 at byte {piece.start + e.start}; to keep it, fix the file and rerun with --append, or prep with --errors replace into a new --out folder")
        return [], len(raw)
    if bad:
        skips.add(piece.path, f"{bad} jsonl records without a string {text_field!r} field (records skipped)", fatal=False)
    if not docs and piece.start == 0 and not raw.strip():
        skips.add(piece.path, "empty file", fatal=False)
    return docs, len(raw)


def _run_unit(unit, tok, builder, txt_docs, text_field, errors, val_fraction, workers, skips):
    """Read, split and encode every piece of the unit; write its shards and record."""
    first = len(skips.items)
    docs, nbytes = [], 0
    for piece in unit.pieces:
        got, read = _read_docs(piece, txt_docs, text_field, errors, skips)
        docs += got
        nbytes += read
    encoded = encode_docs(tok, docs, workers)
    by_split: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for doc, ids in zip(docs, encoded, strict=True):
        by_split["val" if is_val(doc, val_fraction) else "train"].append(ids)
    records = builder.write_unit(unit.id, by_split, source=unit.source, skipped=skips.items[first:])
    return records, nbytes
