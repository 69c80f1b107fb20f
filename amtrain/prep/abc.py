"""MIDI files -> ABC-notation token shards (`amtrain prep-midi --encoding abc`), after the
symbolic-music scaling-laws seed: MIDI -> ABC -> tokens, vocabulary from the corpus
(`--min-freq`), documents filtered by `--min-length` / `--max-length`, split 98/1/1.

1. per file, over a process pool: read, MD5 (-> split), MIDI -> ABC tunes as (symbol,
   argument) units (`amtrain.midi.abc`: a piece longer than --max-length ids is cut at bar
   lines into tunes of at most that many, each with the header). Unreadable, empty or odd
   files (no notes, more than 16 instruments, a bar longer than --max-length) are reported by
   name and skipped; the batch goes on.
2. the vocabulary: every symbol and argument seen at least --min-freq times in the train
   split's tunes (all tunes when train is empty), most frequent first; the rest is <UNK>. It
   is saved in the manifest (tokenizer params) and as `vocab.json` beside it.
3. documents: <START> units <END>; those under --min-length ids are dropped and counted.

Splits: the file's MD5 as a fraction in [0, 1) against the split shares (`--split 98/1/1`,
or `--split ratio` with --val-fraction / --test-fraction); every tune of a file goes to its
file's split. The vocabulary depends on the whole corpus, so `--append` is refused; a rerun of
the same inputs and settings reads each converted file back from `OUT/.abc_units/` (one JSON
entry per file, written as it is converted: an interrupted prep resumes) and rewrites only the
shard units whose vocabulary or files changed. Phase 2 holds FILES_PER_UNIT files' tunes in
memory at a time, phase 1 one file's per worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import make_dirs, short_hash, source_id, write_bytes_atomic
from amtrain.midi.abc import AbcError, grid_piece, piece_tunes, read_score
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, process_pool, progress
from amtrain.store import DatasetBuilder
from amtrain.store.dataset import dataset_lock
from amtrain.tokens.abc import AbcTokenizer

SUFFIXES = (".mid", ".midi")
SPLITS = ("train", "val", "test")
CACHE = ".abc_units"
FILES_PER_UNIT = 512
"""Files per shard unit of phase 2 (their tunes are held in memory together)."""


@dataclass(frozen=True)
class AbcPrepConfig:
    split: str = "98/1/1"
    """train/val/test shares (`98/1/1`, the seed's), or `ratio` for --val/--test-fraction."""
    val_fraction: float | None = None
    test_fraction: float | None = None
    min_freq: int = 2
    """Keep symbols and arguments seen at least this often (the seed's default, 2)."""
    min_length: int = 10
    """Drop documents of fewer ids (the seed's default, 10)."""
    max_length: int = 5000
    """Most ids a document holds (the seed's default, 5000); longer pieces are cut at bar lines."""
    seed: int = 0
    """Unused by abc (no augmentation); accepted for the command's uniformity."""

    def __post_init__(self):
        if self.min_freq < 1:
            raise UserError(f"--min-freq {self.min_freq}: must be >= 1")
        if self.min_length < 3 or self.max_length < max(self.min_length, 64):
            raise UserError(f"--min-length {self.min_length} / --max-length {self.max_length}: need 3 <= min-length "
                            "<= max-length and max-length >= 64 (a tune header and a bar)")
        self.shares()

    def shares(self) -> tuple[float, float]:
        """(val, test) shares of files."""
        if self.split == "ratio":
            val = 0.01 if self.val_fraction is None else self.val_fraction
            test = 0.01 if self.test_fraction is None else self.test_fraction
        else:
            if self.val_fraction is not None or self.test_fraction is not None:
                raise UserError("--val-fraction / --test-fraction go with --split ratio; or give --split TRAIN/VAL/TEST")
            try:
                parts = [float(x) for x in self.split.split("/")]
            except ValueError:
                parts = []
            if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
                raise UserError(f"--split {self.split!r}: give train/val/test shares such as 98/1/1, or 'ratio'")
            val, test = parts[1] / sum(parts), parts[2] / sum(parts)
        if not (0 <= val and 0 <= test and val + test < 1):
            raise UserError("--split: the val and test shares must leave some files for train")
        return val, test


def file_split(md5: str, val: float, test: float) -> str:
    u = int(md5, 16) / 2.0**128
    return "val" if u < val else "test" if u < val + test else "train"


@dataclass
class FileResult:
    """Phase 1's answer for one file (its tunes stay in the cache entry, not in memory)."""

    uid: str
    path: str
    split: str = ""
    error: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    """Symbol and argument counts of its tunes (the vocabulary's input)."""
    num_tunes: int = 0
    num_notes: int = 0
    seconds: float = 0.0


def convert_file(task: tuple[str, str, str, int, float, float]) -> FileResult:
    """Phase 1 for one file (runs in a worker): convert, count, and cache the tunes as JSON in
    `OUT/.abc_units/<uid>.json` (a rerun of the same file and settings reads them back)."""
    uid, path, cache_dir, max_length, val, test = task
    cache = Path(cache_dir) / f"{uid}.json"
    cached = _load_cache(cache, uid, path)
    if cached is not None:
        return cached
    res = FileResult(uid, path)
    tunes: list[list[tuple[str, str]]] = []
    try:
        data = Path(path).read_bytes()
        res.split = file_split(hashlib.md5(data).hexdigest(), val, test)
        score = read_score(data)
        res.seconds = float(score.to("second").end())
        piece = grid_piece(score)
        tunes = piece_tunes(piece, max_length)
        res.num_notes = sum(len(v.on) for v in piece.voices)
    except OSError as e:
        res.error = f"unreadable ({e.strerror})"
        return res  # not cached: the file may be readable next time
    except AbcError as e:
        res.error = str(e)
    res.counts = dict(Counter(t for tune in tunes for pair in tune for t in pair))
    res.num_tunes = len(tunes)
    body = {"split": res.split, "error": res.error, "num_notes": res.num_notes, "seconds": res.seconds,
            "counts": res.counts, "tunes": [[t for pair in tune for t in pair] for tune in tunes]}
    write_bytes_atomic(cache, json.dumps(body).encode(), fsync=False)  # torn: fails to load, redone
    return res


def _load_cache(cache: Path, uid: str, path: str) -> FileResult | None:
    if not cache.is_file():
        return None
    try:
        body = json.loads(cache.read_text())
        return FileResult(uid, path, body["split"], body["error"], body["counts"], len(body["tunes"]),
                          body["num_notes"], body["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_tunes(cache_dir: Path, uid: str) -> list[list[tuple[str, str]]]:
    flat = json.loads((cache_dir / f"{uid}.json").read_text())["tunes"]
    return [list(zip(t[0::2], t[1::2], strict=True)) for t in flat]


@dataclass
class AbcPrepSummary:
    num_files: int
    num_corrupt: int
    num_tunes: dict[str, int]
    num_tokens: dict[str, int]
    num_short: int
    vocab_size: int
    num_unk: int
    num_notes: int
    seconds_of_music: float
    seconds_convert: float
    seconds_total: float
    out: Path

    @property
    def files_per_s(self) -> float:
        return self.num_files / max(self.seconds_convert, 1e-9)

    @property
    def tokens_per_second_of_music(self) -> float:
        return sum(self.num_tokens.values()) / max(self.seconds_of_music, 1e-9)


def convert_all(files: list[Path], cache_dir: Path, cfg: AbcPrepConfig, workers: int,
                show_progress: bool) -> list[FileResult]:
    val, test = cfg.shares()
    salt = f"abc-v1|{cfg.max_length}|{val}|{test}"
    tasks = [(f"{i:06d}-{source_id(p, salt)}", str(p), str(cache_dir), cfg.max_length, val, test)
             for i, p in enumerate(files)]
    results: list[FileResult] = []
    with progress() as bar:
        task = bar.add_task("prep-midi abc", total=len(tasks), visible=show_progress)
        if workers > 1 and len(tasks) > 1:
            with process_pool(max_workers=workers) as pool:
                for r in pool.map(convert_file, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))):
                    results.append(r)
                    bar.advance(task)
        else:
            for t in tasks:
                results.append(convert_file(t))
                bar.advance(task)
    return results


def prep_abc(inputs: list[str], out: str | Path, options: dict[str, Any], *, workers: int = 1,
             append: bool = False, show_progress: bool = True):
    """The `EncodingPrep` of `--encoding abc` (amtrain.prep.encodings)."""
    from amtrain.prep.encodings import PrepReport

    s = prep_abc_files(inputs, out, AbcPrepConfig(**options), workers=workers, append=append,
                       show_progress=show_progress)
    tr, va, te = (s.num_tunes[k] for k in SPLITS)
    lines = [
        f"{out}: {s.num_files} files ({s.num_corrupt} skipped); ABC tunes train/val/test {tr}/{va}/{te} "
        f"({sum(s.num_tokens.values()):,} ids); {s.num_short} tunes under --min-length dropped",
        f"vocabulary {s.vocab_size} ids (5 specials); {s.num_unk:,} <UNK>; {s.num_notes:,} notes, "
        f"{s.seconds_of_music:,.0f} s of music, {s.tokens_per_second_of_music:.1f} ids per second of music; "
        f"convert {s.files_per_s:.1f} files/s; total {s.seconds_total:.2f} s",
    ]
    return PrepReport(out=Path(out), lines=lines, num_corrupt=s.num_corrupt, summary=s, skipped=[])


def prep_abc_files(inputs: list[str], out: str | Path, cfg: AbcPrepConfig | None = None, workers: int = 1,
                   append: bool = False, show_progress: bool = True) -> AbcPrepSummary:
    cfg = cfg or AbcPrepConfig()
    if append:
        raise UserError("--append: an abc dataset's vocabulary comes from its whole corpus; prep all the inputs "
                        "again into --out (a folder of the same inputs and settings is redone in place)")
    t_start = time.perf_counter()
    files = expand_inputs(inputs, SUFFIXES)
    make_dirs(Path(out))
    with dataset_lock(out):
        return _prep(files, Path(out), cfg, workers, show_progress, t_start)


def _prep(files: list[Path], out: Path, cfg: AbcPrepConfig, workers: int, show_progress: bool,
          t_start: float) -> AbcPrepSummary:
    cache_dir = make_dirs(out / CACHE)
    t0 = time.perf_counter()
    results = convert_all(files, cache_dir, cfg, workers, show_progress)
    seconds_convert = time.perf_counter() - t0
    skips = SkipReport()
    for r in results:
        if r.error:
            skips.add(r.path, r.error)
    ok = [r for r in results if not r.error]
    counts: Counter[str] = Counter()
    for r in [r for r in ok if r.split == "train"] or ok:  # no train files: the whole corpus
        counts.update(r.counts)
    tok = AbcTokenizer.from_counts(counts, cfg.min_freq)
    val, test = cfg.shares()
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "abc", "split": cfg.split, "val_fraction": val, "test_fraction": test,
                                    "min_freq": cfg.min_freq, "min_length": cfg.min_length,
                                    "max_length": cfg.max_length})
    num_tunes = dict.fromkeys(SPLITS, 0)
    num_tokens = dict.fromkeys(SPLITS, 0)
    short = unk = 0
    unit_ids: list[str] = []
    vocab_hash = short_hash(json.dumps(tok.tokens), 8)
    begin_dataset(builder, files, append=False)  # under dataset_lock (prep_abc_files)
    for g in range(0, len(ok), FILES_PER_UNIT):
        group = ok[g:g + FILES_PER_UNIT]
        docs: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
        for r in group:
            for tune in cached_tunes(cache_dir, r.uid):
                ids = tok.encode_pairs(tune)
                if ids.size < cfg.min_length:
                    short += 1
                    continue
                unk += int((ids == tok.unk_id).sum())
                docs[r.split].append(ids.astype(np.uint16 if tok.vocab_size < 1 << 16 else np.uint32))
        for k in SPLITS:
            num_tunes[k] += len(docs[k])
            num_tokens[k] += int(sum(d.size for d in docs[k]))
        uid = f"abc-{g // FILES_PER_UNIT:05d}-" + short_hash(f"{vocab_hash}|{cfg.min_length}|" +
                                                             "|".join(r.uid for r in group), 12)
        if builder.load_unit(uid) is None:
            builder.write_unit(uid, {k: v for k, v in docs.items() if v}, source=f"{len(group)} MIDI files")
        unit_ids.append(uid)
    write_bytes_atomic(Path(out) / "vocab.json", json.dumps({"tokens": tok.tokens}, indent=1).encode())
    builder.finalize(unit_ids, skipped=skips.items)
    return AbcPrepSummary(len(files), skips.num_errors, num_tunes, num_tokens, short, tok.vocab_size, unk,
                          sum(r.num_notes for r in ok), sum(r.seconds for r in ok), seconds_convert,
                          time.perf_counter() - t_start, Path(out))
