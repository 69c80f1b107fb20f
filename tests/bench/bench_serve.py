"""Serving throughput and latency: N concurrent short text continuations, three ways, one run.

    PYTHONPATH=. python tests/bench/bench_serve.py [--jobs 32] [--length 64] [--size tiny] [--batch-size 16]

1. `amtrain serve generate --batch-size B` (one worker process): the N jobs submitted at once;
   equally long prompts with the same options run as batches of up to B.
2. the same worker with `--batch-size 1`: one job at a time.
3. `amtrain rollout` in a shell loop: one process per job, one after the other (what a user
   without serving runs).

A randomly initialised decoder of `--size` over the gpt2 tokenizer (speed does not depend on
the weights); prompts are 16-token windows of the bundled KJV text; every job continues by
`--length` tokens with top-k 50, seed 0. Latency of a job = its result written - the moment all
N were submitted (for the loop: its rollout's end - the loop's start); jobs/s = N / the time
to the last result. Workers are started and warm before the clock starts (their start-up is
the loop's per-job cost). A private redis-server on a free port serves the queue.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def prompts(n: int, tokens: int = 16) -> list[str]:
    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer("gpt2")
    ids = tok.encode((REPO / "data" / "kjv" / "kjv_pentateuch.txt").read_text()[:200_000])
    out: list[str] = []
    for start in range(0, len(ids) - tokens, 97):
        text = tok.decode(ids[start:start + tokens])
        if len(tok.encode(text)) == tokens and "\n" not in text:
            out.append(text)
        if len(out) == n:
            return out
    raise RuntimeError("not enough prompts")


def run_worker(ckpt: Path, url: str, queue: str, batch: int, texts: list[str], length: int) -> list[float]:
    from amtrain.serve import client
    from amtrain.serve.queue import Queue

    q = Queue(url, queue)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    w = subprocess.Popen([sys.executable, "-m", "amtrain", "serve", "generate", str(ckpt), "--redis", url, "--queue",
                          queue, "--batch-size", str(batch), "--name", f"bench-{batch}"], env=env,
                         stderr=subprocess.DEVNULL)
    try:
        while not q.r.hlen(q.key("workers")):
            time.sleep(0.05)
        opts = {"length": length, "seed": 0, "top_k": 50}
        t0 = time.time()
        ids = [client.submit(q, opts, text=t)[0] for t in texts]
        while q.r.xlen(q.key("done")) < len(ids):
            time.sleep(0.01)
        lat = []
        for i in ids:
            meta = q.result(i)[0]
            assert meta["status"] == "finished", meta
            lat.append(float(q.job(i)["finished"]) - t0)
        return lat
    finally:
        w.terminate()
        w.wait()


def run_loop(ckpt: Path, texts: list[str], length: int, tmp: Path) -> list[float]:
    for i, t in enumerate(texts):
        (tmp / f"p{i}.txt").write_text(t)
    script = (f"for i in $(seq 0 {len(texts) - 1}); do {sys.executable} -m amtrain rollout {ckpt} --prompt {tmp}/p$i.txt "
              f"--out {tmp}/out$i --length {length} --seed 0 --top-k 50 > /dev/null 2>&1 || exit 1; "
              f"date +%s.%N >> {tmp}/times; done")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    t0 = time.time()
    subprocess.run(["bash", "-c", script], check=True, env=env)
    return [float(x) - t0 for x in (tmp / "times").read_text().split()]


def row(name: str, lat: list[float], base: float | None) -> str:
    jps = len(lat) / max(lat)
    p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
    ratio = f"{jps / base:.1f}x" if base else "1.0x"
    return f"| {name} | {jps:.2f} | {ratio} | {p50:.2f} | {p95:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from tests.test_serve import start_redis, stop

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        import torch

        from amtrain.models.decoder import Decoder
        from amtrain.models.io import save_pretrained
        from amtrain.registry import family
        from amtrain.tokens import get_tokenizer

        tok = get_tokenizer("gpt2")
        torch.manual_seed(0)
        ckpt = save_pretrained(Decoder(family("decoder").config(args.size, vocab_size=tok.vocab_size)), tmp / "ckpt",
                               {"tokenizer": "gpt2", "tokenizer_params": tok.params()})
        texts = prompts(args.jobs)
        proc, port = start_redis(tmp / "redis")
        url = f"redis://127.0.0.1:{port}/0"
        try:
            batched = run_worker(ckpt, url, "batched", args.batch_size, texts, args.length)
            single = run_worker(ckpt, url, "single", 1, texts, args.length)
        finally:
            stop(proc)
        loop = run_loop(ckpt, texts, args.length, tmp)
    print(f"\n{args.jobs} concurrent jobs, {args.length} new tokens each, decoder {args.size} (gpt2 vocab), "
          f"16-token prompts, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| way | jobs/s | vs rollout loop | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|")
    base = len(loop) / max(loop)
    print(row(f"serve generate --batch-size {args.batch_size}", batched, base))
    print(row("serve generate --batch-size 1", single, base))
    print(row("`amtrain rollout` shell loop", loop, None))
    print(json.dumps({"batched": batched, "single": single, "loop": loop}), file=sys.stderr)


if __name__ == "__main__":
    main()
