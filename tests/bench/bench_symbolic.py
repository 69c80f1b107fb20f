"""Benchmark: the symbolic encodings side by side on the same MIDI files.

    python tests/bench/bench_symbolic.py [--copies 2] [--repeat 3] [--steps 60] [--encodings amt,nvd]

Every encoding registered for `amtrain prep-midi --encoding` (`amtrain.registry.encoding_names`;
an encoding added later, e.g. abc, joins without an edit here) is run on data/midi copied
`--copies` times:
  1. prep throughput, one process, best of `--repeat`: files/s and notes/s (the notes the MIDI
     reader finds in the files, the same numerator for every encoding);
  2. tokens per second of music: each dataset's train tokens over the seconds of music its
     documents hold, read back through `Modality.notes`;
  3. an equal-compute comparison: the same decoder (`--size`, default debug) trained for the same
     steps x tokens on each encoding's train split, then validated on its whole val split:
     bits per second of music (the comparable figure), with val loss in nats per token beside it.
All encodings get the same split (`--split ratio`, a quarter of the files by MD5 to val), so each
validates on the same pieces. Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from amtrain.midi.events import read_notes  # noqa: E402
from amtrain.modalities.music import tokens_per_second  # noqa: E402
from amtrain.prep.encodings import prep_encoding  # noqa: E402
from amtrain.registry import encoding, encoding_names  # noqa: E402
from amtrain.store import Dataset  # noqa: E402
from amtrain.tokens import get_tokenizer  # noqa: E402

SPLIT = {"split": "ratio", "val_fraction": 0.25, "test_fraction": 0.0}


def options_for(name: str) -> dict:
    """The shared split, as far as the encoding takes those options."""
    return {k: v for k, v in SPLIT.items() if k in encoding(name).prep_options}


def best_of(repeat, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def train_one(data: Path, out: Path, size: str, steps: int, seq_len: int) -> dict:
    from amtrain.train.loop import train
    from tests.train_helpers import from_args, tiny

    args = tiny(data, out, **{"model.size": size, "data.seq_len": seq_len, "batch.micro_batch": 8,
                              "batch.global_tokens": 8 * seq_len, "train.max_steps": steps,
                              "train.eval_every": steps, "train.eval_batches": 100_000, "train.log_every": steps,
                              "optim.warmup_steps": max(1, steps // 10)})
    t0 = time.perf_counter()
    res = train(from_args(args))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][-1]
    return {**val, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--size", default="debug")
    ap.add_argument("--encodings", default=",".join(encoding_names()))
    args = ap.parse_args()
    names = args.encodings.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_symbolic_"))
    src = sorted((REPO / "data" / "midi").glob("*.mid"))
    folder = tmp / "in"
    folder.mkdir()
    for c in range(args.copies):
        for f in src:
            shutil.copy(f, folder / f"{c}_{f.name}")
    files = sorted(folder.glob("*.mid"))
    num_notes = sum(len(read_notes(f)) for f in files)
    prep_encoding(names[0], [str(src[0])], tmp / "warm", options_for(names[0]), show_progress=False)  # numba cache

    prep_rows, tps_rows, data = [], [], {}
    for name in names:
        out = tmp / f"ds_{name}"

        def run(name=name, out=out):
            shutil.rmtree(out, ignore_errors=True)
            return prep_encoding(name, [str(folder)], out, options_for(name), workers=1, show_progress=False)

        secs, _ = best_of(args.repeat, run)
        data[name] = out
        ds = Dataset(out)
        m = ds.manifest
        tok = get_tokenizer(m.tokenizer, **m.tokenizer_params)
        docs = [np.asarray(d, np.int64) for d in ds.documents("train")]
        rate = tokens_per_second(encoding(name), tok, docs)
        prep_rows.append((name, secs, len(files) / secs, num_notes / secs))
        tps_rows.append((name, ds.vocab_size, sum(d.size for d in docs), rate))

    print(f"\n{len(files)} MIDI files (data/midi x {args.copies}), {num_notes:,} notes; prep one process, "
          f"best of {args.repeat}\n")
    print("| encoding | prep s | files/s | notes/s | vs amt |")
    print("|---|---|---|---|---|")
    base = next((r[1] for r in prep_rows if r[0] == "amt"), prep_rows[0][1])
    for name, secs, fps, nps in prep_rows:
        print(f"| {name} | {secs:.2f} | {fps:.1f} | {nps:,.0f} | {base / secs:.2f}x |")
    print("\n| encoding | vocab | train tokens | tokens per second of music |")
    print("|---|---|---|---|")
    for name, vocab, ntok, rate in tps_rows:
        print(f"| {name} | {vocab:,} | {ntok:,} | {rate:.1f} |")

    print(f"\nequal compute: decoder {args.size}, {args.steps} steps x {8 * args.seq_len} tokens "
          f"(seq_len {args.seq_len}), validated on the whole val split\n")
    print("| encoding | val loss (nats/token) | bits per token | bits per second of music | train wall s |")
    print("|---|---|---|---|---|")
    for name in names:
        v = train_one(data[name], tmp / f"run_{name}", args.size, args.steps, args.seq_len)
        print(f"| {name} | {v['val_loss']:.3f} | {v['val_bpt']:.3f} | {v.get('bits_per_second', float('nan')):.1f} | "
              f"{v['wall_s']:.1f} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
