"""MIDI files -> AMT event-sequence shards (`amtrain prep-midi`), and AMT's pre-tokenized text
files -> shards unchanged (`amtrain prep-midi --from-tokens`).

Two phases, so the expensive one is parallel and resumable and the result equals AMT's:

1. per file (a *unit*), over a process pool: read, MD5, parse (amtrain.midi.events), optional
   variants (pitch transposition with drums untouched, tempo stretch; train split only),
   events, AMT's filters. The result is cached atomically in `OUT/.midi_units/<unit>.npz`;
   a rerun skips cached units. Unreadable or corrupt files are reported by name and skipped.
2. per *stream*, in file order, streams in parallel: AMT's `tokenize` (amtrain.midi.tokenize)
   with one `RandomState(seed)` per stream and the augmentation factor (val/test are never
   augmented). AMT's tokenize-lakh.py makes 16 streams, one per first MD5 hex digit, each seeded
   with 0, and trains on digits 0-d in order: with --split md5 the streams are the same; with
   --split ratio there is one stream per split. Sequences (1024 ids: a flag and 341 events) are
   the documents of the shards; a finished stream leaves a marker and is skipped on rerun.

Splits: `md5` (default, AMT's Lakh split): the first hex digit of the file's MD5, e -> val,
f -> test, else train; or `ratio`: the MD5 as a fraction in [0, 1) against --val-fraction and
--test-fraction. Both depend only on the file's bytes.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import make_dirs, short_hash, source_id, write_bytes_atomic
from amtrain.midi.events import MidiReadError, Notes, notes_to_events, parse_notes, read_midi_file
from amtrain.midi.tokenize import DROP_REASONS, SequenceCutter, drop_reason, piece_chunks
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, process_pool, progress
from amtrain.store import DatasetBuilder
from amtrain.tokens.midi import DRUMS, LAKH_TEST, LAKH_VALID, VOCAB_SIZE, MidiTokenizer

SUFFIXES = (".mid", ".midi")
SPLITS = ("train", "val", "test")
CACHE = ".midi_units"


@dataclass(frozen=True)
class MidiPrepConfig:
    augment: int = 1
    """AMT's augmentation factor for train (k % 10: 0 plain, 1 spans, 2-5 random, 6-9 instruments)."""
    split: str = "md5"
    """md5 (AMT: first hex digit e -> val, f -> test) | ratio (--val/--test-fraction)."""
    val_fraction: float = 0.0625
    test_fraction: float = 0.0625
    transpose: tuple[int, ...] = (0,)
    """Semitone shifts; each is a variant of every train file (drums untouched)."""
    stretch: tuple[float, ...] = (1.0,)
    """Tempo factors (time multipliers); each is a variant of every train file."""
    seed: int = 0

    def __post_init__(self):
        if self.augment < 1:
            raise UserError(f"--augment {self.augment}: must be >= 1 (1 = no augmentation, AMT uses 10)")
        if self.split not in ("md5", "ratio"):
            raise UserError(f"--split {self.split!r}: choose md5 or ratio")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise UserError("--val-fraction and --test-fraction: each >= 0, together < 1")
        if any(f <= 0 for f in self.stretch):
            raise UserError(f"--stretch {self.stretch}: factors must be > 0")

    def variants(self) -> list[tuple[int, float]]:
        return [(s, f) for f in self.stretch for s in self.transpose]


def file_split(md5: str, cfg: MidiPrepConfig) -> str:
    if cfg.split == "md5":
        return "val" if md5[0] in LAKH_VALID else "test" if md5[0] in LAKH_TEST else "train"
    u = int(md5, 16) / 2.0**128
    return "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"


def apply_variant(notes: Notes, semitones: int, factor: float) -> tuple[Notes, int]:
    """Transpose non-drum notes (dropping those leaving 0..127) and stretch time. -> (notes, dropped)."""
    is_drum = notes.instr == DRUMS
    pitch = np.where(is_drum, notes.pitch, notes.pitch + semitones)
    keep = (pitch >= 0) & (pitch < 128)
    t, d = notes.time, notes.dur
    if factor != 1.0:
        t = np.round(t * factor).astype(np.int64)
        d = np.where(d < 0, -1, np.round(d * factor)).astype(np.int64)
        order = np.argsort(t, kind="stable")  # rounding keeps order; stable for equal onsets
        t, d, pitch, keep = t[order], d[order], pitch[order], keep[order]
        instr, vel = notes.instr[order], notes.velocity[order]
    else:
        instr, vel = notes.instr, notes.velocity
    out = Notes(t[keep], d[keep], pitch[keep], instr[keep], vel[keep])
    return out, int(np.count_nonzero(~keep))


@dataclass
class UnitResult:
    uid: str
    path: str
    split: str = ""
    error: str = ""
    num_notes: int = 0
    reasons: list[str] = field(default_factory=list)  # per variant: "" kept, else drop reason
    md5: str = ""
    num_out_of_range: int = 0  # notes transposed out of 0..127, dropped (all variants)


def process_file(task: tuple[str, str, str, MidiPrepConfig]) -> UnitResult:
    """Phase 1 for one file (runs in a worker): parse, variants, filters; cache the events."""
    uid, path, cache_dir, cfg = task
    res = UnitResult(uid, path)
    try:
        res.md5, notes = read_midi_file(path)
    except MidiReadError as e:
        res.error = str(e)
        return res
    res.split = file_split(res.md5, cfg)
    res.num_notes = len(notes)
    variants = cfg.variants() if res.split == "train" else [(0, 1.0)]
    arrays = {}
    for v, (semi, factor) in enumerate(variants):
        vnotes, dropped = apply_variant(notes, semi, factor) if (semi, factor) != (0, 1.0) else (notes, 0)
        res.num_out_of_range += dropped
        events, num_truncated = notes_to_events(vnotes)
        reason = drop_reason(events) or ""
        res.reasons.append(reason)
        if not reason:
            arrays[f"events{v}"] = events.astype(np.int32)
            arrays[f"truncated{v}"] = np.array(num_truncated)
    buf = io.BytesIO()
    payload: dict[str, Any] = {"split": np.array(res.split), "md5": np.array(res.md5),
                               "reasons": np.array(res.reasons + ["#"]), "num_notes": np.array(res.num_notes),
                               "num_out_of_range": np.array(res.num_out_of_range), **arrays}
    np.savez(buf, **payload)
    _write_cache(Path(cache_dir) / f"{uid}.npz", buf.getvalue())
    return res


def _write_cache(path: Path, data: bytes) -> None:
    """Temp file + rename, without fsync: a cache entry torn by a crash fails np.load in
    `load_unit` and the file is simply parsed again (fsync per file cost a third of the run)."""
    write_bytes_atomic(path, data, fsync=False)


def load_unit(cache_dir: Path, uid: str, path: str) -> UnitResult | None:
    """A finished unit's result from its cache entry; None if absent or damaged (redo it)."""
    f = cache_dir / f"{uid}.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}  # reads (and CRC-checks) every member
        return UnitResult(uid, path, str(arrays["split"]), "", int(arrays["num_notes"]),
                          [str(r) for r in arrays["reasons"][:-1]], str(arrays["md5"]),
                          int(arrays["num_out_of_range"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def unit_pieces(cache_dir: Path, uid: str):
    """The kept variants of a cached unit: [(events (N, 3) int64, num_truncated)]."""
    with np.load(cache_dir / f"{uid}.npz") as z:
        reasons = [str(r) for r in z["reasons"][:-1]]
        return [(z[f"events{v}"].astype(np.int64), int(z[f"truncated{v}"]))
                for v, r in enumerate(reasons) if not r]


@dataclass
class MidiPrepSummary:
    num_files: int
    num_corrupt: int
    num_resumed: int
    dropped: dict[str, int]  # reason -> number of (file, variant) pieces
    num_pieces: dict[str, int]  # split -> pieces kept
    num_sequences: dict[str, int]
    num_dropped_overflow: int
    num_rests: int
    num_truncated: int
    num_notes: int  # notes parsed (files parsed in this run)
    num_out_of_range: int  # notes dropped by --transpose (pitch left 0..127)
    seconds_parse: float
    seconds_total: float
    skipped: list[dict]
    out: Path

    @property
    def files_per_s(self) -> float:
        return (self.num_files - self.num_resumed) / max(self.seconds_parse, 1e-9)

    @property
    def events_per_s(self) -> float:
        return self.num_notes / max(self.seconds_parse, 1e-9)


def plan_units(files: list[Path], salt: str) -> list[tuple[str, Path]]:
    units = []
    for i, path in enumerate(files):
        units.append((f"{i:06d}-{source_id(path, salt)}", path))
    return units


def warm_up() -> None:
    """Compile (or load from numba's cache) the parser before forking workers."""
    track = b"\x00\x90\x3c\x40\x60\x80\x3c\x00\x00\xff\x2f\x00"
    data = b"MThd" + (6).to_bytes(4, "big") + b"\x00\x00\x00\x01\x00\x60" + b"MTrk" + len(track).to_bytes(4, "big") + track
    parse_notes(data)


def run_phase1(units, cache_dir: Path, cfg: MidiPrepConfig, workers: int, show_progress: bool,
               skips: SkipReport) -> tuple[dict[str, UnitResult], int, int, float]:
    """-> (results by uid, units resumed, notes parsed now, seconds)."""
    results: dict[str, UnitResult] = {}
    todo = []
    for uid, path in units:
        r = load_unit(cache_dir, uid, str(path))
        if r is None:
            todo.append((uid, str(path), str(cache_dir), cfg))
        else:
            results[uid] = r
    resumed = len(results)
    warm_up()
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("prep-midi parse", total=len(units), completed=resumed, visible=show_progress)
        if workers > 1 and len(todo) > 1:
            with process_pool(max_workers=workers) as pool:
                it = pool.map(process_file, todo, chunksize=max(1, min(32, len(todo) // (4 * workers))))
                for r in it:
                    results[r.uid] = r
                    bar.advance(task)
        else:
            for t in todo:
                r = process_file(t)
                results[r.uid] = r
                bar.advance(task)
    seconds = time.perf_counter() - t0
    num_notes = 0
    for uid, _, _, _ in todo:
        r = results[uid]
        if r.error:
            skips.add(r.path, r.error)
        num_notes += r.num_notes
    return results, resumed, num_notes, seconds


def prep_midi(inputs: list[str], out: str | Path, cfg: MidiPrepConfig | None = None, workers: int = 1,
              show_progress: bool = True, append: bool = False) -> MidiPrepSummary:
    cfg = cfg or MidiPrepConfig()
    t_start = time.perf_counter()
    files = expand_inputs(inputs, SUFFIXES)
    tok = MidiTokenizer()
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "midi", "layout": "amt-arrival", "sequence_length": 1024,
                                    "augment": cfg.augment, "split": cfg.split, "val_fraction": cfg.val_fraction,
                                    "test_fraction": cfg.test_fraction, "transpose": list(cfg.transpose),
                                    "stretch": list(cfg.stretch), "seed": cfg.seed})
    with builder.lock():
        files = begin_dataset(builder, files, append)
        return _prep_files(files, builder, Path(out), cfg, workers, show_progress, t_start)


def _prep_files(files: list[Path], builder: DatasetBuilder, out: Path, cfg: MidiPrepConfig, workers: int,
                show_progress: bool, t_start: float) -> MidiPrepSummary:
    salt = f"{cfg.split}|{cfg.val_fraction}|{cfg.test_fraction}|{cfg.transpose}|{cfg.stretch}"
    units = plan_units(files, salt)
    cache_dir = make_dirs(out / CACHE)
    skips = SkipReport()
    results, resumed, num_notes, seconds = run_phase1(units, cache_dir, cfg, workers, show_progress, skips)

    dropped = dict.fromkeys(DROP_REASONS, 0)
    pieces = dict.fromkeys(SPLITS, 0)
    groups: dict[tuple[str, str], list[str]] = {}
    for uid, _ in units:
        r = results[uid]
        if r.error:
            continue
        for reason in r.reasons:
            if reason:
                dropped[reason] += 1
            else:
                pieces[r.split] += 1
        groups.setdefault((stream_key(r, cfg), r.split), []).append(uid)
    tasks = [GroupTask(key, split, uids, cfg.augment if split == "train" else 1, cfg.seed, str(out),
                       short_hash(f"{salt}|{cfg.augment}|{cfg.seed}|{key}|{uids}", 12))
             for (key, split), uids in sorted(groups.items())]
    done = _map(run_group, tasks, workers)
    seq_counts = dict.fromkeys(SPLITS, 0)
    unit_ids = []
    for g in done:
        seq_counts[g.split] += g.num_sequences
        unit_ids += g.unit_ids
    builder.finalize(unit_ids, skipped=skips.items)
    return MidiPrepSummary(len(files), skips.num_errors, resumed, dropped, pieces, seq_counts,
                           sum(g.num_dropped_overflow for g in done), sum(g.num_rests for g in done),
                           sum(g.num_truncated for g in done), num_notes,
                           sum(r.num_out_of_range for r in results.values()), seconds,
                           time.perf_counter() - t_start, skips.items, out)


# --- phase 2: one sequence stream per group ------------------------------------------------
SEQS_PER_UNIT = 1 << 16  # sequences per shard unit (128 MiB of uint16)


def stream_key(r: UnitResult, cfg: MidiPrepConfig) -> str:
    """AMT tokenizes Lakh as 16 streams, one per first MD5 digit (each seeded alike) and trains on
    digits 0-d in order; with --split md5 so do we. With --split ratio: one stream per split."""
    return r.md5[0] if cfg.split == "md5" else r.split


@dataclass
class GroupTask:
    key: str
    split: str
    uids: list[str]
    augment: int
    seed: int
    out: str
    ghash: str  # names the group's output: options, members and their order


@dataclass
class GroupResult:
    split: str
    unit_ids: list[str]
    num_sequences: int
    num_dropped_overflow: int
    num_rests: int
    num_truncated: int


def _builder(out: str | Path) -> DatasetBuilder:
    tok = MidiTokenizer()
    return DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params())


def run_group(task: GroupTask) -> GroupResult:
    """AMT's `tokenize` over one group's cached pieces in file order; shards written in units of
    SEQS_PER_UNIT sequences, then a marker, so a finished group is skipped on rerun."""
    cache_dir = Path(task.out) / CACHE
    marker = cache_dir / f"group-{task.ghash}.json"
    builder = _builder(task.out)
    if marker.is_file():
        try:
            res = GroupResult(**json.loads(marker.read_text()))
            if all(builder.load_unit(u) is not None for u in res.unit_ids):
                return res
        except (json.JSONDecodeError, TypeError):
            pass
    cutter = SequenceCutter()
    rng = np.random.RandomState(task.seed)
    unit_ids: list[str] = []
    rests = truncated = 0

    def flush():
        uid = f"seq-{task.split}-{task.key}-{task.ghash}-{len(unit_ids):04d}"
        builder.write_unit(uid, {task.split: cutter.take()}, source=f"stream {task.key}: {len(task.uids)} MIDI files")
        unit_ids.append(uid)

    for uid in task.uids:
        for events, num_truncated in unit_pieces(cache_dir, uid):
            chunks, num_rests = piece_chunks(events, task.augment, rng)
            rests += num_rests
            truncated += num_truncated * task.augment
            for k, chunk in chunks:
                cutter.add(k, chunk)
            if len(cutter.sequences) >= SEQS_PER_UNIT:
                flush()
    if cutter.sequences:
        flush()
    res = GroupResult(task.split, unit_ids, cutter.stats.num_sequences, cutter.stats.num_dropped_overflow,
                      rests, truncated)
    _write_cache(marker, json.dumps(res.__dict__).encode())
    return res


def _map(fn, tasks: list, workers: int) -> list:
    if workers > 1 and len(tasks) > 1:
        with process_pool(max_workers=min(workers, len(tasks))) as pool:
            return list(pool.map(fn, tasks))
    return [fn(t) for t in tasks]


# --- passthrough -------------------------------------------------------------------------
@dataclass
class TokenImportSummary:
    num_sequences: int
    num_tokens: int
    num_bad_lines: int
    lengths: dict[int, int]
    out: Path


def import_token_files(files: list[str], out: str | Path, split: str = "train", append: bool = False) -> TokenImportSummary:
    """AMT's pre-tokenized text (one sequence of space-separated ids a line) -> shards, ids
    unchanged. A line with a non-integer or an id outside [0, 55028) is skipped and reported as
    `file:line`; each file is a resumable unit. Imports add up: AMT ships its splits as separate
    files, so importing another file (or the same file into another `split`) into a dataset of
    imported tokens adds it beside what is there, and the same file and split again is a resume
    (`append` is implied; kept for the CLI's uniformity)."""
    tok = MidiTokenizer()
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such token file; pass AMT's tokenized-events-*.txt files")
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(),
                             extra={"modality": "midi", "layout": "amt-arrival", "passthrough": True})
    skips = SkipReport()
    unit_ids, num_seq, num_tok = [], 0, 0
    lengths: dict[int, int] = {}
    with builder.lock():
        for i, p in enumerate(begin_dataset(builder, paths, append=True, salt=split)):
            uid = f"tokens-{i:05d}-" + source_id(p, split)
            recs = builder.load_unit(uid)
            if recs is None:
                first = len(skips.items)
                docs = _token_lines(p, skips)
                recs = builder.write_unit(uid, {split: docs} if docs else {}, source=str(p), skipped=skips.items[first:])
                for d in docs:
                    lengths[d.size] = lengths.get(d.size, 0) + 1
            else:
                skips.restore(builder.unit_skipped(uid))
            unit_ids.append(uid)
            num_seq += sum(r.num_docs for r in recs)
            num_tok += sum(r.num_tokens for r in recs)
        builder.finalize(unit_ids, skipped=skips.items)
    return TokenImportSummary(num_seq, num_tok, skips.num_errors, lengths, Path(out))


def _token_lines(path: Path, skips: SkipReport) -> list[np.ndarray]:
    """The file's sequences; a bad line is reported as `file:line` and left out."""
    docs = []
    for num, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = np.array(line.split(), dtype=np.int64)
        except ValueError:
            skips.add(f"{path}:{num}", "not a line of integer ids (sequence skipped)")
            continue
        out_of_range = ids[(ids < 0) | (ids >= VOCAB_SIZE)]
        if out_of_range.size:
            skips.add(f"{path}:{num}", f"id {int(out_of_range[0])} outside [0, {VOCAB_SIZE}) (sequence skipped)")
            continue
        docs.append(ids.astype(np.uint16))
    return docs


# --- `amtrain prep-midi --encoding amt` ------------------------------------------------------
AMT_OPTIONS = ("augment", "split", "val_fraction", "test_fraction", "transpose", "stretch", "seed")


def prep_amt(inputs: list[str], out: str | Path, options: dict[str, Any], *, workers: int = 1,
             append: bool = False, show_progress: bool = True):
    """The AMT encoding's entry for `amtrain prep-midi` (`amtrain.prep.encodings.EncodingPrep`)."""
    from amtrain.prep.encodings import PrepReport

    s = prep_midi(inputs, out, MidiPrepConfig(**options), workers=workers, show_progress=show_progress, append=append)
    drops = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in s.dropped.items() if n) or "none"
    lines = [
        f"{out}: {s.num_files} files ({s.num_resumed} already parsed, {s.num_corrupt} corrupt skipped); "
        f"pieces kept train/val/test {s.num_pieces['train']}/{s.num_pieces['val']}/{s.num_pieces['test']}; "
        f"dropped by filters: {drops}",
        f"sequences train/val/test {s.num_sequences['train']:,}/{s.num_sequences['val']:,}/{s.num_sequences['test']:,} "
        f"(1024 ids each); {s.num_rests:,} REST events, {s.num_truncated:,} durations capped, "
        f"{s.num_dropped_overflow} sequences dropped (time >= 100 s), {s.num_out_of_range} notes transposed "
        f"out of range dropped; parse {s.files_per_s:.1f} files/s, "
        f"{s.events_per_s:,.0f} events/s; total {s.seconds_total:.2f} s"]
    return PrepReport(Path(out), lines, s.num_corrupt, s, s.skipped)
