"""The three rollout modes, tape in, tapes out; what each does per modality is the modality's
(`amtrain.modalities`), and left-to-right vs denoiser is the family spec's:

    mode       left to right (decoder, LSTM)             denoiser (T5)
    continue   sliding window (text, audio, ids);        UL2 S-denoiser by rounds
               anticipatory loop for MIDI
    infill     MIDI only: AMT anticipation (events of    sentinel spans between prefix and
               the range / instruments become controls)  suffix (text gaps, MIDI / audio range)
    alternate  each iteration continues or in-fills one region of the tape (schedule, or the
               prompt's audio priority scores), stitching the result onto one tape

`rollout(rm, prompt, cfg) -> list of tapes` (one per sample); `write_tapes` writes them.
Lengths: `cfg.length` new tokens, or seconds with `cfg.seconds` (MIDI: onset time; audio:
frames = seconds x the codec's frame rate, K tokens a frame; text has no seconds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.modalities import RolloutConfig, RolloutModel


# --------------------------------------------------------------------------- prompts
def read_prompt(rm: RolloutModel, path: Path, cfg: RolloutConfig, codec=None):
    """-> the prompt tape in the modality's form (see `amtrain.modalities`)."""
    if not path.is_file():
        raise UserError(f"--prompt {path}: no such file")
    return rm.modality.read_prompt(rm, path, cfg, codec)


def write_tapes(rm: RolloutModel, results: list, out: Path, codec=None, name: str = "sample",
                prompt=None) -> list[Path]:
    """Each result as `{name}_{i}.*`; with `prompt` (the tape the rollout started from) a
    modality may also show what was generated (MIDI: a piano roll with the generated notes)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, tape in enumerate(results):
        files += rm.modality.write_tape(rm, tape, out / f"{name}_{i}", codec, prompt)
    return files


# --------------------------------------------------------------------------- entry
def rollout(rm: RolloutModel, prompt, cfg: RolloutConfig) -> list:
    """Run cfg.mode on a prompt tape (see `read_prompt`); one result tape per sample."""
    if cfg.mode == "continue":
        return continue_tape(rm, rm.modality.continuation_tape(rm, prompt), cfg, cfg.num_samples)
    if cfg.mode == "infill":
        return infill_tape(rm, prompt, cfg, cfg.num_samples)
    if "i" in cfg.schedule or cfg.priorities:
        _check_can_infill(rm)
    tape = rm.modality.continuation_tape(rm, prompt)
    return [alternate(rm, tape, replace(cfg, seed=None if cfg.seed is None else cfg.seed + 1000 * s))
            for s in range(cfg.num_samples)]


def _check_can_infill(rm: RolloutModel) -> None:
    if rm.modality.can_infill(rm):
        return
    raise UserError(f"{rm.path}: a {rm.family.name} checkpoint on {rm.modality.name} trained without "
                    "fill-in-the-middle cannot in-fill; in-filling needs a T5 checkpoint (sentinel spans), a "
                    "left-to-right one trained with data.fim_rate > 0, or a decoder trained on MIDI (AMT anticipation)")


def continue_tape(rm: RolloutModel, tape, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    return rm.modality.continue_tape(rm, tape, cfg, num_samples, seed_offset)


def infill_tape(rm: RolloutModel, prompt, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    _check_can_infill(rm)
    return rm.modality.infill_tape(rm, prompt, cfg, num_samples, seed_offset)


def summaries(rm: RolloutModel, prompt, results: list, cfg: RolloutConfig) -> list[tuple[str, list[str]]]:
    """(what each sample added, warnings) against the tape generation started from."""
    before = prompt if cfg.mode == "infill" else rm.modality.continuation_tape(rm, prompt)
    return [rm.modality.describe(rm, before, r, cfg) for r in results]


# --------------------------------------------------------------------------- alternate
def alternate(rm: RolloutModel, tape, cfg: RolloutConfig) -> object:
    """One tape; iteration i continues or in-fills (by the schedule, or the weakest audio chunk
    by priority), stitching the result onto the tape."""
    rng = np.random.default_rng(cfg.seed)
    weak = sorted((p, s, e) for s, e, p in cfg.priorities)
    threshold = float(np.median([p for p, _, _ in weak])) if weak else 0.0
    for i in range(cfg.iterations):
        region: tuple[float, float] | None
        if weak and weak[0][0] < threshold:  # audio: the weakest prompt chunk left is re-generated
            assert cfg.frame_rate is not None  # priorities come with the codec (commands/rollout.py)
            _, s, e = weak.pop(0)
            region = (s / cfg.frame_rate, e / cfg.frame_rate)
            kind = "i"
        else:
            kind = "c" if weak or cfg.priorities else cfg.schedule[i % len(cfg.schedule)]
            region = rm.modality.random_region(rm, tape, cfg, rng) if kind == "i" else None
        if kind == "c":
            tape = continue_tape(rm, tape, cfg, 1, seed_offset=i)[0]
        else:
            tape = infill_tape(rm, rm.modality.infill_prompt(tape, region), replace(cfg, infill_range=region),
                               1, seed_offset=i)[0]
            tape = rm.modality.after_infill(rm, tape)
    return tape
