"""What every prep pipeline shares: input expansion, skip reports, progress, summaries."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from amtrain.errors import UserError


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


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class SkipReport:
    """Bad items are skipped, reported by name with the reason, and the batch goes on."""

    items: list[dict] = field(default_factory=list)

    def add(self, path: Path | str, reason: str, fatal: bool = True) -> None:
        from rich.console import Console

        self.items.append({"file": str(path), "reason": reason, "error": fatal})
        Console(stderr=True, soft_wrap=True).print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)

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
