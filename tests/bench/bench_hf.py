"""`amtrain sample`'s decode loop vs transformers `generate` on the same exported weights, measured
in the same run.

    PYTHONPATH=. python tests/bench/bench_hf.py [--size small] [--block parallel] [--prompt 128] [--new 128] [--threads 1] [--batch 1] [--vocab 50257]

A `size` decoder (gpt2 vocabulary unless --vocab, random init: speed does not depend on the weights) is
exported with `amtrain.hf.export_hf` (parallel -> PhiForCausalLM, serial -> Starcoder2ForCausalLM,
gpt2 -> GPT2LMHeadModel) and loaded with `AutoModelForCausalLM.from_pretrained`. Both continue
the same prompt greedily by `new` tokens (KV cache on both sides; transformers with its default
attention implementation, sdpa); the tokens must be identical (checked). Tokens/s counts the
generated tokens over the whole call (prefill included); best of `--repeats` calls each.
Prints a markdown table; figures go in docs/benchmarks.md (## hugging face export).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from amtrain.generate.loop import generate
from amtrain.hf import export_hf
from amtrain.models.decoder import Decoder
from amtrain.registry import family

GPT2_VOCAB = 50257


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--block", default="parallel", choices=("parallel", "serial", "gpt2"))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="55028: the AMT / midi vocabulary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = family("decoder").config(args.size, vocab_size=args.vocab, max_seq_len=args.prompt + args.new,
                                   block=args.block, scale_attn_by_inverse_layer_idx=args.block == "gpt2")
    model = Decoder(cfg).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as d:
        tokenizer = {GPT2_VOCAB: "gpt2", 55028: "midi"}[args.vocab]
        export_hf(model, {"tokenizer": tokenizer, "tokenizer_params": {}}, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as amtrain sample does

    def ours():
        return generate(model, prompt, args.new, temperature=0)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=args.new, do_sample=False)

    ours(), theirs()  # warm-up
    ours_s, a = best_of(ours, args.repeats)
    theirs_s, b = best_of(theirs, args.repeats)
    assert torch.equal(a, b), "amtrain and transformers greedy decodes disagree"
    n = args.new * args.batch
    print(f"decoder {args.size} {args.block} ({model.num_params():,} params) as {type(hf).__name__}, batch "
          f"{args.batch}, prompt {args.prompt} + {args.new} new, {args.threads} thread(s), torch "
          f"{torch.__version__}, transformers {transformers.__version__}, fp32 CPU, best of {args.repeats}")
    print("| decoder loop | seconds | generated tokens/s |")
    print("|---|---|---|")
    print(f"| amtrain (`amtrain sample --temperature 0`) | {ours_s:.2f} | {n / ours_s:.1f} |")
    print(f"| transformers `generate` (greedy) | {theirs_s:.2f} | {n / theirs_s:.1f} |")
    print(f"amtrain / transformers tokens/s: {theirs_s / ours_s:.2f}x (identical tokens)")


if __name__ == "__main__":
    main()
