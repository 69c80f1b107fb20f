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
file's split. The vocabulary depends on the whole corpus, so a rerun redoes all files and
`--append` is refused (prep the whole corpus again into the folder).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic
from amtrain.midi.abc import AbcError, grid_piece, piece_tunes, read_score
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, process_pool, progress
from amtrain.store import DatasetBuilder
from amtrain.tokens.abc import AbcTokenizer

SUFFIXES = (".mid", ".midi")
SPLITS = ("train", "val", "test")


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
    path: str
    split: str = ""
    error: str = ""
    tunes: list[list[tuple[str, str]]] = field(default_factory=list)
    num_notes: int = 0
    seconds: float = 0.0


def convert_file(task: tuple[str, int, float, float]) -> FileResult:
    """Phase 1 for one file (runs in a worker)."""
    path, max_length, val, test = task
    res = FileResult(path)
    try:
        data = Path(path).read_bytes()
        res.split = file_split(hashlib.md5(data).hexdigest(), val, test)
        score = read_score(data)
        res.seconds = float(score.to("second").end())
        piece = grid_piece(score)
        res.tunes = piece_tunes(piece, max_length)
        res.num_notes = sum(len(v.on) for v in piece.voices)
    except OSError as e:
        res.error = f"unreadable ({e.strerror})"
    except AbcError as e:
        res.error = str(e)
    return res


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


def convert_all(files: list[Path], cfg: AbcPrepConfig, workers: int, show_progress: bool) -> list[FileResult]:
    val, test = cfg.shares()
    tasks = [(str(p), cfg.max_length, val, test) for p in files]
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
    t0 = time.perf_counter()
    results = convert_all(files, cfg, workers, show_progress)
    seconds_convert = time.perf_counter() - t0
    skips = SkipReport()
    for r in results:
        if r.error:
            skips.add(r.path, r.error)
    ok = [r for r in results if not r.error]
    train_tunes = [t for r in ok if r.split == "train" for t in r.tunes]
    tok = AbcTokenizer.build(train_tunes or [t for r in ok for t in r.tunes], cfg.min_freq)
    docs: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
    short = unk = 0
    for r in ok:
        for tune in r.tunes:
            ids = tok.encode_pairs(tune)
            if ids.size < cfg.min_length:
                short += 1
                continue
            unk += int((ids == tok.unk_id).sum())
            docs[r.split].append(ids.astype(np.uint16 if tok.vocab_size < 1 << 16 else np.uint32))
    val, test = cfg.shares()
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "abc", "split": cfg.split, "val_fraction": val, "test_fraction": test,
                                    "min_freq": cfg.min_freq, "min_length": cfg.min_length,
                                    "max_length": cfg.max_length})
    with builder.lock():
        begin_dataset(builder, files, append=False)
        uid = "abc-" + hashlib.md5("|".join(str(p) for p in files).encode()).hexdigest()[:12]
        builder.write_unit(uid, {k: v for k, v in docs.items() if v}, source=f"{len(files)} MIDI files",
                           skipped=skips.items)
        write_bytes_atomic(Path(out) / "vocab.json", json.dumps({"tokens": tok.tokens}, indent=1).encode())
        builder.finalize([uid], skipped=skips.items)
    return AbcPrepSummary(len(files), skips.num_errors, {k: len(v) for k, v in docs.items()},
                          {k: int(sum(d.size for d in v)) for k, v in docs.items()}, short, tok.vocab_size, unk,
                          sum(r.num_notes for r in ok), sum(r.seconds for r in ok), seconds_convert,
                          time.perf_counter() - t_start, Path(out))
