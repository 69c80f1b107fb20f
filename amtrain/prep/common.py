"""What every prep pipeline shares: input expansion, the dataset folder's guard (lock,
refuse or append), skip reports, worker pools, progress."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from amtrain.errors import UserError
from amtrain.fileio import source_id


def expand_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files, folders (recursive) and globs -> sorted unique files with one of `suffixes`.
    A file named explicitly is kept whatever its suffix (the pipeline reports it if unreadable)."""
    found: set[Path] = set()
    for item in inputs:
        matches = [Path(p) for p in glob.glob(item, recursive=True)] if glob.has_magic(item) else [Path(item)]
        if not matches or not all(p.exists() for p in matches):
            raise UserError(f"{item}: no such file, folder or glob match; check the path")
        for p in matches:
            if p.is_dir():
                found.update(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in suffixes)
            elif p.is_file() and (not glob.has_magic(item) or p.suffix.lower() in suffixes):
                found.add(p)
    if not found:
        raise UserError(f"{' '.join(inputs)}: no input files ending in {', '.join(suffixes)}")
    return sorted(found)


def begin_dataset(builder, files: list[Path], append: bool, salt: str = "") -> list[Path]:
    """Check the run against the dataset already in the output folder (call under
    `builder.lock()`): the same inputs and settings resume, other inputs need `append` (see
    DatasetBuilder.begin). Returns the files to prep: all of them, or with `append` those not
    already in the dataset. `salt` is part of an input's identity (a token file imported into
    another split is another input)."""
    inputs = [{"file": str(p), "id": source_id(p, salt)} for p in files]
    present = builder.begin(inputs, append)
    if present:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(
            f"appending to {builder.folder}: {len(present)} of {len(files)} input(s) already in it, left out", highlight=False)
    return [p for p, i in zip(files, inputs, strict=True) if i["id"] not in present]


@contextlib.contextmanager
def process_pool(**kwargs) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor that, when the caller fails (e.g. the disk is full), cancels the
    tasks not yet started instead of running them all before the error is shown."""
    pool = ProcessPoolExecutor(**kwargs)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class SkipReport:
    """Bad items are skipped, reported by name with the reason, and the batch goes on."""

    items: list[dict] = field(default_factory=list)

    def add(self, path: Path | str, reason: str, fatal: bool = True) -> None:
        from rich.console import Console

        self.items.append({"file": str(path), "reason": reason, "error": fatal})
        label = "skipped" if fatal else "warning"
        Console(stderr=True, soft_wrap=True).print(f"[yellow]{label}[/] {path}: {reason}", highlight=False)

    def restore(self, items: list[dict]) -> None:
        """Report again what a finished unit skipped (read back from its record on resume)."""
        for i in items:
            self.add(i["file"], i["reason"], i["error"])

    @property
    def num_errors(self) -> int:
        return sum(1 for i in self.items if i["error"])


def progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
