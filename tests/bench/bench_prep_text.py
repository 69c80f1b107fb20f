"""Benchmark: `prep-text --tokenizer gpt2` throughput against tiktoken's own encode_ordinary_batch,
and shard read throughput against a raw np.memmap read, measured in the same run.

    python tests/bench/bench_prep_text.py [--mb 60] [--threads N]

The corpus is the King James Bible (../shared/data/text/kjv.txt if present, else the bundled
Pentateuch) repeated to >= --mb MB of real text. The baseline is the limit this stage can reach:
tiktoken encoding the very same documents with the same number of threads, with nothing else.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SOURCES = [REPO.parent / "shared/data/text/kjv.txt", REPO / "data/kjv/kjv_pentateuch.txt"]


def build_corpus(folder: Path, mb: int) -> Path:
    src = next(p for p in SOURCES if p.exists()).read_text(encoding="utf-8")
    reps = -(-mb * 1_000_000 // len(src.encode()))
    path = folder / "corpus.txt"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(reps):
            f.write(f"Copy {i}\n\n{src}\n\n")  # distinct headers keep documents distinct per copy
    return path


def best_of(n, fn):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from amtrain.prep.common import default_workers
    from amtrain.prep.text import prep_text, split_documents
    from amtrain.store import Dataset
    from amtrain.tokens import get_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=60)
    ap.add_argument("--threads", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        corpus = build_corpus(tmp, args.mb)
        nbytes = corpus.stat().st_size
        enc = get_tokenizer("gpt2").enc
        docs, _ = split_documents(corpus.read_bytes(), corpus, "paragraph", "text", "replace")
        t_base = best_of(args.repeats, lambda: enc.encode_ordinary_batch(docs, num_threads=args.threads))

        def run_prep():
            shutil.rmtree(tmp / "ds", ignore_errors=True)
            prep_text([str(corpus)], tmp / "ds", workers=args.threads, show_progress=False)

        t_prep = best_of(args.repeats, run_prep)
        print(f"corpus: {nbytes / 1e6:.1f} MB, {len(docs):,} documents, threads={args.threads}")
        print(f"tiktoken encode_ordinary_batch: {t_base:.2f} s  {nbytes / 1e6 / t_base:.2f} MB/s")
        print(f"amtrain prep-text (read, split, hash, encode, write): {t_prep:.2f} s  {nbytes / 1e6 / t_prep:.2f} MB/s")
        print(f"prep-text / tiktoken throughput ratio: {t_base / t_prep:.3f}  (target >= 0.8)")

        files = [tmp / "ds" / r.file for r in Dataset(tmp / "ds").shards("train")]
        mb = sum(f.stat().st_size - 64 for f in files) / 1e6

        def raw_read():
            return sum(int(np.memmap(f, dtype=np.uint16, mode="r", offset=64).sum(dtype=np.uint64)) for f in files)

        ds = Dataset(tmp / "ds")  # manifest parsed once, as a training run does

        def store_read():  # every call re-opens the shards: header checks + memmap
            return sum(int(a.sum(dtype=np.uint64)) for a in ds.tokens("train"))

        def store_open_read():
            return sum(int(a.sum(dtype=np.uint64)) for a in Dataset(tmp / "ds").tokens("train"))

        assert raw_read() == store_read() == store_open_read()
        t_raw, t_store, t_open = (best_of(30, f) for f in (raw_read, store_read, store_open_read))
        print(f"shard read ({mb:.0f} MB): raw np.memmap {mb / t_raw:.0f} MB/s; Dataset.tokens {mb / t_store:.0f} MB/s "
              f"(ratio {t_raw / t_store:.3f}); with Dataset() opened each time {mb / t_open:.0f} MB/s (ratio {t_raw / t_open:.3f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
