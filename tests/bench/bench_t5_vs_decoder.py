"""Benchmark: T5 training tokens/s against the parallel-block decoder at the same parameter count.

    python tests/bench/bench_t5_vs_decoder.py [--batch-size 8] [--inputs-length 512] [--repeats 5]

Both models train in plain torch (forward + backward + AdamW, fp32, one thread) on batches of
the bundled KJV corpus (gpt2 tokens), in the same process:
  - T5 `debug` (D 64, 2+2 layers) on R span corruption (density 0.15, span 3): inputs S and
    targets T = 114 at S = 512 -> S + T tokens per example;
  - a decoder with the same non-embedding parameter count (D 64, 4 parallel blocks, F 256) on
    windows of S + T tokens.
Tokens/s counts every input and target token (T5) or every position (decoder). Prints a
markdown table; the ratio T5 / decoder is the figure that carries across machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from amtrain.data.span_corruption import (  # noqa: E402
    Denoiser,
    DenoisingBatcher,
    T5Vocab,
    compute_input_and_target_lengths,
)
from amtrain.models.decoder import Decoder, DecoderConfig  # noqa: E402
from amtrain.models.t5 import T5  # noqa: E402
from amtrain.prep.text import prep_text  # noqa: E402
from amtrain.registry import family  # noqa: E402
from amtrain.store.dataset import Dataset  # noqa: E402


def step_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, optimizer, batch: dict):
    def step():
        loss = model(**batch)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--inputs-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, S = args.batch_size, args.inputs_length
    denoiser = Denoiser("R", 0.15, 3.0)
    T = compute_input_and_target_lengths(S, denoiser.noise_density, denoiser.mean_span_length)[1]

    with tempfile.TemporaryDirectory() as tmp:
        prep_text([str(REPO / "data/kjv/kjv_pentateuch.txt")], Path(tmp), tokenizer="gpt2",
                  show_progress=False)
        ds = Dataset(tmp)
        vocab = T5Vocab(ds.vocab_size)
        b = DenoisingBatcher(ds.tokens("train"), vocab, S, T, seed=0).batch(B, [denoiser])
        t5_batch = {"input_ids": torch.from_numpy(b.input_ids),
                    "attention_mask": torch.from_numpy(b.attention_mask),
                    "labels": torch.from_numpy(b.labels), "return_logits": False}
        stream = np.concatenate([np.asarray(a, dtype=np.int64) for a in ds.tokens("train")])
        starts = np.random.default_rng(0).integers(0, len(stream) - S - T - 1, B)
        windows = torch.from_numpy(np.stack([stream[s:s + S + T + 1] for s in starts]))
        dec_batch = {"idx": windows[:, :-1], "targets": windows[:, 1:]}

        torch.manual_seed(0)
        t5 = T5(family("t5").config("debug", vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                                   decoder_start_token_id=vocab.pad_id))
        decoder = Decoder(DecoderConfig(vocab_size=ds.vocab_size, num_layers=4, num_heads=4,
                                        d_model=64, d_ff=256, max_seq_len=S + T))
        rows = []
        for name, model, batch, tokens in (("T5 debug", t5, t5_batch, B * (S + T)),
                                           ("decoder (4 x 64)", decoder, dec_batch, B * (S + T))):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            seconds = step_seconds(train_step(model, optimizer, batch), args.repeats)
            rows.append((name, model.num_params(non_embedding=True), model.num_params(),
                         seconds, tokens / seconds))
    print(f"B={B}, T5 inputs {S} + targets {T}, decoder context {S + T}, fp32, 1 thread\n")
    print("| model | non-embedding params | params | step s | tokens/s |")
    print("|---|---|---|---|---|")
    for name, non_emb, total, seconds, tps in rows:
        print(f"| {name} | {non_emb:,} | {total:,} | {seconds:.2f} | {tps:,.0f} |")
    print(f"\nT5 / decoder tokens/s: {rows[0][4] / rows[1][4]:.2f}")


if __name__ == "__main__":
    main()
