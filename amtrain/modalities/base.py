"""The `Modality` base class (plain token ids) and `RolloutModel`, what a rollout holds.

Tapes of the base modality are int64 id arrays (T,); a prompt may be split into segments at gap
markers for in-filling (`-1` in a .npy, the word `<gap>` in an id file).
"""

from __future__ import annotations

import io
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic
from amtrain.models.base import SequenceModel

if TYPE_CHECKING:
    from amtrain.data.fim import FimSpec
    from amtrain.midi.events import Notes
    from amtrain.registry import ModelFamily
    from amtrain.store import Dataset
    from amtrain.tokens import Tokenizer

GAP = -1


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
    """T5 MIDI in-filling: longest span (tokens) of a time range (text and ids in-fill up to
    `length` tokens a gap)."""
    schedule: str = "ci"
    """Alternate: c = continue, i = in-fill, cycled over the iterations."""
    iterations: int = 4
    t5_context: int = 512
    """T5: most tokens the encoder sees (its memory grows with their square): continuation, each
    round's prefix window; MIDI and audio in-filling, the prompt nearest the range."""
    priorities: list[tuple[int, int, float]] = field(default_factory=list)
    """Alternate, audio: (start_frame, end_frame, priority) chunks of the prompt."""
    frame_rate: float | None = None
    """Audio codec frames per second (from the codec)."""
    row_seeds: tuple[int, ...] = ()
    """A left-to-right continuation of a (B, T) batch of prompts (the serve worker): one seed per
    row, row i drawing exactly what it draws alone with seed row_seeds[i]; empty: `seed`."""

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
        seed: int | list[int] | None = None if self.seed is None else self.seed + seed_offset
        if self.row_seeds:
            seed = [s + seed_offset for s in self.row_seeds]
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": seed,
                "use_cache": self.use_cache}

    def t5_stride(self, unit: int = 1) -> int:
        """T5 continuation: new tokens a round, whole units (`stride`, default t5_context // 2)."""
        stride = self.stride if self.stride is not None else self.t5_context // 2
        return max(unit, stride // unit * unit)


@dataclass(frozen=True)
class SpanLayout:
    """How T5 span corruption cuts a modality's token stream (`amtrain.data.span_corruption`)."""

    unit: int
    """Tokens per span unit: a span never splits one (1 text, 3 a MIDI event, K an audio frame)."""
    offset: int
    """Tokens at each document start before the first unit (the AMT flag, audio's <eot>)."""
    inside_documents: bool
    """Windows are cut inside one document (aligned to units) instead of a packed stream."""


@dataclass
class RolloutModel:
    """A model ready to roll out: its family spec and modality decide every strategy."""

    model: SequenceModel
    meta: dict
    tokenizer: Tokenizer
    family: ModelFamily
    modality: Modality
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context(self) -> int:
        """Ids the model sees at once: a left-to-right model's max_seq_len, a denoiser's
        training input length (T5 has relative positions)."""
        if self.family.left_to_right:
            return int(self.model.cfg.max_seq_len)
        return int(self.meta.get("denoise", {}).get("inputs_length", RolloutConfig.t5_context))

    @property
    def fim(self) -> FimSpec | None:
        """The fill-in-the-middle layout of a left-to-right checkpoint trained with it
        (meta["fim"], `amtrain.data.fim`), else None."""
        from amtrain.data.fim import FimSpec

        return FimSpec.from_meta(self.meta["fim"]) if self.family.left_to_right and "fim" in self.meta else None

    def t5_vocab(self):
        """The sentinel layout of a denoiser checkpoint (specials and sentinels above the base
        vocabulary; the number of sentinels read back from the model's vocab_size)."""
        from amtrain.data.span_corruption import NUM_SPECIALS, T5Vocab

        base = self.tokenizer.vocab_size
        return T5Vocab(base, self.model.cfg.vocab_size - base - NUM_SPECIALS)


class Modality:
    """Plain token ids (the `tokens` modality); subclasses override what their kind needs."""

    name = "tokens"
    tokenizers: tuple[str, ...] = ()
    """Tokenizer ids (as in a dataset's manifest) whose datasets are of this modality."""
    prompt_files = ".txt ids or .npy"
    """What `--prompt` accepts, for messages."""
    text_output = True
    """Training-time rollouts go into the metrics log as text (else files under rollouts/)."""
    needs_codec = False
    """Prompts and outputs pass through the audio codec."""
    priority_scores = False
    """prep writes per-chunk priority scores (the priority sampler, --prompt-from-priority)."""
    has_velocity = False
    """Symbolic music whose ids carry each note's velocity (`notes` returns real velocities)."""
    encoding: str | None = None
    """Its name in `amtrain prep-midi --encoding` (symbolic music made from MIDI files), else None."""
    prep: str | None = None
    """"module:function" of its MIDI prep (`amtrain.prep.encodings.EncodingPrep`): called as
    `prep(inputs, out, options, workers=, append=, show_progress=) -> PrepReport`."""
    prep_options: tuple[str, ...] = ()
    """The `amtrain prep-midi` options it takes (`amtrain.prep.encodings.PREP_OPTIONS` names);
    any other option given is refused by name."""

    # -- data and training ---------------------------------------------------------------
    def span_layout(self, tokenizer: Tokenizer) -> SpanLayout:
        return SpanLayout(unit=1, offset=0, inside_documents=False)

    def val_metrics(self, ce_per_token: float) -> dict[str, float]:
        """Validation figures the modality's literature reports, from the mean per-token
        cross-entropy in nats (beyond val_loss and bits per token, which every run logs)."""
        return {}

    def notes(self, tokenizer: Tokenizer, ids: np.ndarray) -> Notes | None:
        """Ids of one piece -> the notes a listener hears (`amtrain.midi.events.Notes`: onset and
        duration in 10 ms bins, pitch, instrument 0..128, velocity; velocity is the MIDI default
        where `has_velocity` is False), sorted by onset; malformed ids are skipped. None where the
        modality is not symbolic music. Evaluation, bits per second of music and piano rolls read
        every symbolic encoding through this."""
        return None

    def document_prefix(self, tokenizer: Tokenizer) -> list[int]:
        """Ids every training document starts with, so a left-to-right prompt starts so too."""
        return []

    def training_prompt(self, text: str) -> Any:
        """A `train.rollout_prompts` entry -> what `hook_tape` takes: ids from a .npy, else the
        path of a prompt file."""
        path = Path(text)
        if path.suffix == ".npy" and path.is_file():
            return np.load(path).astype(np.int64)
        if not path.is_file():
            raise UserError(f"train.rollout_prompts: {text}: no such prompt file; a {self.name} run takes "
                            f"prompt files ({self.prompt_files})")
        return path

    def hook_tape(self, rm: RolloutModel, prompt, cfg: RolloutConfig, codec=None) -> tuple[Any, int]:
        """A training-time prompt -> (tape to continue, ids put before the prompt's own)."""
        if isinstance(prompt, (str, Path)):
            return self.continuation_tape(rm, self.read_prompt(rm, Path(prompt), cfg, codec)), 0
        return prompt, 0

    # -- prompts and outputs -------------------------------------------------------------
    def read_prompt(self, rm: RolloutModel, path: Path, cfg: RolloutConfig, codec=None):
        """A prompt file -> a list of id segments split at gaps (one segment: no gap)."""
        return split_gaps(check_ids(read_ids(path), rm.tokenizer.vocab_size, path))

    def document_prompt(self, rm: RolloutModel, doc: np.ndarray, cfg: RolloutConfig) -> tuple[Any, Any, str]:
        """A held-out document (its ids as stored) -> (the prompt `amtrain rollout` takes when
        given none, the original it was cut from, which part that is). Ids: the document's
        opening, for in-filling cut into prefix <gap> suffix with a gap of an eighth of the
        model's context held out, sized so that the prompt and the in-fill fit the context."""
        head = self.document_prefix(rm.tokenizer)
        ids = np.asarray(doc, np.int64)
        ids = ids[len(head):] if head and ids[:len(head)].tolist() == head else ids
        if ids.size < 3:
            raise UserError(f"the held-out document has {ids.size} ids, too few to cut; pass --prompt FILE")
        context = rm.context
        if cfg.mode != "infill":
            piece = ids[:context // 2]
            return [piece], piece, f"its first {piece.size} of {ids.size} ids"
        gap = max(1, min(context // 8, ids.size // 8))
        side = max(1, min((context - 4 - context // 4 - len(head)) // 2, (ids.size - gap) // 2))
        a, b = side, side + gap
        piece = ids[:b + side]
        return ([piece[:a], piece[b:]], piece,
                f"its first {piece.size} of {ids.size} ids: prefix [0, {a}) <gap: [{a}, {b}) held out> suffix "
                f"[{b}, {piece.size})")

    def write_tape(self, rm: RolloutModel, tape, stem: Path, codec=None, prompt=None) -> list[Path]:
        """The files a person opens, plus the ids; `prompt` (the tape generation started from)
        lets a modality show what was generated."""
        ids = np.asarray(tape, np.int64)
        write_bytes_atomic(stem.with_suffix(".txt"), (" ".join(map(str, ids.tolist())) + "\n").encode())
        return [stem.with_suffix(".txt"), save_npy(ids, stem)]

    def continuation_tape(self, rm: RolloutModel, prompt):
        """A prompt read for continuation -> one tape (a left-to-right model's prompt opens
        with `document_prefix`)."""
        if not isinstance(prompt, list):
            return prompt
        if len(prompt) > 1:
            raise UserError("the prompt has gap markers; they are for --mode infill")
        ids = prompt[0].astype(np.int64)
        prefix = self.document_prefix(rm.tokenizer) if rm.family.left_to_right else []
        return np.concatenate([np.asarray(prefix, np.int64), ids]) if prefix else ids

    def describe(self, rm: RolloutModel, before, after, cfg: RolloutConfig) -> tuple[str, list[str]]:
        """(a summary of what a rollout added to `before` to make `after`, warnings) for the
        line each written sample gets. `before` is the tape generation started from (in-fill:
        the prompt's segments)."""
        n_before = sum(len(s) for s in before) if isinstance(before, list) else len(before)
        added = len(after) - n_before
        where = "in the gap" if cfg.mode == "infill" else "added"
        warnings = [] if added > 0 else [f"nothing was generated ({added} tokens {where}): the model ended at once"]
        return f"{added:+d} tokens ({where}), {len(after)} in all", warnings

    # -- generation ----------------------------------------------------------------------
    def can_infill(self, rm: RolloutModel) -> bool:
        """In-filling needs a denoiser (sentinel spans) or a left-to-right checkpoint trained to
        fill in the middle (`RolloutModel.fim`), unless the modality has its own way."""
        return not rm.family.left_to_right or rm.fim is not None

    def continue_tape(self, rm: RolloutModel, tape, cfg: RolloutConfig, num_samples: int,
                      seed_offset: int = 0) -> list:
        if cfg.seconds:
            raise UserError(f"--seconds needs a MIDI or audio checkpoint; give --length in tokens for {self.name}")
        n = int(cfg.length)
        if not rm.family.left_to_right:
            return list(seq2seq_continue(rm, tape, n, num_samples, cfg, seed_offset))
        header = len(self.document_prefix(rm.tokenizer))
        return list(left_to_right_continue(rm, tape, n, num_samples, cfg, seed_offset, header=header).numpy())

    def infill_tape(self, rm: RolloutModel, prompt, cfg: RolloutConfig, num_samples: int,
                    seed_offset: int = 0) -> list:
        from amtrain.generate.t5 import t5_infill

        segments = prompt if isinstance(prompt, list) else [prompt]
        if cfg.postfix_repeat > 1:
            if len(segments) != 2:
                raise UserError("--postfix-repeat needs a prompt with one gap: prefix<gap>postfix")
            segments = [segments[0]] + [segments[1]] * cfg.postfix_repeat
        if rm.family.left_to_right:
            return fim_infill(rm, segments, cfg, num_samples, seed_offset, self.document_prefix(rm.tokenizer))
        return t5_infill(rm.model, rm.t5_vocab(), segments, num_samples, mode=cfg.denoiser,
                         max_span=int(cfg.length), **cfg.sampling(seed_offset))

    # -- alternate: which region an in-fill iteration takes --------------------------------
    def random_region(self, rm: RolloutModel, tape, cfg: RolloutConfig, rng: np.random.Generator):
        """An in-fill region as long as one continuation, placed uniformly (token positions)."""
        width = min(int(cfg.length), len(tape) - 1)
        s = int(rng.integers(0, len(tape) - width)) if len(tape) > width else 0
        return s, s + width

    def infill_prompt(self, tape, region):
        """The in-fill prompt for `region` of a tape: prefix and suffix segments."""
        s, e = region
        return [tape[:s], tape[e:]]

    def after_infill(self, rm: RolloutModel, tape):
        """The tape an in-fill returned, as the next iteration of `alternate` reads it."""
        return tape

    # -- evaluation (amtrain.evaluate) ---------------------------------------------------
    def tape_ids(self, rm: RolloutModel, tape) -> np.ndarray:
        """A tape as the ids a dataset stores: what evaluation reads samples and held-out data as."""
        return np.asarray(tape, np.int64)

    def start_tape(self, rm: RolloutModel) -> Any | None:
        """The tape of an empty document, for unconditional samples: a left-to-right model's
        `document_prefix`; None where generation needs a prompt (then a held-out opening is one)."""
        head = self.document_prefix(rm.tokenizer)
        return np.asarray(head, np.int64) if head and rm.family.left_to_right else None

    def generated_part(self, rm: RolloutModel, before, after):
        """The part of a continued tape `after` that generation added to `before`."""
        return np.asarray(after)[len(before):]

    def units(self, tokenizer: Tokenizer, ids: np.ndarray) -> tuple[str, list]:
        """(what a sample is measured in, its units in order) for repetition, distinct-n and
        length: symbolic music's notes as (onset gap, duration, pitch) from `notes`, else the
        token ids; text overrides with words, audio with frames."""
        notes = self.notes(tokenizer, ids)
        if notes is not None:
            gaps = np.diff(notes.time, prepend=notes.time[:1])
            return "notes", list(zip(gaps.tolist(), notes.dur.tolist(), notes.pitch.tolist(), strict=True))
        return "tokens", np.asarray(ids).tolist()

    def codes(self, tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray | None:
        """Codec codes (K, T) of ids (codebook usage per level); None where there is no codec."""
        return None

    def invalid_ids(self, tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
        """(N,) True where a well-formed document's grammar forbids the id at its position (token
        validity; the rules `amtrain.generate.grammar` enforces while sampling): ids outside
        the vocabulary."""
        ids = np.asarray(ids, np.int64)
        return (ids < 0) | (ids >= tokenizer.vocab_size)

    # -- after training ------------------------------------------------------------------
    def sample_command(self, run_dir: str, dataset: Dataset, split: str, codec_path: str) -> str:
        """The command that samples from a finished run, printed after training: `amtrain
        rollout` on the run, prompted by the opening of the split's first document (`offset` and
        16 units of the span layout, so whole events or frames), written as RUN/prompt.txt (ids;
        a modality whose `read_prompt` takes no id files overrides this)."""
        from amtrain.tokens import get_tokenizer

        manifest = dataset.manifest
        layout = self.span_layout(get_tokenizer(manifest.tokenizer, **manifest.tokenizer_params))
        ids = np.asarray(next(dataset.documents(split))[: layout.offset + 16 * layout.unit], np.int64)
        prompt = Path(run_dir) / "prompt.txt"
        write_bytes_atomic(prompt, (" ".join(map(str, ids.tolist())) + "\n").encode())
        return shlex.join(["python", "-m", "amtrain", "rollout", run_dir, "--prompt", str(prompt),
                           "--out", str(Path(run_dir) / "samples")])


# ---------------------------------------------------------------- the decoding paths
def left_to_right_continue(rm: RolloutModel, ids, n: int, num_samples: int, cfg: RolloutConfig, seed_offset: int,
                           header: int = 0, unit: int = 1, processor=None, forced=None) -> torch.Tensor:
    """Continue ids by n tokens with a decoder or LSTM through the sliding window; ids beyond
    the tokenizer's (FIM sentinels, a larger model.vocab_size) are never produced."""
    from amtrain.generate.grammar import IdsBelow
    from amtrain.generate.processors import LogitsProcessorList
    from amtrain.generate.window import generate_long

    processors = LogitsProcessorList([IdsBelow(rm.tokenizer.vocab_size)] if rm.model.cfg.vocab_size >
                                     rm.tokenizer.vocab_size else [])
    if processor is not None:
        processors.append(processor)
    x = torch.tensor(np.tile(ids, (num_samples, 1)), dtype=torch.long, device=rm.device)
    return generate_long(rm.model, x, n, stride=cfg.stride, header=header, unit=unit,
                         logits_processor=processors or None, forced=forced, **cfg.sampling(seed_offset)).cpu()


def fim_infill(rm: RolloutModel, segments: list[np.ndarray], cfg: RolloutConfig, num_samples: int,
               seed_offset: int = 0, header=(), processor=None) -> list[np.ndarray]:
    """Fill the gaps between id segments with a FIM-trained left-to-right model, one gap after
    the other: gap i's prefix is `header` + everything before it (earlier fills included), its
    suffix segment i+1; each middle takes base ids up to the end id, at most `cfg.length`
    (`amtrain.generate.fim`); `processor` (a modality's grammar) sees each middle from its start.
    Returns one tape per sample, segments kept exactly, no header."""
    from amtrain.generate.fim import fim_generate, middle_budget
    from amtrain.generate.grammar import IdsBelow
    from amtrain.generate.processors import LogitsProcessorList

    if len(segments) < 2:
        raise UserError("in-filling needs a gap: give a prefix and a suffix (a gap marker in the prompt)")
    spec = rm.fim
    assert spec is not None, "rollout checks can_infill first"
    head = np.asarray(header, np.int64)
    tapes = [np.concatenate([head, segments[0]]).astype(np.int64)] * num_samples
    for i, suffix in enumerate(segments[1:]):
        shortest = min(len(t) for t in tapes)  # rows see equally long prefixes: one batch
        prefixes = np.stack([t[len(t) - shortest:] for t in tapes])
        n = middle_budget(rm.model.cfg.max_seq_len, int(cfg.length), shortest + len(suffix))
        middles = fim_generate(rm.model, spec, prefixes, np.asarray(suffix, np.int64), n,
                               processor=LogitsProcessorList([IdsBelow(rm.tokenizer.vocab_size)] +
                                                             ([processor] if processor is not None else [])),
                               **cfg.sampling(seed_offset + i))
        tapes = [np.concatenate([t, m, suffix]).astype(np.int64) for t, m in zip(tapes, middles, strict=True)]
    return [t[len(head):] for t in tapes]


def seq2seq_continue(rm: RolloutModel, ids, n: int, num_samples: int, cfg: RolloutConfig, seed_offset: int,
                     header: int = 0, unit: int = 1, inner_for=None, forced=None):
    """Continue ids by n tokens with a denoiser: the S mode by rounds over a prefix window."""
    from amtrain.generate.t5 import t5_continue

    return t5_continue(rm.model, rm.t5_vocab(), ids, n, num_samples, context=cfg.t5_context,
                       stride=cfg.t5_stride(unit), header=header, unit=unit, inner_for=inner_for, forced=forced,
                       **cfg.sampling(seed_offset))


def note(line: str) -> None:
    """One line on stderr about what a rollout did to fit the model (not a fault), e.g. how much
    of a long prompt a T5 encoder was shown."""
    print(f"note: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- id files
def read_ids(path: Path) -> np.ndarray:
    """An id file: .npy (any shape, -1 = gap) or text of whitespace-separated ints (`<gap>`)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64).ravel()
    words = path.read_text().split()
    try:
        return np.array([GAP if w == "<gap>" else int(w) for w in words], np.int64)
    except ValueError:
        raise UserError(f"{path}: not a file of integer ids (space-separated, `<gap>` for a gap); "
                        "plain text prompts need a text checkpoint") from None


def is_id_text(path: Path) -> bool:
    words = path.read_text().split()[:64]
    return bool(words) and all(w == "<gap>" or w.lstrip("-").isdigit() for w in words)


def split_gaps(ids: np.ndarray) -> list[np.ndarray]:
    cuts = np.flatnonzero(ids == GAP)
    bounds = np.concatenate([[-1], cuts, [ids.size]])
    return [ids[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_ids(ids: np.ndarray, vocab_size: int, path: Path) -> np.ndarray:
    real = ids[ids != GAP]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise UserError(f"{path}: ids must lie in [0, {vocab_size}) for this checkpoint's tokenizer")
    return ids


def save_npy(arr: np.ndarray, stem: Path) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    path = stem.with_suffix(".npy")
    write_bytes_atomic(path, buf.getvalue())
    return path
