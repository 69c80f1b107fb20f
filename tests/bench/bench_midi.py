"""Benchmark: MIDI -> AMT events and `prep-midi`, against a straightforward mido-based conversion
(AMT's own midi_to_compound + compound_to_events, tests/reference_amt.py) measured in the same run.

    python tests/bench/bench_midi.py [--copies 4] [--repeat 3] [--workers 0]

The folder is data/midi (8 real files) copied `--copies` times. Reports, best of `--repeat`:
  1. conversion MIDI -> events, one process: mido baseline vs amtrain (events checked identical);
  2. the whole AMT pipeline, one process: reference midi_to_compound + tokenize (augment 1)
     vs `prep-midi --workers 1` (sequences checked identical);
  3. `prep-midi` on all cores (files/s, events/s).
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.midi.events import notes_to_events, read_notes  # noqa: E402
from amtrain.prep.common import default_workers  # noqa: E402
from amtrain.prep.midi import MidiPrepConfig, prep_midi, warm_up  # noqa: E402
from amtrain.store import Dataset  # noqa: E402
from tests import reference_amt as ref  # noqa: E402


def best_of(repeat, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    workers = args.workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="bench_midi_"))
    src = sorted((REPO / "data" / "midi").glob("*.mid"))
    files = []
    for c in range(args.copies):
        for f in src:
            files.append(tmp / "in" / f"{c}_{f.name}")
            files[-1].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, files[-1])
    warm_up()
    nbytes = sum(f.stat().st_size for f in files)

    t_mido, ev_mido = best_of(args.repeat, lambda: [ref.midi_to_events(str(f)) for f in files])
    t_ours, ev_ours = best_of(args.repeat, lambda: [notes_to_events(read_notes(f))[0].ravel().tolist() for f in files])
    assert ev_ours == ev_mido, "events differ from the mido baseline"
    num_events = sum(len(e) // 3 for e in ev_mido)

    cfg = MidiPrepConfig(split="ratio", val_fraction=0.0, test_fraction=0.0)
    t_ref, (seqs_ref, _) = best_of(args.repeat, lambda: ref.tokenize([str(f) for f in files], 1))

    def prep(n):
        out = tmp / f"out{n}"
        shutil.rmtree(out, ignore_errors=True)
        prep_midi([str(tmp / "in")], out, cfg, workers=n, show_progress=False)
        return out

    t_prep1, out1 = best_of(args.repeat, lambda: prep(1))
    assert [d.tolist() for d in Dataset(out1).documents("train")] == seqs_ref, "sequences differ from AMT"
    t_prepn, _ = best_of(args.repeat, lambda: prep(workers))
    shutil.rmtree(tmp)

    n = len(files)
    rows = [
        ("MIDI -> events, mido baseline (AMT midi_to_events), 1 process", t_mido),
        ("MIDI -> events, amtrain (numba SMF reader + numpy), 1 process", t_ours),
        ("AMT pipeline: midi_to_compound + tokenize, 1 process", t_ref),
        ("prep-midi --workers 1 (parse, filter, sequences, shards)", t_prep1),
        (f"prep-midi --workers {workers}", t_prepn),
    ]
    print(f"{n} files ({nbytes / 1e6:.2f} MB, {num_events:,} events = notes), best of {args.repeat}; "
          f"{len(seqs_ref)} sequences of 1024 ids; {os.cpu_count()} CPUs\n")
    print("| what | seconds | files/s | events/s |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {n / t:,.1f} | {num_events / t:,.0f} |")
    print(f"\nconversion speed-up vs mido: {t_mido / t_ours:.1f}x; "
          f"prep-midi --workers 1 vs AMT pipeline: {t_ref / t_prep1:.1f}x; "
          f"prep-midi --workers {workers} vs AMT pipeline: {t_ref / t_prepn:.1f}x")


if __name__ == "__main__":
    main()
