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

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.modalities import RolloutModel

MODES = ("continue", "infill", "alternate")


@dataclass
class RolloutConfig:
    mode: str = "continue"
    length: float = 256
    """New material per continuation: tokens, or seconds when `seconds`."""
    seconds: bool = False
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 0
    use_cache: bool = True
    stride: int | None = None
    """Sliding window: new tokens per window after the first (default context // 2)."""
    infill_range: tuple[float, float] | None = None
    """Seconds [start, end) to regenerate (MIDI, audio)."""
    control_instruments: tuple[int, ...] = ()
    """MIDI decoder in-filling: instruments (0-127, drums 128) kept as controls from the range start."""
    gap_marker: str = "<gap>"
    postfix_repeat: int = 1
    """T5 in-filling of `prefix<gap>postfix`: the postfix recurs N times, a gap before each."""
    denoiser: str = "X"
    """T5 in-filling mode token: R or X (S is continuation)."""
    max_span: int = 128
    """T5 in-filling: longest span (tokens) where the gap length is free (text, MIDI)."""
    schedule: str = "ci"
    """Alternate: c = continue, i = in-fill, cycled over the iterations."""
    iterations: int = 4
    t5_context: int = 512
    """T5 continuation: encoder input tokens per round (the prefix window)."""
    priorities: list[tuple[int, int, float]] = field(default_factory=list)
    """Alternate, audio: (start_frame, end_frame, priority) chunks of the prompt."""
    frame_rate: float | None = None
    """Audio codec frames per second (from the codec)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.length <= 0 or self.num_samples < 1 or self.iterations < 1 or self.postfix_repeat < 1:
            raise UserError("--length, --num-samples, --iterations and --postfix-repeat must be positive")
        if set(self.schedule) - {"c", "i"} or not self.schedule:
            raise UserError(f"--schedule {self.schedule!r}: letters c (continue) and i (in-fill), e.g. 'cci'")
        if self.denoiser not in ("R", "X"):
            raise UserError(f"--denoiser {self.denoiser!r}: R or X")

    def sampling(self, seed_offset: int = 0) -> dict:
        seed = None if self.seed is None else self.seed + seed_offset
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": seed,
                "use_cache": self.use_cache}


# --------------------------------------------------------------------------- prompts
def read_prompt(rm: RolloutModel, path: Path, cfg: RolloutConfig, codec=None):
    """-> the prompt tape in the modality's form (see `amtrain.modalities`)."""
    if not path.is_file():
        raise UserError(f"--prompt {path}: no such file")
    return rm.modality.read_prompt(rm, path, cfg, codec)


def write_tapes(rm: RolloutModel, results: list, out: Path, codec=None, name: str = "sample") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, tape in enumerate(results):
        files += rm.modality.write_tape(rm, tape, out / f"{name}_{i}", codec)
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
    if rm.modality.can_infill(rm.family):
        return
    raise UserError(f"{rm.path}: a {rm.family.name} checkpoint on {rm.modality.name} cannot in-fill; in-filling "
                    "needs a T5 checkpoint (text, MIDI, audio: sentinel spans) or a decoder trained on MIDI "
                    "(AMT anticipation)")


def continue_tape(rm: RolloutModel, tape, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    return rm.modality.continue_tape(rm, tape, cfg, num_samples, seed_offset)


def infill_tape(rm: RolloutModel, prompt, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    _check_can_infill(rm)
    return rm.modality.infill_tape(rm, prompt, cfg, num_samples, seed_offset)


# --------------------------------------------------------------------------- alternate
def alternate(rm: RolloutModel, tape, cfg: RolloutConfig) -> object:
    """One tape; iteration i continues or in-fills (by the schedule, or the weakest audio chunk
    by priority), stitching the result onto the tape."""
    rng = np.random.default_rng(cfg.seed)
    weak = sorted((p, s, e) for s, e, p in cfg.priorities)
    threshold = float(np.median([p for p, _, _ in weak])) if weak else None
    for i in range(cfg.iterations):
        if weak and weak[0][0] < threshold:  # audio: the weakest prompt chunk left is re-generated
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
