"""The three rollout modes over every (architecture, modality) pair, tape in, tapes out.

    mode       decoder                                   T5
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
import torch

from amtrain.errors import UserError
from amtrain.rollout.load import RolloutModel
from amtrain.rollout.tapes import MidiTape

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
    """-> the prompt tape (text/tokens: list of id segments split at gaps; midi: MidiTape;
    audio: codes (K, T))."""
    from amtrain.rollout import tapes

    if not path.is_file():
        raise UserError(f"--prompt {path}: no such file")
    if rm.modality == "midi":
        return tapes.read_midi_prompt(path)
    if rm.modality == "audio":
        if codec is None and path.suffix.lower() in tapes.AUDIO_SUFFIXES:
            raise UserError("an audio prompt needs the codec: pass --codec-path")
        return tapes.read_audio_prompt(path, rm.tokenizer, codec)
    if rm.modality == "text":
        return tapes.read_text_prompt(path, rm.tokenizer, cfg.gap_marker)
    return tapes.split_gaps(tapes.check_ids(tapes.read_ids(path), rm.tokenizer.vocab_size, path))


def write_tapes(rm: RolloutModel, results: list, out: Path, codec=None, name: str = "sample") -> list[Path]:
    from amtrain.rollout import tapes

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, tape in enumerate(results):
        stem = out / f"{name}_{i}"
        if rm.modality == "midi":
            files += tapes.write_midi_tape(tape, stem)
        elif rm.modality == "audio":
            files += tapes.write_audio_tape(tape, rm.tokenizer, codec, stem) if codec is not None else \
                [tapes.save_npy(rm.tokenizer.encode(tape).astype(np.int64), stem)]
        elif rm.modality == "text":
            files += tapes.write_text(tape, rm.tokenizer, stem)
        else:
            ids = np.asarray(tape, np.int64)
            from amtrain.fileio import write_bytes_atomic

            write_bytes_atomic(stem.with_suffix(".txt"), (" ".join(map(str, ids.tolist())) + "\n").encode())
            files += [stem.with_suffix(".txt"), tapes.save_npy(ids, stem)]
    return files


# --------------------------------------------------------------------------- entry
def rollout(rm: RolloutModel, prompt, cfg: RolloutConfig) -> list:
    """Run cfg.mode on a prompt tape (see `read_prompt`); one result tape per sample."""
    if cfg.mode == "continue":
        return continue_tape(rm, _no_gaps(rm, prompt), cfg, cfg.num_samples)
    if cfg.mode == "infill":
        return infill_tape(rm, prompt, cfg, cfg.num_samples)
    if "i" in cfg.schedule or cfg.priorities:
        _check_can_infill(rm)
    return [alternate(rm, _no_gaps(rm, prompt), replace(cfg, seed=None if cfg.seed is None else cfg.seed + 1000 * s))
            for s in range(cfg.num_samples)]


def _no_gaps(rm: RolloutModel, prompt):
    if isinstance(prompt, list):
        if len(prompt) > 1:
            raise UserError("the prompt has gap markers; they are for --mode infill")
        ids = prompt[0]
        if rm.modality == "text" and not rm.is_t5:
            ids = np.concatenate([[rm.tokenizer.eot_id], ids])  # documents start with end-of-text
        return ids.astype(np.int64)
    return prompt


AUTOREGRESSIVE = ("decoder", "lstm")  # left-to-right LMs: continuation, and AMT infill on MIDI


def _require_autoregressive(rm: RolloutModel) -> None:
    if rm.arch not in AUTOREGRESSIVE:
        raise UserError(f"{rm.path}: rollout samples from decoder, LSTM and T5 checkpoints, not {rm.arch}")


def _check_can_infill(rm: RolloutModel) -> None:
    if rm.is_t5 or (rm.modality == "midi" and rm.arch in AUTOREGRESSIVE):
        return
    raise UserError(f"{rm.path}: a {rm.arch} checkpoint on {rm.modality} cannot in-fill; in-filling needs a T5 "
                    "checkpoint (text, MIDI, audio: sentinel spans) or a decoder trained on MIDI (AMT anticipation)")


# --------------------------------------------------------------------------- continue
def continue_tape(rm: RolloutModel, tape, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    if rm.modality == "midi":
        return _continue_midi(rm, tape, cfg, num_samples, seed_offset)
    if rm.modality == "audio":
        return _continue_audio(rm, tape, cfg, num_samples, seed_offset)
    if cfg.seconds:
        raise UserError("--seconds needs a MIDI or audio checkpoint; give --length in tokens for text")
    n = int(cfg.length)
    if rm.is_t5:
        return list(_t5_continue(rm, tape, n, num_samples, cfg, seed_offset))
    header = 1 if rm.modality == "text" else 0
    return list(_decoder_continue(rm, tape, n, num_samples, cfg, seed_offset, header=header).numpy())


def _decoder_continue(rm, ids, n, num_samples, cfg, seed_offset, header=0, unit=1, processor=None, forced=None):
    from amtrain.generate.window import generate_long

    _require_autoregressive(rm)
    dev = next(rm.model.parameters()).device
    x = torch.tensor(np.tile(ids, (num_samples, 1)), dtype=torch.long, device=dev)
    return generate_long(rm.model, x, n, stride=cfg.stride, header=header, unit=unit,
                         logits_processor=processor, forced=forced, **cfg.sampling(seed_offset)).cpu()


def _t5_continue(rm, ids, n, num_samples, cfg, seed_offset, header=0, unit=1, inner_for=None, forced=None):
    from amtrain.generate.t5 import t5_continue

    stride = cfg.stride if cfg.stride is not None else cfg.t5_context // 2
    stride = max(unit, stride // unit * unit)
    return t5_continue(rm.model, rm.t5_vocab(), ids, n, num_samples, context=cfg.t5_context, stride=stride,
                       header=header, unit=unit, inner_for=inner_for, forced=forced, **cfg.sampling(seed_offset))


def audio_frames(cfg: RolloutConfig, seconds: float) -> int:
    if cfg.frame_rate is None:
        raise UserError("lengths in seconds for audio need the codec's frame rate: pass --codec-path")
    return max(1, round(seconds * cfg.frame_rate))


def _continue_audio(rm, codes, cfg, num_samples, seed_offset):
    from amtrain.generate.grammar import CodebookConstraint
    from amtrain.rollout.tapes import delay_forced, delay_prefix, stream_codes

    tok = rm.tokenizer
    K = tok.num_codebooks
    frames = audio_frames(cfg, cfg.length) if cfg.seconds else max(1, int(cfg.length) // K)
    n = (frames + (K - 1 if tok.layout == "delay" else 0)) * K
    stream, forced = delay_prefix(codes, tok), delay_forced(codes, tok)
    if rm.is_t5:
        tapes = _t5_continue(rm, stream, n, num_samples, cfg, seed_offset, unit=K,
                             inner_for=lambda t: CodebookConstraint(K, tok.codebook_size), forced=forced)
        return [stream_codes(t, tok) for t in tapes]
    ids = np.concatenate([[tok.eot_id], stream])
    out = _decoder_continue(rm, ids, n, num_samples, cfg, seed_offset, header=1, unit=K,
                            processor=CodebookConstraint(K, tok.codebook_size, header=1), forced=forced)
    return [stream_codes(t[1:], tok) for t in out.numpy()]


def _continue_midi(rm, tape: MidiTape, cfg, num_samples, seed_offset):
    from amtrain.midi.tokenize import pad
    from amtrain.rollout.amt import amt_generate, is_control
    from amtrain.tokens.midi import REST, TIME_RESOLUTION

    tri = tape.triples
    ev = tri[~is_control(tri)]
    now = int(ev[:, 0].max()) if len(ev) else 0
    if rm.is_t5:
        if cfg.seconds:
            raise UserError("T5 MIDI continuation takes --length in tokens (whole events: 3 tokens each)")
        return _t5_continue_midi(rm, tape, cfg, num_samples, seed_offset)
    _require_autoregressive(rm)
    if len(tri) and not is_control(tri).any() and not (tri[:, 2] == REST).any():
        tri = pad(tri, now)  # a MIDI file's events: REST padding as in training
    end = now + round(cfg.length * TIME_RESOLUTION) if cfg.seconds else None
    max_events = event_cap(cfg.length) if cfg.seconds else max(1, int(cfg.length) // 3)
    flag, tapes = amt_generate(rm.model, tri, tri[:0], num_samples, _amt_sampling(cfg, seed_offset),
                               floor_time=now, end_time=end, max_new_events=max_events)
    return [MidiTape(flag, t) for t in tapes]


MAX_EVENTS_PER_SECOND = 100  # a stop for a model that never moves time on (dense piano ~10-30/s)


def event_cap(seconds: float) -> int:
    """Most events sampled for a span given in seconds: the stop rule is the end time, this only
    bounds a degenerate model that keeps every onset at the current time."""
    return max(1, round(MAX_EVENTS_PER_SECOND * seconds))


def _amt_sampling(cfg, seed_offset):
    from amtrain.rollout.amt import AmtSampling

    s = cfg.sampling(seed_offset)
    return AmtSampling(s["temperature"], s["top_k"], s["top_p"], s["seed"], s["use_cache"], cfg.stride)


def _t5_continue_midi(rm, tape: MidiTape, cfg, num_samples, seed_offset):
    from amtrain.generate.grammar import MidiConstraint, current_time

    n = max(3, int(cfg.length) // 3 * 3)
    ids = tape.ids()

    def inner_for(t: np.ndarray):
        body = torch.tensor(t[:, 1:1 + (t.shape[1] - 1) // 3 * 3])
        return MidiConstraint(header=0, floor=current_time(body, 0))

    out = _t5_continue(rm, ids, n, num_samples, cfg, seed_offset, header=1, unit=3, inner_for=inner_for)
    return [MidiTape(int(t[0]), t[1:].reshape(-1, 3)) for t in out]


# --------------------------------------------------------------------------- infill
def infill_tape(rm: RolloutModel, prompt, cfg: RolloutConfig, num_samples: int, seed_offset: int = 0) -> list:
    _check_can_infill(rm)
    if rm.modality == "midi":
        if cfg.infill_range is None and not cfg.control_instruments:
            raise UserError("MIDI in-filling needs --infill-range START:END (seconds) or --control-instruments")
        if rm.is_t5:
            return _t5_infill_midi(rm, prompt, cfg, num_samples, seed_offset)
        return _amt_infill(rm, prompt, cfg, num_samples, seed_offset)
    if rm.modality == "audio":
        return _t5_infill_audio(rm, prompt, cfg, num_samples, seed_offset)
    from amtrain.generate.t5 import t5_infill

    segments = prompt if isinstance(prompt, list) else [prompt]
    if cfg.postfix_repeat > 1:
        if len(segments) != 2:
            raise UserError("--postfix-repeat needs a prompt with one gap: prefix<gap>postfix")
        segments = [segments[0]] + [segments[1]] * cfg.postfix_repeat
    return t5_infill(rm.model, rm.t5_vocab(), segments, num_samples, mode=cfg.denoiser, max_span=cfg.max_span,
                     **cfg.sampling(seed_offset))


def _range_bins(cfg, tri) -> tuple[int, int]:
    from amtrain.rollout.amt import triple_times
    from amtrain.tokens.midi import TIME_RESOLUTION

    if cfg.infill_range is None:
        return 0, int(triple_times(tri).max()) + 1 if len(tri) else 0
    a, b = (round(s * TIME_RESOLUTION) for s in cfg.infill_range)
    if not 0 <= a < b:
        raise UserError(f"--infill-range {cfg.infill_range[0]}:{cfg.infill_range[1]}: need 0 <= START < END")
    return a, b


def _amt_infill(rm, tape: MidiTape, cfg, num_samples, seed_offset):
    """Events before the range are the prompt; events at/after its end, and events of the
    control instruments inside it, become controls; the decoder generates the range."""
    from amtrain.midi.tokenize import anticipate, pad
    from amtrain.rollout.amt import amt_generate, event_instruments
    from amtrain.tokens.midi import CONTROL_OFFSET, REST, TIME_RESOLUTION

    ev = tape.events()
    ev = ev[ev[:, 2] != REST]
    a, b = _range_bins(cfg, ev)
    t = ev[:, 0]
    inside_kept = np.isin(event_instruments(ev), list(cfg.control_instruments)) & (t >= a)
    history = ev[t < a]
    controls = ev[(t >= b) | inside_kept] + CONTROL_OFFSET
    prompt, controls = anticipate(pad(history, a), controls)
    flag, tapes = amt_generate(rm.model, prompt, controls, num_samples, _amt_sampling(cfg, seed_offset),
                               floor_time=a, end_time=b, max_new_events=event_cap((b - a) / TIME_RESOLUTION))
    return [MidiTape(flag, tp) for tp in tapes]


def _t5_infill_midi(rm, tape: MidiTape, cfg, num_samples, seed_offset):
    from amtrain.generate.grammar import MidiConstraint
    from amtrain.generate.t5 import t5_infill
    from amtrain.midi.tokenize import pad
    from amtrain.rollout.amt import is_control, triple_times
    from amtrain.tokens.midi import MAX_TIME

    tri = tape.triples
    if not is_control(tri).any() and len(tri):
        tri = pad(tri, int(triple_times(tri).max()))
    if len(tri) and triple_times(tri).max() >= MAX_TIME:
        raise UserError("T5 MIDI in-filling works inside one AMT sequence: the prompt must be shorter than 100 s")
    a, b = _range_bins(cfg, tri)
    t = triple_times(tri)
    prefix = np.concatenate([[tape.flag], tri[t < a].ravel()])
    suffix = tri[t >= b].ravel()
    out = t5_infill(rm.model, rm.t5_vocab(), [prefix, suffix], num_samples, mode=cfg.denoiser, unit=3,
                    inner=MidiConstraint(header=0, floor=a, ceiling=b), max_span=cfg.max_span // 3 * 3,
                    **cfg.sampling(seed_offset))
    return [MidiTape(int(ids[0]), ids[1:].reshape(-1, 3)) for ids in out]


def _t5_infill_audio(rm, codes, cfg, num_samples, seed_offset):
    from amtrain.generate.grammar import CodebookConstraint
    from amtrain.generate.t5 import t5_infill

    tok = rm.tokenizer
    K = tok.num_codebooks
    if cfg.infill_range is None:
        raise UserError("audio in-filling needs --infill-range START:END (seconds)")
    a, b = (audio_frames(cfg, s) if s > 0 else 0 for s in cfg.infill_range)
    if not 0 <= a < b <= codes.shape[1]:
        raise UserError(f"--infill-range {cfg.infill_range}: frames [{a}, {b}) must lie inside the prompt's "
                        f"{codes.shape[1]} frames")
    # delay: step s holds codebook k of frame s - k, so frames [a, b) live in steps [a, b + K - 1);
    # inside the span, every id of a frame outside [a, b) (or a pad) is forced to the prompt's
    stream = tok.encode(codes).astype(np.int64)
    ext = K - 1 if tok.layout == "delay" else 0
    lo, hi = a * K, (b + ext) * K
    frame = np.arange(lo, hi) // K - np.arange(lo, hi) % K * (ext > 0)
    forced = {j: int(stream[lo + j]) for j in np.flatnonzero((frame < a) | (frame >= b)).tolist()}
    out = t5_infill(rm.model, rm.t5_vocab(), [stream[:lo], stream[hi:]], num_samples, mode=cfg.denoiser,
                    unit=K, inner=CodebookConstraint(K, tok.codebook_size), lengths=[hi - lo], forced=forced,
                    **cfg.sampling(seed_offset))
    return [tok.codes(s) for s in out]


# --------------------------------------------------------------------------- alternate
def alternate(rm: RolloutModel, tape, cfg: RolloutConfig) -> object:
    """One tape; iteration i continues or in-fills (see `choose`), stitching onto the tape."""
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
            region = _random_region(rm, tape, cfg, rng) if kind == "i" else None
        if kind == "c":
            tape = continue_tape(rm, tape, cfg, 1, seed_offset=i)[0]
        else:
            tape = infill_tape(rm, _as_infill_prompt(rm, tape, region, cfg), replace(cfg, infill_range=region),
                               1, seed_offset=i)[0]
            tape = _flatten_controls(rm, tape)
    return tape


def _flatten_controls(rm, tape):
    """After a decoder MIDI in-fill the suffix rides along as controls; the next iteration
    must see it as plain events again (sorted by onset, RESTs dropped: continuation re-pads)."""
    if rm.modality != "midi" or rm.is_t5:
        return tape
    from amtrain.tokens.midi import AUTOREGRESS, REST

    ev = tape.events()
    ev = ev[ev[:, 2] != REST]
    return MidiTape(AUTOREGRESS, ev[np.argsort(ev[:, 0], kind="stable")])


def _random_region(rm, tape, cfg, rng) -> tuple[float, float] | tuple[int, int]:
    """An in-fill region as long as one continuation, placed uniformly on the tape."""
    if rm.modality == "midi":
        from amtrain.rollout.amt import triple_times
        from amtrain.tokens.midi import TIME_RESOLUTION

        end = triple_times(tape.triples).max() / TIME_RESOLUTION if len(tape.triples) else 0.0
        width = cfg.length if cfg.seconds else max(end / 4, 0.5)
        start = float(rng.uniform(0, max(end - width, 0)))
        return start, start + width
    if rm.modality == "audio":
        frames = tape.shape[1]
        width = min(audio_frames(cfg, cfg.length) if cfg.seconds else max(1, int(cfg.length) // rm.tokenizer.num_codebooks),
                    frames - 1)
        s = int(rng.integers(0, frames - width)) if frames > width else 0
        return s / cfg.frame_rate, (s + width) / cfg.frame_rate
    width = min(int(cfg.length), len(tape) - 1)
    s = int(rng.integers(0, len(tape) - width)) if len(tape) > width else 0
    return s, s + width


def _as_infill_prompt(rm, tape, region, cfg):
    if rm.modality in ("midi", "audio"):
        return tape
    s, e = region  # token positions
    return [tape[:s], tape[e:]]
