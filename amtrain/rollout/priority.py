"""Audio prompts chosen by priority score (`--prompt-from-priority`).

Reads prep-audio's chunk tables (`OUT/scores/<unit>.parquet`, `amtrain.data.priority.read_scores`)
and codes (`OUT/codes/<unit>.npz`): the chunk of rank r by priority (0 = highest) is the prompt.
With `whole_file` (used by `--mode alternate`) the prompt is that chunk's whole file and every
chunk of the file comes back as (start_frame, end_frame, priority): alternate re-generates the
weakest chunks of the prompt and continues from the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.errors import UserError


def _tables(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    found = sorted((path / "scores").glob("*.parquet")) if path.is_dir() else []
    if not found:
        raise UserError(f"{path}: no chunk-score tables (scores/*.parquet); pass a prep-audio output folder "
                        "or one of its scores/<unit>.parquet files")
    return found


def rank_chunks(path: str | Path) -> list[tuple[float, Path, int, int]]:
    """All chunks of the tables under path: (priority, table, start_frame, end_frame), best first."""
    from amtrain.data.priority import read_scores

    rows = []
    for table_path in _tables(Path(path)):
        t = read_scores(table_path).to_pydict()
        rows += [(float(p), table_path, int(s), int(e))
                 for p, s, e in zip(t["priority"], t["start_frame"], t["end_frame"], strict=True)]
    return sorted(rows, key=lambda r: (-r[0], str(r[1]), r[2]))


def codes_for(table_path: Path) -> Path:
    return table_path.parent.parent / "codes" / f"{table_path.stem}.npz"


def prompt_from_priority(path: str | Path, tok, rank: int = 0, whole_file: bool = False):
    """-> (codes (K, T), chunks [(start, end, priority)] relative to the prompt, a one-line summary)."""
    from amtrain.data.priority import read_scores
    from amtrain.modalities.audio import check_codes

    ranked = rank_chunks(path)
    if not 0 <= rank < len(ranked):
        raise UserError(f"--priority-rank {rank}: the tables hold {len(ranked)} chunks")
    pri, table_path, start, end = ranked[rank]
    npz = codes_for(table_path)
    if not npz.is_file():
        raise UserError(f"{npz}: codes missing for {table_path.name}; re-run prep-audio into that folder")
    with np.load(npz) as z:
        codes = check_codes(z["codes"].astype(np.int64), tok, npz)
    if whole_file:
        t = read_scores(table_path).to_pydict()
        chunks = [(int(s), int(e), float(p)) for s, e, p in zip(t["start_frame"], t["end_frame"], t["priority"], strict=True)]
        return codes, chunks, f"prompt: {npz.name} (all {codes.shape[1]} frames, {len(chunks)} chunks)"
    info = f"prompt: {npz.name} frames {start}:{end} (priority {pri:.3f}, rank {rank} of {len(ranked)})"
    return codes[:, start:end], [(0, end - start, pri)], info
