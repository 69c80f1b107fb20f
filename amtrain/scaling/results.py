"""The results table of a scaling study: one CSV row per finished (architecture, size) run.

Columns (RESULT_COLUMNS): arch, size, params (total), non_embedding_params, active_params (what one
token uses: fewer than params for a mixture of experts, from the run's run_info.json; a table
written before this column reads it as params), tokens (trained on),
train_loss (mean of the last logged train losses), val_loss (final), wall_s (training time of the
run's steps summed over every launch of it, from its checkpointed clock: a run resumed after a kill
counts the segments before the kill too; evaluation and checkpoint writes excluded), tokens_per_s,
peak_mem_gb, run_dir (where the run's metrics.jsonl is, relative to the table's folder), then any
`rollout_<statistic>` columns (the run's last rollout during training, `amtrain.evaluate`; empty
for a run without). A row is
appended only when its run has finished, by rewriting the file atomically, so a study killed
midway keeps every finished row and nothing half-written.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic

RESULT_COLUMNS = ["arch", "size", "params", "non_embedding_params", "active_params", "tokens", "train_loss", "val_loss",
                  "wall_s", "tokens_per_s", "peak_mem_gb", "run_dir"]
OPTIONAL_COLUMNS = ["bits_per_second"]
"""Written after RESULT_COLUMNS; empty where the run has none (bits per second of music: symbolic
music datasets, `amtrain.modalities.music`). Tables written without them still read."""
_INT = {"params", "non_embedding_params", "active_params", "tokens"}
_FLOAT = {"train_loss", "val_loss", "wall_s", "tokens_per_s", "peak_mem_gb"}


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no results table; run `amtrain scaling run ... --out DIR` first")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(RESULT_COLUMNS) - set(reader.fieldnames or []) - {"active_params"}
        if missing:
            raise UserError(f"{path}: not a scaling results table (missing columns {', '.join(sorted(missing))})")
        rows = list(reader)
        extra = [k for k in reader.fieldnames or [] if k.startswith("rollout_")]
    for row in rows:
        row.setdefault("active_params", row["params"])  # a table from before the column
    for i, row in enumerate(rows, start=2):
        try:
            for k in _INT:
                row[k] = int(row[k])
            for k in _FLOAT:
                row[k] = float(row[k])
            for k in OPTIONAL_COLUMNS:
                row[k] = float(row[k]) if row.get(k) else None
            for k in extra:
                row[k] = float(row[k]) if row[k] not in ("", None) else None
        except ValueError as e:
            raise UserError(f"{path}:{i}: bad number ({e}); fix or delete that row") from None
    return rows


def append_result(path: str | Path, row: dict) -> None:
    path = Path(path)
    rows = read_results(path) if path.is_file() else []
    buf = io.StringIO()
    extra = sorted({k for r in [*rows, row] for k in r if k.startswith("rollout_")})
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS + OPTIONAL_COLUMNS + extra, lineterminator="\n")
    w.writeheader()
    for r in [*rows, row]:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in RESULT_COLUMNS + OPTIONAL_COLUMNS + extra})
    write_bytes_atomic(path, buf.getvalue().encode())


def finished(rows: list[dict], arch: str, size: str, tokens: int) -> bool:
    return any(r["arch"] == arch and r["size"] == size and r["tokens"] == tokens for r in rows)
