"""Rollouts during training: `rollout_hook(model, prompts, ...)`, for the trainer to call every N
steps with a fixed set of prompts.

Text: returns the continuations as strings (for the metrics log). MIDI and audio: writes
`run_dir/rollouts/step_<step>/prompt_<i>.mid` (or .wav, through `codec`; the codes .npy
without one) plus each token sequence, and returns the paths. Sampling is seeded (`seed + i` per
prompt) so the same prompts give comparable rollouts across steps; the model is put back in
training mode afterwards (`generate` restores it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from amtrain.rollout.load import MODALITIES, RolloutModel
from amtrain.rollout.run import RolloutConfig, continue_tape, write_tapes


def rollout_hook(model: nn.Module, prompts: list, *, tokenizer, step: int, run_dir: str | Path | None = None,
                 length: int = 64, temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = None,
                 seed: int = 0, codec=None, arch: str = "decoder") -> dict:
    """Continue each prompt (text: str; MIDI: a MidiTape or a .mid path; audio: codes (K, T) or
    a .npz path) by `length` tokens. Returns {"step", "texts": [...]} for text, or
    {"step", "files": [...]} for MIDI / audio (written under run_dir/rollouts/step_<step>/)."""
    modality = MODALITIES.get(tokenizer.name, "tokens")
    rm = RolloutModel(model, {"tokenizer": tokenizer.name}, tokenizer, arch, modality, Path(run_dir or "."))
    cfg = RolloutConfig(length=length, temperature=temperature, top_k=top_k, top_p=top_p)
    out: dict = {"step": step}
    results, added = [], []
    for i, prompt in enumerate(prompts):
        tape, n = _prompt_tape(rm, prompt)
        results.append(continue_tape(rm, tape, cfg, 1, seed_offset=seed + i)[0])
        added.append(n)
    if modality in ("text", "tokens"):  # without the ids _prompt_tape put before the prompt
        out["texts"] = [tokenizer.decode(np.asarray(r)[n:].tolist()) for r, n in zip(results, added, strict=True)]
        return out
    folder = Path(run_dir) / "rollouts" / f"step_{step}"
    out["files"] = [str(p) for p in write_tapes(rm, results, folder, codec, name="prompt")]
    return out


def _prompt_tape(rm: RolloutModel, prompt) -> tuple:
    """(the tape to continue, how many ids were put before the prompt's own): a decoder's text
    prompt opens with the document separator, as every document in its training data does."""
    from amtrain.rollout.run import read_prompt

    if rm.modality == "text" and isinstance(prompt, str):
        ids = np.array(rm.tokenizer.encode(prompt), np.int64)
        return (ids, 0) if rm.arch == "t5" else (np.concatenate([[rm.tokenizer.eot_id], ids]), 1)
    if isinstance(prompt, (str, Path)):
        return read_prompt(rm, Path(prompt), RolloutConfig()), 0
    return prompt, 0
