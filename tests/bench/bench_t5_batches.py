"""Benchmark: building T5 denoising batches vs one training step of the same batch.

    python tests/bench/bench_t5_batches.py [--batch-size 8] [--inputs-length 512] [--repeats 10]

Preps the bundled KJV corpus (gpt2 tokens) into a temporary dataset, then for several
curriculum settings measures, in the same process and thread budget:
  - batch: DenoisingBatcher.batch (window reads, masks, sentinels, padding) for B examples;
  - step:  forward + backward + AdamW step of the debug T5 on that batch, on the training
           path (return_logits=False: the LM head only at labelled positions).
Prints a markdown table with medians and the ratio step / batch (target: >= 20x, i.e. the
loader never starves training).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.data.curriculum import Curriculum, CurriculumConfig  # noqa: E402
from amtrain.data.span_corruption import (  # noqa: E402
    DenoisingBatcher,
    T5Vocab,
    required_targets_length,
)
from amtrain.models.t5 import T5  # noqa: E402
from amtrain.prep.text import prep_text  # noqa: E402
from amtrain.registry import family  # noqa: E402
from amtrain.store.dataset import Dataset  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--inputs-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        prep_text([str(REPO / "data/kjv/kjv_pentateuch.txt")], Path(tmp), tokenizer="gpt2",
                  show_progress=False)
        ds = Dataset(tmp)
        vocab = T5Vocab(ds.vocab_size)
        curriculum_cfg = CurriculumConfig(mode="schedule", schedule_steps=100)
        targets_length = required_targets_length(args.inputs_length, curriculum_cfg.all_denoisers())
        cfg = family("t5").config("debug", vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                                 decoder_start_token_id=vocab.pad_id)
        model = T5(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        print(f"debug T5: {model.num_params():,} params, vocab {cfg.padded_vocab_size}, "
              f"B={args.batch_size}, inputs {args.inputs_length}, targets {targets_length}, "
              f"threads {args.threads}\n")
        print("| setting | unit | batch ms | step ms | step / batch |")
        print("|---|---|---|---|---|")
        curriculum = Curriculum(curriculum_cfg)
        for label, step, unit in (("level 0 (R .8 / X .1 / S .1)", 0, 1),
                                  ("level 1 (R .4 / X .4 / S .2)", 100, 1),
                                  ("level 1, unit=3 (MIDI events)", 100, 3)):
            batcher = DenoisingBatcher(ds.tokens("train"), vocab, args.inputs_length,
                                       targets_length, unit=unit, seed=0)
            batch_s, step_s = measure(batcher, curriculum.decide(step), model, optimizer, args)
            print(f"| {label} | {unit} | {batch_s * 1e3:.2f} | {step_s * 1e3:.0f} | "
                  f"{step_s / batch_s:.0f}x |")


def measure(batcher, decision, model, optimizer, args) -> tuple[float, float]:
    """(median seconds to build a batch, median seconds of a training step on such a batch)."""
    batch_s = median_seconds(
        lambda: batcher.batch(args.batch_size, decision.denoisers, decision.weights), args.repeats)
    b = batcher.batch(args.batch_size, decision.denoisers, decision.weights)
    tensors = {"input_ids": torch.from_numpy(b.input_ids),
               "attention_mask": torch.from_numpy(b.attention_mask),
               "labels": torch.from_numpy(b.labels)}

    def train_step():
        loss = model(**tensors, return_logits=False)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch_s, median_seconds(train_step, max(3, args.repeats // 3))

if __name__ == "__main__":
    main()
