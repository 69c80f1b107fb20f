"""A dataset is a folder: token shards + `manifest.json`.

    DIR/
      manifest.json          written last, atomically: the dataset is complete iff it exists
      train/<unit>.bin       shards (format.py), one per prep unit and split
      train/<unit>.idx.npy   uint64 start offset of every document in that shard
      val/...
      .units/<unit>.json     one record per finished prep unit (resumability)
      .inputs/<sha>.json     the input files' identities, named by the manifest (written before it)
      .lock                  held (flock) by the one prep writing the folder

Prep pipelines cut their input into deterministic *units* (a file, a byte range of a big one,
or many small files packed together) and write each unit's shards in one go through
`DatasetBuilder.write_unit`; a rerun skips the units whose record exists, so an interrupted
prep resumed gives the same shards as an uninterrupted one. `finalize` writes the manifest from
the records of the planned units.

One writer at a time: a prep holds `DatasetBuilder.lock()` (an flock on DIR/.lock, released
when the process ends, however it ends) from start to manifest, and removes temporary files
left by a writer that was killed. `begin` guards the finished dataset already in the folder:
the manifest records its settings and names the list of its inputs (file identities); a prep
of the same inputs and settings resumes, one of other inputs is refused unless it appends
(`--append`: inputs already in the dataset are left out, the new ones are added after the
earlier shards), and one of other settings is always refused. A rerun of the same inputs that
cuts them into other units (a dataset grown by appends, prepped again in one go) removes the
units the new manifest no longer lists: they hold the same documents. `validate_dataset`
reports shards no manifest lists (orphans). Manifest keys of `extra` ending in `_dir` name
folders of per-unit artifacts (`<unit>.*`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amtrain.errors import ShardError, UserError
from amtrain.fileio import is_temp_name, make_dirs, write_bytes_atomic, write_errors
from amtrain.store.format import open_shard, read_header, write_shard

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "amtrain-dataset"
MANIFEST_VERSION = 1
LOCK = ".lock"


@dataclass
class ShardRecord:
    file: str  # relative to the dataset folder
    split: str
    num_tokens: int
    num_docs: int
    crc32: int
    source: str = ""

    @property
    def index_file(self) -> str:
        return self.file[: -len(".bin")] + ".idx.npy"


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    special_ids: dict[str, int]
    shards: list[ShardRecord]
    tokenizer_params: dict = field(default_factory=dict)
    command: str = ""
    created: str = ""
    extra: dict = field(default_factory=dict)  # modality-specific facts (layout, codec, filters...)
    skipped: list[dict] = field(default_factory=list)
    inputs_file: str = ""  # the input list (read_inputs): kept out of the manifest, which every reader loads
    num_inputs: int = 0
    units: list[str] = field(default_factory=list)  # prep units, in shard order

    def settings(self) -> dict:
        """Everything a prep setting changes; a dataset holds one value of each."""
        return {"tokenizer": self.tokenizer, "tokenizer_params": self.tokenizer_params,
                "vocab_size": self.vocab_size, "special_ids": self.special_ids, **self.extra}

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.shards:
            d = out.setdefault(s.split, {"shards": 0, "tokens": 0, "docs": 0})
            d["shards"] += 1
            d["tokens"] += s.num_tokens
            d["docs"] += s.num_docs
        return out

    def to_json(self) -> str:
        d = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "tokenizer": self.tokenizer,
             "tokenizer_params": self.tokenizer_params, "vocab_size": self.vocab_size,
             "special_ids": self.special_ids, "splits": self.splits,
             "shards": [s.__dict__ for s in self.shards], "command": self.command,
             "created": self.created, "extra": self.extra, "skipped": self.skipped,
             "inputs_file": self.inputs_file, "num_inputs": self.num_inputs, "units": self.units}
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise ShardError(f"{folder}: no {MANIFEST}; the folder is not a finished dataset, run `amtrain prep-text` (or prep-midi/prep-audio) into it")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: not valid JSON ({e}); re-run prep") from None
        if d.get("format") != MANIFEST_FORMAT or d.get("version") != MANIFEST_VERSION:
            raise ShardError(f"{path}: not an amtrain dataset manifest version {MANIFEST_VERSION}; re-run prep")
        try:
            return cls(tokenizer=d["tokenizer"], vocab_size=d["vocab_size"], special_ids=d["special_ids"],
                       shards=[ShardRecord(**s) for s in d["shards"]],
                       tokenizer_params=d.get("tokenizer_params", {}), command=d.get("command", ""),
                       created=d.get("created", ""), extra=d.get("extra", {}), skipped=d.get("skipped", []),
                       inputs_file=d.get("inputs_file", ""), num_inputs=d.get("num_inputs", 0),
                       units=d.get("units", []))
        except (KeyError, TypeError) as e:
            raise ShardError(f"{path}: malformed manifest ({e}); re-run prep") from None


class Dataset:
    """Read side: a manifest checked against its shards' headers (cheap, on open)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        for s in self.manifest.shards:
            h = read_header(self.folder / s.file)
            if h.vocab_size != self.manifest.vocab_size:
                raise ShardError(f"{self.folder / s.file}: header vocab size {h.vocab_size} contradicts manifest vocab size {self.manifest.vocab_size}; re-run prep")
            if h.num_tokens != s.num_tokens:
                raise ShardError(f"{self.folder / s.file}: holds {h.num_tokens} tokens but {MANIFEST} says {s.num_tokens}; the manifest does not match its shards, re-run prep")

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def shards(self, split: str) -> list[ShardRecord]:
        return [s for s in self.manifest.shards if s.split == split]

    def require_split(self, split: str) -> list[ShardRecord]:
        shards = self.shards(split)
        if not shards:
            have = ", ".join(sorted(self.manifest.splits)) or "none"
            raise ShardError(f"{self.folder}: no '{split}' split (has: {have}); re-run prep with a {split} fraction")
        return shards

    def tokens(self, split: str) -> list[np.ndarray]:
        """One read-only memmap per shard of the split, in manifest order."""
        return [open_shard(self.folder / s.file) for s in self.require_split(split)]

    def doc_starts(self, record: ShardRecord) -> np.ndarray:
        path = self.folder / record.index_file
        try:
            starts = np.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise ShardError(f"{path}: document index unreadable ({e}); re-run prep") from None
        if starts.size != record.num_docs:
            raise ShardError(f"{path}: {starts.size} documents but {MANIFEST} says {record.num_docs}; re-run prep")
        return starts

    def documents(self, split: str):
        """Yield every document of a split as an array view, in order."""
        for rec in self.require_split(split):
            toks = open_shard(self.folder / rec.file)
            bounds = np.append(self.doc_starts(rec).astype(np.int64), toks.size).tolist()
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                yield toks[a:b]


def concat_docs(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents; return (tokens, start offsets)."""
    lengths = np.fromiter((d.size for d in docs), dtype=np.uint64, count=len(docs))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64) if docs else np.zeros(0, np.uint64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, np.uint32)
    return tokens, starts


class DatasetBuilder:
    """Write side: one writer (lock), resumable unit by unit; the manifest last."""

    def __init__(self, folder: str | Path, tokenizer: str, vocab_size: int, special_ids: dict[str, int],
                 tokenizer_params: dict | None = None, extra: dict | None = None):
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.tokenizer_params = tokenizer_params or {}
        self.vocab_size = vocab_size
        self.special_ids = special_ids
        self.extra = extra or {}
        self._inputs: list[dict] = []  # this run's inputs (set by `begin`)
        self._base: Manifest | None = None  # the dataset appended to
        self._base_inputs: list[dict] = []
        self._redone: Manifest | None = None  # the dataset of the same inputs this run makes again
        make_dirs(self.folder / ".units")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the folder for this prep (see `dataset_lock`)."""
        return dataset_lock(self.folder)

    def begin(self, inputs: list[dict], append: bool = False) -> set[str]:
        """Check this prep against the finished dataset in the folder, if any; return the ids of
        the inputs already in it (to leave out when appending; empty otherwise). `inputs`:
        {"file", "id"} per input file. Raises UserError for other settings, or for other
        inputs without `append`."""
        self._inputs = inputs
        if not (self.folder / MANIFEST).is_file():
            return set()
        old = Manifest.load(self.folder)
        _check_settings(self.folder, old.settings(), self._settings())
        old_inputs = read_inputs(self.folder, old)
        old_ids = {i["id"] for i in old_inputs}
        if not append:
            if old_ids != {i["id"] for i in inputs}:
                raise UserError(f"{self.folder}: holds a dataset made from other inputs ({_differences(old_inputs, inputs)}); "
                                "pass --append to add this run's new and changed inputs to it, or prep into a new --out folder")
            self._redone = old
            return set()
        self._base, self._base_inputs = old, old_inputs
        return old_ids & {i["id"] for i in inputs}

    def _settings(self) -> dict:
        return json.loads(json.dumps(Manifest(self.tokenizer, self.vocab_size, self.special_ids, [],
                                              self.tokenizer_params, extra=self.extra).settings()))

    def _record_path(self, unit_id: str) -> Path:
        return self.folder / ".units" / f"{unit_id}.json"

    def _load_record(self, unit_id: str) -> dict | None:
        path = self._record_path(unit_id)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
            if rec["vocab_size"] != self.vocab_size or rec["tokenizer"] != self.tokenizer:
                return None  # made with another tokenizer: redo
            rec["shards"] = [ShardRecord(**s) for s in rec["shards"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        return rec if all((self.folder / s.file).is_file() for s in rec["shards"]) else None

    def load_unit(self, unit_id: str) -> list[ShardRecord] | None:
        """The unit's shard records if it finished (record and shards present), else None."""
        rec = self._load_record(unit_id)
        return None if rec is None else rec["shards"]

    def unit_skipped(self, unit_id: str) -> list[dict]:
        """What a finished unit skipped or warned about (SkipReport items), for the manifest of a
        resumed run."""
        rec = self._load_record(unit_id)
        return [] if rec is None else rec.get("skipped", [])

    def write_unit(self, unit_id: str, docs_by_split: dict[str, list[np.ndarray]], source: str = "",
                   max_shard_tokens: int = 1 << 28, skipped: list[dict] | None = None) -> list[ShardRecord]:
        """Write one unit's documents as shards (one per split, more if over max_shard_tokens),
        then the unit's record (with `skipped`: what the unit left out, by name). Documents
        never straddle shards."""
        records = []
        for split, docs in sorted(docs_by_split.items()):
            for part, group in enumerate(_group_docs(docs, max_shard_tokens)):
                name = f"{split}/{unit_id}" + (f"-{part}" if part else "")
                tokens, starts = concat_docs(group)
                header = write_shard(self.folder / f"{name}.bin", tokens, self.vocab_size)
                rec = ShardRecord(f"{name}.bin", split, int(tokens.size), len(group), header.crc32, source)
                _save_npy_atomic(self.folder / rec.index_file, starts)
                records.append(rec)
        body = {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "source": source,
                "shards": [r.__dict__ for r in records], "skipped": skipped or []}
        write_bytes_atomic(self._record_path(unit_id), json.dumps(body).encode())
        return records

    def finalize(self, unit_ids: list[str], skipped: list[dict] | None = None, command: str | None = None) -> Manifest:
        """Write the manifest of the units (after the appended-to dataset's, if `begin` appended)."""
        shards = []
        for uid in unit_ids:
            recs = self.load_unit(uid)
            assert recs is not None, f"unit {uid} not finished before finalize"
            shards.extend(recs)
        command = command if command is not None else _invocation()
        inputs, skipped = self._inputs, skipped or []
        base = self._base
        if base is not None:
            if not unit_ids and not skipped:
                return base  # nothing new: the dataset stays as it is
            known = {i["id"] for i in self._base_inputs}
            shards, unit_ids = base.shards + shards, base.units + unit_ids
            inputs = self._base_inputs + [i for i in inputs if i["id"] not in known]
            skipped, command = base.skipped + skipped, f"{base.command} && {command}"
        manifest = Manifest(self.tokenizer, self.vocab_size, self.special_ids, shards,
                            tokenizer_params=self.tokenizer_params, command=command,
                            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extra=self.extra,
                            skipped=skipped, inputs_file=self._write_inputs(inputs), num_inputs=len(inputs),
                            units=list(unit_ids))
        write_bytes_atomic(self.folder / MANIFEST, manifest.to_json().encode())
        for stale in (self.folder / ".inputs").glob("*.json"):  # lists no manifest names any more
            if stale.relative_to(self.folder).as_posix() != manifest.inputs_file:
                stale.unlink()
        if self._redone is not None:
            self._remove_replaced(self._redone, manifest)
        return manifest

    def _remove_replaced(self, old: Manifest, new: Manifest) -> None:
        """Delete the shards, records and artifacts of `old`'s units that `new` (made from the same
        inputs and settings, written already) no longer lists: their documents are in `new`."""
        kept = {s.file for s in new.shards}
        for rec in old.shards:
            if rec.file not in kept:
                (self.folder / rec.file).unlink(missing_ok=True)
                (self.folder / rec.index_file).unlink(missing_ok=True)
        dirs = [self.folder / v for k, v in self.extra.items() if k.endswith("_dir")]
        for uid in set(old.units) - set(new.units):
            self._record_path(uid).unlink(missing_ok=True)
            for d in dirs:
                for artifact in d.glob(f"{uid}.*"):
                    artifact.unlink()

    def _write_inputs(self, inputs: list[dict]) -> str:
        """The input list as `.inputs/<sha256>.json`: named by content, so the manifest that names
        it always names the list it was written with."""
        body = json.dumps(inputs).encode()
        name = f".inputs/{hashlib.sha256(body).hexdigest()[:16]}.json"
        write_bytes_atomic(self.folder / name, body)
        return name


def read_inputs(folder: Path, manifest: Manifest) -> list[dict]:
    """{"file", "id"} of every input file of the dataset, in order ([] if it records none)."""
    if not manifest.inputs_file:
        return []
    path = folder / manifest.inputs_file
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: the dataset's input list is unreadable ({e}); prep into a new --out folder") from None


def _differences(old: list[dict], new: list[dict]) -> str:
    """How this run's inputs differ from a dataset's, in words, with an example file of each kind."""
    if not old:
        return "it records no inputs (made by an older amtrain)"
    old_ids, new_ids = {i["id"] for i in old}, {i["id"] for i in new}
    old_files, new_files = {i["file"] for i in old}, {i["file"] for i in new}
    changed = [i["file"] for i in old if i["id"] not in new_ids and i["file"] in new_files]
    missing = [i["file"] for i in old if i["id"] not in new_ids and i["file"] not in new_files]
    added = [i["file"] for i in new if i["id"] not in old_ids and i["file"] not in old_files]
    parts = [f"{len(files)} {what}, e.g. {files[0]}" for files, what in
             ((changed, "input file(s) changed since"), (missing, "of its input files not in this run"),
              (added, "input file(s) new to it")) if files]
    return "; ".join(parts)


def _check_settings(folder: Path, old: dict, new: dict) -> None:
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            raise UserError(f"{folder}: holds a dataset made with {key}={old.get(key)!r}, this run asks "
                            f"{key}={new.get(key)!r}; a dataset has one set of settings: prep into a new --out folder "
                            "(or use the same settings)")


@contextlib.contextmanager
def dataset_lock(folder: str | Path) -> Iterator[None]:
    """Hold DIR/.lock (flock, exclusive, not waiting) while a prep writes the folder; a second
    writer gets one UserError line. The kernel releases the lock when the holder exits, even
    killed. Once held, temporary files left by a killed writer are removed."""
    folder = make_dirs(folder)
    path = folder / LOCK
    with write_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{folder}: another prep ({holder}) is writing this dataset; wait for it to finish "
                            f"(its lock {path} is released when it ends) or prep into another --out folder") from None
        with write_errors(path):  # unbuffered: a full disk fails here, not later in a close
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        _remove_temp_files(folder)
        yield
    finally:
        os.close(fd)


def _remove_temp_files(folder: Path) -> None:
    for p in folder.rglob(".*"):
        if is_temp_name(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _invocation() -> str:
    argv0 = Path(sys.argv[0]).name
    prog = "amtrain" if argv0 in ("amtrain", "__main__.py") else sys.argv[0]
    return shlex.join([prog, *sys.argv[1:]])


def _group_docs(docs: list[np.ndarray], max_tokens: int):
    group: list[np.ndarray] = []
    n = 0
    for d in docs:
        if group and n + d.size > max_tokens:
            yield group
            group, n = [], 0
        group.append(d)
        n += d.size
    if group:
        yield group


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes_atomic(path, buf.getvalue())


def validate_dataset(folder: str | Path) -> list[str]:
    """Full scan: manifest vs shards, every shard's header, checksum and ids, document indexes."""
    from amtrain.store.format import validate_shard

    folder = Path(folder)
    try:
        manifest = Manifest.load(folder)
    except ShardError as e:
        return [str(e)]
    problems = []
    for rec in manifest.shards:
        path = folder / rec.file
        found = validate_shard(path, manifest.vocab_size)
        problems += found
        if found:
            continue
        h = read_header(path)
        if h.num_tokens != rec.num_tokens:
            problems.append(f"{path}: holds {h.num_tokens} tokens but {MANIFEST} says {rec.num_tokens}")
        if h.crc32 != rec.crc32:
            problems.append(f"{path}: checksum {h.crc32:#010x} differs from {MANIFEST}'s {rec.crc32:#010x}; the shard was replaced")
        try:
            starts = np.load(folder / rec.index_file)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{folder / rec.index_file}: document index unreadable ({e})")
            continue
        if starts.size != rec.num_docs:
            problems.append(f"{folder / rec.index_file}: {starts.size} documents, {MANIFEST} says {rec.num_docs}")
        elif starts.size and (starts[0] != 0 or np.any(np.diff(starts.astype(np.int64)) <= 0) or starts[-1] >= h.num_tokens):
            problems.append(f"{folder / rec.index_file}: document offsets are not increasing within the shard")
    return problems + _strays(folder, manifest)


def _strays(folder: Path, manifest: Manifest) -> list[str]:
    """Files the manifest does not account for: orphaned shards and per-unit artifacts (left by a
    prep of other inputs into the same folder, or by one that stopped), and temporary files."""
    listed = {folder / s.file for s in manifest.shards} | {folder / s.index_file for s in manifest.shards}
    artifact_dirs = {folder / v for k, v in manifest.extra.items() if k.endswith("_dir")}
    problems = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or (rel.parts[0].startswith(".") and not is_temp_name(p.name)):
            continue
        if is_temp_name(p.name):
            problems.append(f"{p}: temporary file left by an interrupted write; delete it (the next prep into {folder} does)")
        elif p.name.endswith((".bin", ".idx.npy")) and p not in listed:
            problems.append(f"{p}: orphaned shard, not in {MANIFEST} (left by a prep of other inputs into this folder, or one "
                            "that stopped); delete it, or prep its inputs again with --append")
        elif p.parent in artifact_dirs and manifest.units and p.stem not in manifest.units:
            problems.append(f"{p}: orphaned artifact of a unit not in {MANIFEST}; delete it, or prep its input again with --append")
    return problems
