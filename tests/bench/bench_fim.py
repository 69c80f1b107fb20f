"""Benchmark: what fill-in-the-middle training costs left to right, and what it buys in the middle.

    python tests/bench/bench_fim.py [--steps 150] [--rates 0,0.5] [--seeds 1337] [--tokenizer gpt2] [--size debug]

The quickstart recipe (the default run config: debug decoder, 8 windows of 128 tokens a step,
the bundled KJV corpus prepped with gpt2) through `amtrain.train.loop.train` in this process
(one rank, ZeRO-2, fp32, one thread), once per data.fim_rate and seed, at equal tokens (same
steps, same batches of windows). Then on every window of the val split (129 tokens, in order):

  * left-to-right loss: mean CE per token of the plain windows (as the trainer's val_loss,
    over the whole split);
  * middle loss: the same val windows cut as FIM training cuts them (`amtrain.data.fim`, seed
    0, non-empty prefix, middle and suffix), mean CE per token of the middle's tokens only, given
      L2R   the plain window (the prefix as context)
      PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <end> rest   (FIM models)
      SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <end> rest   (FIM models)
    the same over each middle's last 4 ids only (next to the suffix, where it helps most),
    and, for FIM models, the CE of the end id that closes the middle (how well it knows when
    to stop).

Prints one markdown row per run and the FIM - plain differences. `--tokenizer ascii` (bytes)
trains ~40x faster per step (a 258-id head), for longer runs in the same time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.config import parse_args  # noqa: E402
from amtrain.data.fim import FimSpec, draw_cuts, legal_cuts, middle_start, permute  # noqa: E402
from amtrain.data.loader import WindowIndex  # noqa: E402
from amtrain.prep.text import prep_text  # noqa: E402
from amtrain.store import Dataset  # noqa: E402
from amtrain.train.export import load_checkpoint_model  # noqa: E402
from amtrain.train.loop import train  # noqa: E402

TAIL = 4  # a middle's last ids, next to the suffix: where the suffix helps most


def val_windows(dataset: Dataset, seq_len: int) -> np.ndarray:
    index = WindowIndex(dataset, "val", seq_len)
    return np.stack([index.window(i).astype(np.int64) for i in range(len(index))])  # (N, T+1)


def cuts(n: int, count: int) -> list[tuple[int, int, int]]:
    """FIM training's cut draw (unit 1), kept when prefix, middle and suffix are non-empty."""
    rng, out = np.random.default_rng(0), []
    while len(out) < count:
        a, b, e = draw_cuts(rng, legal_cuts(n, 0, None, 1, 0), None)
        if 1 <= a < b < e:
            out.append((a, b, e))
    return out


@torch.no_grad()
def token_ce(model, seqs: np.ndarray) -> np.ndarray:
    """CE of every id of seqs (N, L) given the ids before it: (N, L-1), column j for id j+1."""
    out = []
    for batch in np.array_split(seqs, max(1, len(seqs) // 8)):
        x = torch.from_numpy(batch)
        logits, _ = model(x[:, :-1], x[:, 1:])  # (B, L-1, V')
        logits = logits[..., :model.cfg.vocab_size].float()
        out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").numpy())
    return np.concatenate(out)


def middle_ce(mids: list[np.ndarray]) -> tuple[float, float]:
    """(mean CE over all middle ids, over each middle's last TAIL ids: those next to the suffix)."""
    return float(np.concatenate(mids).mean()), float(np.concatenate([m[-TAIL:] for m in mids]).mean())


def evaluate(model, meta: dict, windows: np.ndarray) -> dict[str, float]:
    n = windows.shape[1] - 4
    draws = cuts(n, len(windows))
    plain = token_ce(model, windows)
    res = {"l2r": float(plain.mean())}
    res["mid_l2r"], res["tail_l2r"] = middle_ce([plain[i, a - 1:b - 1] for i, (a, b, _) in enumerate(draws)])
    if "fim" not in meta:
        return res
    spec = FimSpec.from_meta(meta["fim"])
    for name, spm in (("psm", False), ("spm", True)):
        seqs = np.stack([permute(w[:n], *cut, spm, spec) for w, cut in zip(windows, draws, strict=True)])
        ce = token_ce(model, seqs)
        res[f"mid_{name}"], res[f"tail_{name}"] = middle_ce(
            [ce[i, middle_start(*cut) - 1: cut[2] + 2] for i, cut in enumerate(draws)])  # the middle's ids
        res[f"end_{name}"] = float(np.mean([ce[i, e + 2] for i, (_, _, e) in enumerate(draws)]))  # its end id
    return res


def run(data: Path, out: Path, rate: float, seed: int, steps: int, size: str) -> tuple[Path, float, float]:
    start = time.perf_counter()
    res = train(parse_args(["--data", str(data), "--train.out_dir", str(out), "--train.max_steps", str(steps),
                            "--model.size", size,
                            "--data.fim_rate", str(rate), "--train.seed", str(seed), "--train.progress", "false",
                            "--train.eval_every", "0", "--train.checkpoint_every", "0"]))
    return res.checkpoint, res.losses[steps], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rates", default="0,0.5")
    parser.add_argument("--seeds", default="1337")
    parser.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "ascii"))
    parser.add_argument("--size", default="debug", help="model.size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "kjv"
        prep_text([str(REPO / "data/kjv/kjv_pentateuch.txt")], data, tokenizer=args.tokenizer, show_progress=False)
        dataset = Dataset(data)
        windows = val_windows(dataset, 128)
        for seed in seeds:
            for rate in rates:
                ckpt, last, secs = run(data, Path(tmp) / f"r{rate}_s{seed}", rate, seed, args.steps, args.size)
                model, meta = load_checkpoint_model(ckpt)
                rows.append((rate, seed, last, secs, evaluate(model, meta, windows)))
    print(f"\n{args.size} decoder, {args.tokenizer}: {args.steps} steps x 8 x 128 tokens each; {len(windows)} val windows of 129 tokens\n")
    keys = ("mid_l2r", "mid_psm", "mid_spm", "tail_l2r", "tail_psm", "tail_spm", "end_psm", "end_spm")
    print("| fim_rate | seed | last train loss | val L2R loss | middle: L2R | PSM | SPM "
          f"| last {TAIL} of middle: L2R | PSM | SPM | end id: PSM | SPM | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, seed, last, secs, r in rows:
        cells = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys)
        print(f"| {rate} | {seed} | {last:.3f} | {r['l2r']:.4f} | {cells} | {secs:.0f} |")
    base = {seed: r["l2r"] for rate, seed, _, _, r in rows if rate == 0}
    for rate, seed, _, _, r in rows:
        if rate and seed in base:
            print(f"fim_rate {rate}, seed {seed}: val L2R loss {r['l2r'] - base[seed]:+.4f} vs fim_rate 0")


if __name__ == "__main__":
    main()
