"""Rollouts during training: `rollout_hook(model, prompts, ...)`, for the trainer to call every N
steps with a fixed set of prompts.

Modalities with text output (`Modality.text_output`: text, plain ids) return the continuations
as strings (for the metrics log); the others (MIDI, audio) write
`run_dir/rollouts/step_<step>/prompt_<i>.mid` (or .wav, through `codec`: the trainer loads
`train.codec_path`; the codes .npy alone without one) plus each token sequence, and return the
paths. Sampling is seeded (`seed + i` per
prompt) so the same prompts give comparable rollouts across steps; the model is put back in
training mode afterwards (`generate` restores it).

Each rollout also measures what was generated (`amtrain.evaluate.sets`: tokens and units per
sample, repetition, distinct-n, invalid ids, and for symbolic music pitch-class entropy,
polyphony, note density, ...): the means go into the returned dict as numbers, so the trainer
logs them in metrics.jsonl (kind "rollout") and TensorBoard (rollout/<name>).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amtrain.modalities import RolloutConfig, RolloutModel
from amtrain.models.base import SequenceModel
from amtrain.registry import family_of, modality_of


def rollout_hook(model: SequenceModel, prompts: list, *, tokenizer, step: int, run_dir: str | Path | None = None,
                 length: int = 64, temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = None,
                 seed: int = 0, codec=None) -> dict:
    """Continue each prompt (what `Modality.training_prompt` made: a text string, ids, or a
    prompt file) by `length` tokens. Returns {"step", "texts": [...]} for text output, or
    {"step", "files": [...]} (written under run_dir/rollouts/step_<step>/)."""
    modality = modality_of(tokenizer.name)
    rm = RolloutModel(model, {"tokenizer": tokenizer.name}, tokenizer, family_of(model), modality,
                      Path(run_dir or "."))
    cfg = RolloutConfig(length=length, temperature=temperature, top_k=top_k, top_p=top_p)
    out: dict = {"step": step}
    tapes, results, added = [], [], []
    for i, prompt in enumerate(prompts):
        tape, n = modality.hook_tape(rm, prompt, cfg, codec)
        results.append(modality.continue_tape(rm, tape, cfg, 1, seed_offset=seed + i)[0])
        tapes.append(tape)
        added.append(n)
    from amtrain.evaluate.sets import flat, set_stats

    generated = [modality.tape_ids(rm, modality.generated_part(rm, t, r)) for t, r in zip(tapes, results, strict=True)]
    out |= flat(set_stats(modality, tokenizer, generated))
    if modality.text_output:  # without the ids hook_tape put before the prompt
        out["texts"] = [tokenizer.decode(np.asarray(r)[n:].tolist()) for r, n in zip(results, added, strict=True)]
        return out
    folder = Path(run_dir or ".") / "rollouts" / f"step_{step}"
    out["files"] = [str(p) for i, (tape, prompt) in enumerate(zip(results, tapes, strict=True))
                    for p in modality.write_tape(rm, tape, folder / f"prompt_{i}", codec, prompt)]
    return out
