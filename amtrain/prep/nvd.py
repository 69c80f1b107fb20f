"""MIDI files -> nvd token shards (`amtrain prep-midi --encoding nvd`), nano-GPT-v3's pipeline.

1. per file, over a process pool: read (amtrain.midi.events), split by the file's MD5 (as
   `--encoding amt`: md5 or ratio), event values on the grid with the leading silence trimmed
   (`amtrain.midi.nvd.notes_to_values`). Unreadable or corrupt files are reported by name and
   skipped (exit status 1); files with no notes, or only drums, are reported by name and left out.
2. documents: each piece cut into documents of at most `max_length` tokens (START + whole
   events); pieces under `min_length` tokens are left out. Train files also give augmented
   variants (every `--transpose` x `--velocity-shift` pair but the identity, as nano-GPT-v3's
   augment_all: pitch, velocity, both); a seeded draw of them joins train so that they are
   `augmented_share` of its documents (nano-GPT-v3's prepare: 30 %), and train is shuffled.
   Val and test are never augmented.
3. the vocabulary: every token of the written documents seen at least `min_freq` times
   (`amtrain.tokens.nvd.vocabulary`), saved as the tokenizer's parameters in the manifest and,
   with the counts, as `vocab.json`; then the shards.

The vocabulary depends on the whole corpus, so an nvd dataset is made in one go: a rerun of the
same inputs writes it again (the same), and `--append` is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import short_hash, write_bytes_atomic
from amtrain.midi.events import MidiReadError, read_midi_file
from amtrain.midi.nvd import EncodeStats, augment, check_grid, chunks, notes_to_values, variants
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, process_pool, progress
from amtrain.prep.encodings import PrepReport
from amtrain.prep.midi import SPLITS, SUFFIXES, MidiPrepConfig, file_split
from amtrain.store import DatasetBuilder
from amtrain.store.format import dtype_for_vocab
from amtrain.tokens.nvd import EVENT_SIZE, NvdTokenizer, count_tokens, vocabulary

NVD_OPTIONS = ("split", "val_fraction", "test_fraction", "transpose", "velocity_shift", "augmented_share",
               "min_freq", "min_length", "max_length", "grid_ms", "seed")


@dataclass(frozen=True)
class NvdPrepConfig:
    split: str = "md5"
    """md5 (first MD5 hex digit e -> val, f -> test, as amt) | ratio (--val/--test-fraction)."""
    val_fraction: float = 0.0625
    test_fraction: float = 0.0625
    transpose: tuple[int, ...] = ()
    """Semitone shifts of train files (each a variant; also combined with every velocity shift)."""
    velocity_shift: tuple[int, ...] = ()
    """Velocity offsets of train files (clipped to 1..127)."""
    augmented_share: float = 0.3
    """Share of train documents that are augmented variants (nano-GPT-v3: 30 %)."""
    min_freq: int = 1
    min_length: int = 0
    """Pieces of fewer tokens (START + 4 per note) are left out."""
    max_length: int = 1021
    """Most tokens a document holds: START + whole events (1021 = 255 events)."""
    grid_ms: int = 10
    seed: int = 0

    def __post_init__(self):
        MidiPrepConfig(split=self.split, val_fraction=self.val_fraction, test_fraction=self.test_fraction)
        if not 0 <= self.augmented_share < 1:
            raise UserError(f"--augmented-share {self.augmented_share}: give a share in [0, 1), e.g. 0.3")
        if self.min_freq < 1:
            raise UserError(f"--min-freq {self.min_freq}: must be >= 1")
        if self.max_length < 1 + EVENT_SIZE:
            raise UserError(f"--max-length {self.max_length}: an nvd document needs at least {1 + EVENT_SIZE} "
                            "tokens (START and one 4-token note)")
        try:
            check_grid(self.grid_ms)
        except ValueError as e:
            raise UserError(f"--grid-ms: {e}") from None

    @property
    def max_events(self) -> int:
        return (self.max_length - 1) // EVENT_SIZE

    def split_cfg(self) -> MidiPrepConfig:
        return MidiPrepConfig(split=self.split, val_fraction=self.val_fraction, test_fraction=self.test_fraction)


@dataclass
class FileResult:
    path: str
    split: str = ""
    error: str = ""  # unreadable / corrupt (fatal)
    odd: str = ""  # readable but nothing to encode (no notes, drums only)
    values: np.ndarray | None = None
    num_notes: int = 0
    stats: EncodeStats = field(default_factory=EncodeStats)


def encode_file(task: tuple[str, NvdPrepConfig]) -> FileResult:
    """Phase 1 for one file (runs in a worker)."""
    path, cfg = task
    res = FileResult(path)
    try:
        md5, notes = read_midi_file(path)
    except MidiReadError as e:
        res.error = str(e)
        return res
    res.split = file_split(md5, cfg.split_cfg())
    res.num_notes = len(notes)
    values = notes_to_values(notes, cfg.grid_ms, res.stats)
    if not len(notes):
        res.odd = "no notes"
    elif not len(values):
        res.odd = f"drums only ({len(notes)} drum notes; nvd has no drum tokens)"
    res.values = values
    return res


@dataclass
class NvdPrepSummary:
    num_files: int
    num_corrupt: int
    num_odd: int  # no notes / drums only
    num_short: int  # pieces under --min-length
    num_docs: dict[str, int]
    num_tokens: dict[str, int]
    seconds_of_music: dict[str, float]
    num_augmented: int  # augmented documents in train
    num_augmented_available: int
    num_notes: int
    num_drums: int
    num_capped: int
    vocab_size: int
    seconds_parse: float
    seconds_total: float
    out: Path

    @property
    def files_per_s(self) -> float:
        return self.num_files / max(self.seconds_parse, 1e-9)

    @property
    def notes_per_s(self) -> float:
        return self.num_notes / max(self.seconds_parse, 1e-9)

    def tokens_per_second(self, split: str = "train") -> float:
        return self.num_tokens[split] / max(self.seconds_of_music[split], 1e-9)


def doc_seconds(values: np.ndarray, grid_ms: int) -> float:
    """Seconds from a document's first onset to its last note's end."""
    if not len(values):
        return 0.0
    t = np.cumsum(values[:, 0])
    return float((t + values[:, 3]).max() - t[0]) * grid_ms / 1000


def prep_nvd(inputs: list[str], out: str | Path, options: dict[str, Any], *, workers: int = 1,
             append: bool = False, show_progress: bool = True) -> PrepReport:
    """`amtrain.prep.encodings.EncodingPrep` for nvd."""
    cfg = NvdPrepConfig(**options)
    if append:
        raise UserError("--append: an nvd vocabulary is built from the whole corpus; prep all the inputs together "
                        "into a new --out folder")
    s = run(inputs, out, cfg, workers, show_progress)
    lines = [
        f"{out}: {s.num_files} files ({s.num_corrupt} corrupt skipped, {s.num_odd} without notes to encode, "
        f"{s.num_short} under --min-length); documents train/val/test "
        f"{s.num_docs['train']:,}/{s.num_docs['val']:,}/{s.num_docs['test']:,} "
        f"(at most {cfg.max_length} ids: START + {cfg.max_events} notes), {s.num_augmented:,} augmented in train "
        f"(of {s.num_augmented_available:,} made)",
        f"vocabulary {s.vocab_size} tokens (--min-freq {cfg.min_freq}, grid {cfg.grid_ms} ms, in vocab.json); "
        f"tokens train/val/test {s.num_tokens['train']:,}/{s.num_tokens['val']:,}/{s.num_tokens['test']:,}; "
        f"{s.num_drums:,} drum notes left out, {s.num_capped:,} silences/durations capped at 10 s; parse "
        f"{s.files_per_s:.1f} files/s, {s.notes_per_s:,.0f} notes/s; total {s.seconds_total:.2f} s"]
    return PrepReport(Path(out), lines, s.num_corrupt, s)


def run(inputs: list[str], out: str | Path, cfg: NvdPrepConfig, workers: int = 1,
        show_progress: bool = True) -> NvdPrepSummary:
    t_start = time.perf_counter()
    out = Path(out)
    files = expand_inputs(inputs, SUFFIXES)
    skips = SkipReport()
    t0 = time.perf_counter()
    tasks = [(str(p), cfg) for p in files]
    with progress() as bar:
        task = bar.add_task("prep-midi nvd", total=len(tasks), visible=show_progress)
        results: list[FileResult] = []
        if workers > 1 and len(tasks) > 1:
            with process_pool(max_workers=min(workers, len(tasks))) as pool:
                for r in pool.map(encode_file, tasks, chunksize=max(1, min(32, len(tasks) // (4 * workers)))):
                    results.append(r)
                    bar.advance(task)
        else:
            for t in tasks:
                results.append(encode_file(t))
                bar.advance(task)
    seconds_parse = time.perf_counter() - t0

    docs: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    augmented: list[np.ndarray] = []
    pairs = variants(cfg.transpose, cfg.velocity_shift)
    num_odd = num_short = num_notes = num_drums = num_capped = 0
    for r in results:
        num_notes += r.num_notes
        num_drums += r.stats.num_drums
        num_capped += r.stats.num_capped
        if r.error:
            skips.add(r.path, r.error)
            continue
        if r.odd:
            skips.add(r.path, r.odd, fatal=False)
            num_odd += 1
            continue
        assert r.values is not None
        if 1 + EVENT_SIZE * len(r.values) < cfg.min_length:
            num_short += 1
            continue
        docs[r.split] += chunks(r.values, cfg.max_events)
        if r.split == "train":
            for semi, delta in pairs:
                v = augment(r.values, semi, delta)
                if len(v):
                    augmented += chunks(v, cfg.max_events)
    rng = np.random.default_rng(cfg.seed)
    share = cfg.augmented_share
    want = min(len(augmented), round(share / (1 - share) * len(docs["train"]))) if augmented else 0
    picked = sorted(rng.choice(len(augmented), size=want, replace=False).tolist()) if want else []
    train = docs["train"] + [augmented[i] for i in picked]
    docs["train"] = [train[i] for i in rng.permutation(len(train))]

    counts: dict[str, int] = {}
    for split_docs in docs.values():
        for d in split_docs:
            count_tokens(d, counts)
    tok = NvdTokenizer(vocabulary(counts, cfg.min_freq), cfg.grid_ms)
    dtype = dtype_for_vocab(tok.vocab_size)
    encoded = {s: [tok.encode_values(d).astype(dtype) for d in ds] for s, ds in docs.items() if ds}
    extra = {"modality": "nvd", "encoding": "nvd", "layout": "START + (sep, n, v, d) events",
             **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}
    builder = DatasetBuilder(out, tok.name, tok.vocab_size, tok.special_ids, tok.params(), extra=extra)
    with builder.lock():
        begin_dataset(builder, files, append=False)
        uid = "nvd-" + short_hash(json.dumps([str(p) for p in files]) + repr(cfg) + str(tok.tokens), 12)
        builder.write_unit(uid, encoded, source=f"{len(files)} MIDI files", skipped=skips.items)
        body = {"grid_ms": cfg.grid_ms, "min_freq": cfg.min_freq, "tokens": tok.tokens,
                "counts": {t: counts.get(t, 0) for t in tok.tokens}}
        write_bytes_atomic(out / "vocab.json", json.dumps(body, indent=1).encode())
        builder.finalize([uid], skipped=skips.items)
    return NvdPrepSummary(
        len(files), skips.num_errors, num_odd, num_short, {s: len(docs[s]) for s in SPLITS},
        {s: int(sum(a.size for a in encoded.get(s, []))) for s in SPLITS},
        {s: sum(doc_seconds(d, cfg.grid_ms) for d in docs[s]) for s in SPLITS}, len(picked), len(augmented),
        num_notes, num_drums, num_capped, tok.vocab_size, seconds_parse, time.perf_counter() - t_start, out)
