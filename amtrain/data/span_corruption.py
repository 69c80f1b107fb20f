"""T5 span corruption and UL2 denoisers: the T5 id layout, noise masks, (inputs, targets) pairs
and fixed-shape denoising batches drawn from token arrays. numpy only; deterministic per seed.

Id layout above a base vocabulary of size V (`T5Vocab`):

    0 .. V-1            the base tokenizer's ids (text / MIDI / audio), untouched
    V                   PAD   (also the decoder start token)
    V+1                 EOS   (closes every input and every target)
    V+2, V+3, V+4       UL2 mode tokens [R] [X] [S], first token of each input
    V+5 ..              sentinels <s_0> <s_1> ... (num_sentinels of them), ascending
    ..  padded_size-1   unused padding up to a multiple of 64 (the model's embedding size)

Span corruption (Raffel et al. 2020, T5 §3.1.4): a fraction `noise_density` of the tokens is
dropped in spans of mean length `mean_span_length`; each dropped span becomes one sentinel in
the input, and the target lists every sentinel followed by the span it stands for:

    tokens   a b c d e f g h            mask   . . x x . . . x
    inputs   [R] a b <s_0> e f g <s_1> EOS
    targets  <s_0> c d <s_1> h EOS

`unit` makes spans cover whole events: span boundaries fall on multiples of `unit` tokens
(unit=3 for MIDI arrival-time triples, unit=K for audio frames of K codebooks, flattened).
Densities and span lengths are counted in units.

UL2 denoisers (Tay et al. 2022): R = regular span corruption (short spans, low density),
X = extreme (long spans or high density), S = sequential prefix-LM (the input is a prefix,
the target the continuation; `noise_density` is the share of the chunk in the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from amtrain.tokens import IGNORE_INDEX

VOCAB_MULTIPLE = 64
TASKS = ("R", "X", "S")
NUM_SPECIALS = 2 + len(TASKS)  # PAD, EOS, one mode token per task


@dataclass(frozen=True)
class T5Vocab:
    """T5 specials and sentinels placed above a base vocabulary (layout in the module doc)."""

    base_vocab_size: int
    num_sentinels: int = 100

    def __post_init__(self):
        if self.base_vocab_size <= 0 or self.num_sentinels <= 0:
            raise ValueError(f"T5Vocab needs positive base_vocab_size and num_sentinels, got "
                             f"{self.base_vocab_size}, {self.num_sentinels}")

    @property
    def pad_id(self) -> int:
        return self.base_vocab_size

    @property
    def eos_id(self) -> int:
        return self.base_vocab_size + 1

    def mode_id(self, task: str) -> int:
        return self.base_vocab_size + 2 + TASKS.index(task)

    @property
    def first_sentinel(self) -> int:
        return self.base_vocab_size + NUM_SPECIALS

    def sentinel(self, i: int | np.ndarray) -> int | np.ndarray:
        return self.first_sentinel + i

    def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.first_sentinel) & (ids < self.size)

    @property
    def size(self) -> int:
        """Ids in use (T5Config.vocab_size)."""
        return self.first_sentinel + self.num_sentinels

    @property
    def padded_size(self) -> int:
        return math.ceil(self.size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass(frozen=True)
class Denoiser:
    """One denoising objective at one difficulty."""

    task: str = "R"
    """R / X: span corruption; S: prefix-LM."""
    noise_density: float = 0.15
    """Span tasks: share of units dropped into spans. S: share of the chunk in the target."""
    mean_span_length: float = 3.0
    """Span tasks: mean length of a dropped span, in units (S ignores it)."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Denoiser.task must be one of {TASKS}, got {self.task!r}")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"Denoiser.noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"Denoiser.mean_span_length must be >= 1, got {self.mean_span_length}")


# ---------------------------------------------------------------------------------------------
# Masks and lengths


def span_counts(num_units: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise units, noise spans) for a chunk of `num_units`: T5's rounding, clamped so that at
    least one unit is kept and one dropped and every span (noise or not) is non-empty."""
    num_noise = min(max(int(round(num_units * noise_density)), 1), num_units - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return num_noise, min(num_spans, num_noise, num_units - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty segments:
    num_segments - 1 distinct cut points out of num_items - 1, the same law as T5's shuffled
    boolean vector (`_random_segmentation` in t5.data.preprocessors)."""
    cuts = rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1  # segment starts
    edges = np.concatenate([[0], np.sort(cuts), [num_items]])
    return np.diff(edges)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator, unit: int = 1) -> np.ndarray:
    """(length,) bool, True = noise. Ported from T5 `t5.data.preprocessors.random_spans_noise_mask`
    (google-research/text-to-text-transfer-transformer) as nanoT5 `utils/copied_utils.py` does
    in numpy: noise and non-noise lengths are each split into `num_spans` random non-empty
    segments and interleaved, starting with non-noise and ending with noise. With `unit` > 1 the
    mask is drawn over length // unit units and each unit covers `unit` consecutive tokens."""
    if length % unit:
        raise ValueError(f"length {length} is not a multiple of unit {unit}")
    num_units = length // unit
    if num_units < 2:
        raise ValueError(f"span corruption needs at least 2 units, got {num_units}")
    num_noise, num_spans = span_counts(num_units, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(num_units - num_noise, num_spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * spans,)
    is_noise = np.repeat(np.tile([False, True], num_spans), interleaved)  # (num_units,)
    return np.repeat(is_noise, unit)


def span_lengths_after(num_units: int, denoiser: Denoiser, unit: int,
                       num_prefix: int = 1) -> tuple[int, int]:
    """(input tokens, target tokens) a chunk of num_units produces, EOS and mode token included."""
    if denoiser.task == "S":
        num_target = suffix_units(num_units, denoiser.noise_density)
        return (num_units - num_target) * unit + num_prefix + 1, num_target * unit + 1
    num_noise, num_spans = span_counts(num_units, denoiser.noise_density, denoiser.mean_span_length)
    return ((num_units - num_noise) * unit + num_spans + num_prefix + 1,
            num_noise * unit + num_spans + 1)


def suffix_units(num_units: int, noise_density: float) -> int:
    return min(max(int(round(num_units * noise_density)), 1), num_units - 1)


def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_span_length: float, unit: int = 1, task: str = "R",
                                     num_prefix: int = 1) -> tuple[int, int]:
    """(raw chunk length in tokens, targets length) for chunks whose corruption gives
    `inputs_length` input tokens (mode token + kept tokens + sentinels + EOS) and exactly
    `targets_length` target tokens (sentinels + dropped tokens + EOS).

    The search of T5's `random_spans_helper` (t5/data/preprocessors.py) and nanoT5's
    `compute_input_and_target_lengths` (nanoT5/utils/copied_utils.py): the longest raw chunk whose
    inputs still fit. The inputs are filled exactly unless one more unit would add more than
    one input token (possible with unit > 1, rarely with unit = 1); the batch then pads the gap.
    Differences from T5: lengths count in units, the UL2 mode token is counted (num_prefix), and
    nanoT5's "targets = inputs at density 0.5" adjustment is left out (it leaves the inputs one
    token short)."""
    denoiser = Denoiser(task, noise_density, mean_span_length)
    def fits(n: int) -> bool:
        return span_lengths_after(n, denoiser, unit, num_prefix)[0] <= inputs_length

    if not fits(2):
        raise ValueError(f"inputs_length {inputs_length} is too short for unit {unit}")
    # fits(low), not fits(high): inputs > kept units >= n (1 - density) - 1/2; inputs grow with n
    low, high = 2, math.ceil((inputs_length + 1) / (1 - noise_density)) + 1
    while high - low > 1:  # largest fitting chunk (binary search in place of T5's linear one)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    num_units = low
    num_targets = span_lengths_after(num_units, denoiser, unit, num_prefix)[1]
    return num_units * unit, num_targets


# ---------------------------------------------------------------------------------------------
# Corruption and its inverse


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, vocab: T5Vocab
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) without mode token or EOS: each noise span of `tokens` becomes the next
    sentinel in the inputs; targets are each sentinel followed by its span."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    num_spans = int(starts.sum())
    if num_spans > vocab.num_sentinels:
        raise ValueError(f"{num_spans} noise spans but only {vocab.num_sentinels} sentinels: "
                         f"raise T5Vocab.num_sentinels or lower the noise density")
    sentinels = np.asarray(vocab.sentinel(np.arange(num_spans))).astype(tokens.dtype)
    inputs = tokens.copy()
    inputs[starts] = sentinels
    inputs = inputs[~mask | starts]
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels)
    return inputs, targets


def merge_inputs_targets(inputs: np.ndarray, targets: np.ndarray, vocab: T5Vocab) -> np.ndarray:
    """Inverse of `corrupt_spans`: put each target span back in place of its sentinel (mode
    token stripped from the inputs). Also the infill step of rollout."""
    spans = target_spans(targets, vocab)
    pieces, last = [], 0
    for i in np.flatnonzero(vocab.is_sentinel(inputs)):
        pieces += [inputs[last:i], spans.get(int(inputs[i]), inputs[i:i])]
        last = i + 1
    pieces.append(inputs[last:])
    return np.concatenate(pieces)


def target_spans(targets: np.ndarray, vocab: T5Vocab) -> dict[int, np.ndarray]:
    """{sentinel id: the tokens after it} for a target sequence, read up to its first EOS (or
    PAD / -100 padding)."""
    stop = np.flatnonzero((targets == vocab.eos_id) | (targets == vocab.pad_id)
                          | (targets == IGNORE_INDEX))
    targets = targets[: stop[0]] if len(stop) else targets
    bounds = np.append(np.flatnonzero(vocab.is_sentinel(targets)), len(targets))
    return {int(targets[a]): targets[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


def span_exact_match(predicted: np.ndarray, targets: np.ndarray, vocab: T5Vocab) -> tuple[int, int]:
    """(spans reconstructed exactly, spans): each span of `targets` against what `predicted`
    (e.g. a greedy decode) puts after the same sentinel. Both may carry EOS and padding."""
    truth, guess = target_spans(targets, vocab), target_spans(predicted, vocab)
    hits = sum(1 for s, span in truth.items() if s in guess and np.array_equal(guess[s], span))
    return hits, len(truth)


def denoise_example(chunk: np.ndarray, denoiser: Denoiser, vocab: T5Vocab,
                    rng: np.random.Generator, unit: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One (inputs, targets) pair from a raw chunk: mode token + corrupted chunk + EOS, and
    targets + EOS. S splits the chunk so that the last `noise_density` share is the target."""
    head = np.array([vocab.mode_id(denoiser.task)], dtype=np.int64)
    eos = np.array([vocab.eos_id], dtype=np.int64)
    chunk = chunk.astype(np.int64)
    if denoiser.task == "S":
        split = len(chunk) - suffix_units(len(chunk) // unit, denoiser.noise_density) * unit
        inputs, targets = chunk[:split], chunk[split:]
    else:
        mask = random_spans_noise_mask(len(chunk), denoiser.noise_density,
                                       denoiser.mean_span_length, rng, unit)
        inputs, targets = corrupt_spans(chunk, mask, vocab)
    return np.concatenate([head, inputs, eos]), np.concatenate([targets, eos])


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class DenoisingBatch:
    input_ids: np.ndarray  # (B, S) int64, PAD after EOS
    attention_mask: np.ndarray  # (B, S) int64, 1 = real token
    labels: np.ndarray  # (B, T) int64, -100 after EOS
    task_ids: np.ndarray  # (B,) int64 index into TASKS


class DocumentSampler(Protocol):
    """The `document_sampler` hook of `DenoisingBatcher`: which document an example's chunk comes
    from (e.g. `amtrain.data.priority.PrioritySampler`)."""

    def choose(self, rng: np.random.Generator, num_windows: np.ndarray) -> int:
        """A document index drawn from `rng`; `num_windows` (documents,) counts each document's
        valid windows of the chunk's length (0: too short)."""
        ...


class DenoisingBatcher:
    """Fixed-shape denoising batches from token arrays (e.g. `Dataset.tokens(split)` memmaps).

    Each example picks a denoiser by weight, reads a raw chunk whose length fills
    `inputs_length` for that denoiser, and pads its targets to `targets_length`. Chunks are
    uniform over all valid windows:
      - without `doc_starts`, each array is one stream of packed documents (nanoT5 style:
        windows may cross document boundaries) and windows start on multiples of `unit`;
      - with `doc_starts` (one array of document start offsets per token array, e.g.
        `Dataset.doc_starts(record)`), windows stay inside one document and start at
        doc start + `unit_offset` + a multiple of `unit` (MIDI: unit=3, unit_offset=1 skips the
        AMT sequence flag so spans cover whole (time, duration, note) triples).
    With a `document_sampler` the document is its choice (e.g. by priority) and the window is
    uniform inside it. Every draw comes from `rng`, one np.random.Generator (seeded by `seed`):
    a caller that needs batches as a function of its step reseeds it (`amtrain.train.objective`)."""

    def __init__(self, arrays: list[np.ndarray], vocab: T5Vocab, inputs_length: int,
                 targets_length: int, unit: int = 1, seed: int = 0,
                 doc_starts: list[np.ndarray] | None = None, unit_offset: int = 0,
                 document_sampler: DocumentSampler | None = None):
        if doc_starts is None:
            doc_starts = [np.zeros(1, dtype=np.int64) for _ in arrays]
        if len(doc_starts) != len(arrays):
            raise ValueError(f"{len(arrays)} token arrays but {len(doc_starts)} doc_starts arrays")
        self.arrays = arrays
        begins = [np.asarray(st, dtype=np.int64) for st in doc_starts]
        ends = [np.append(st[1:], len(a)) for st, a in zip(begins, arrays, strict=True)]
        self._doc_array = np.concatenate([np.full(len(st), i) for i, st in enumerate(begins)])
        self._doc_begin = np.concatenate(begins) + unit_offset
        self._doc_length = np.concatenate(ends) - self._doc_begin  # usable tokens per document
        self.vocab, self.unit = vocab, unit
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.document_sampler = document_sampler
        self.rng = np.random.default_rng(seed)
        self._raw_lengths: dict[Denoiser, int] = {}
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # raw length -> counts, cumsum

    def raw_length(self, denoiser: Denoiser) -> int:
        """Raw chunk length for `denoiser`; checks that its targets fit `targets_length`."""
        if denoiser not in self._raw_lengths:
            raw, num_targets = compute_input_and_target_lengths(
                self.inputs_length, denoiser.noise_density, denoiser.mean_span_length,
                self.unit, denoiser.task)
            if num_targets > self.targets_length:
                raise ValueError(f"{denoiser} needs targets_length >= {num_targets} at "
                                 f"inputs_length {self.inputs_length}, got {self.targets_length}")
            self._raw_lengths[denoiser] = raw
        return self._raw_lengths[denoiser]

    def num_windows(self, length: int) -> np.ndarray:
        """(documents,) number of valid windows of `length` tokens in each document."""
        return self._window_counts(length)[0]

    def _window_counts(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid windows of `length` tokens per document, and their cumulative sum."""
        if length not in self._windows:
            counts = np.maximum((self._doc_length - length) // self.unit + 1, 0)
            if counts.sum() == 0:
                raise ValueError(f"no document holds a chunk of {length} tokens (longest: "
                                 f"{self._doc_length.max()}); lower inputs_length or the noise density")
            self._windows[length] = counts, np.cumsum(counts)
        return self._windows[length]

    def _chunk(self, length: int) -> np.ndarray:
        counts, cumulative = self._window_counts(length)
        if self.document_sampler is None:  # one draw over all windows
            r = int(self.rng.integers(cumulative[-1]))
            doc = int(np.searchsorted(cumulative, r, side="right"))
            k = r - (int(cumulative[doc - 1]) if doc else 0)
        else:  # the sampler's document, a uniform window inside it
            doc = self.document_sampler.choose(self.rng, counts)
            k = int(self.rng.integers(counts[doc]))
        start = int(self._doc_begin[doc]) + k * self.unit
        return np.asarray(self.arrays[self._doc_array[doc]][start:start + length])

    def batch(self, batch_size: int, denoisers: list[Denoiser],
              weights: list[float] | None = None) -> DenoisingBatch:
        p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        choice = self.rng.choice(len(denoisers), size=batch_size, p=p)
        inputs = np.full((batch_size, self.inputs_length), self.vocab.pad_id, dtype=np.int64)
        labels = np.full((batch_size, self.targets_length), IGNORE_INDEX, dtype=np.int64)
        task_ids = np.empty(batch_size, dtype=np.int64)
        for b, k in enumerate(choice):
            denoiser = denoisers[k]
            chunk = self._chunk(self.raw_length(denoiser))
            x, y = denoise_example(chunk, denoiser, self.vocab, self.rng, self.unit)
            inputs[b, :len(x)], labels[b, :len(y)] = x, y
            task_ids[b] = TASKS.index(denoiser.task)
        return DenoisingBatch(inputs, (inputs != self.vocab.pad_id).astype(np.int64), labels,
                              task_ids)


class DenoisingLoader:
    """This rank's micro-batches of each optimizer step, drawn by a `DenoisingBatcher` whose
    generator is reseeded from (seed, step, rank) at the start of the step: the batches are a
    function of the step and the rank, so the loader's position needs no state of its own (its
    `state_dict` is empty) and a resumed run draws exactly as the uninterrupted one."""

    def __init__(self, batcher: DenoisingBatcher, micro_batch: int, grad_accum: int, seed: int, rank: int):
        self.batcher = batcher
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.seed, self.rank = seed, rank

    def next_step(self, step: int, denoisers: list[Denoiser], weights: list[float]) -> list[DenoisingBatch]:
        """The grad_accum micro-batches of optimizer step `step` (0-based) with this mixture."""
        self.batcher.rng = np.random.default_rng([self.seed, step, self.rank])
        return [self.batcher.batch(self.micro_batch, denoisers, weights) for _ in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def required_targets_length(inputs_length: int, denoisers: list[Denoiser], unit: int = 1) -> int:
    """Smallest targets_length that every denoiser in `denoisers` fits at `inputs_length`."""
    return max(compute_input_and_target_lengths(inputs_length, d.noise_density,
                                                d.mean_span_length, unit, d.task)[1]
               for d in denoisers)
