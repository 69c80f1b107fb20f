"""Fill-in-the-middle (FIM) training windows, after Bavarian et al. 2022, "Efficient Training of
Language Models to Fill in the Middle" (arXiv 2207.14255), as StarCoder / SantaCoder / Code
Llama train it. numpy only; every draw is a function of (seed, epoch, window id).

Id layout above a base vocabulary of size V (`FimSpec`; the model's vocab_size is V + 3):

    0 .. V-1   the base tokenizer's ids, untouched
    V          <fim_prefix>
    V+1        <fim_suffix>
    V+2        <fim_middle>
    end_id     the tokenizer's end id (gpt2 <|endoftext|>, MIDI SEPARATOR, audio <eot>) closes
               the middle, as StarCoder's <|endoftext|> does: an in-fill stops there

A training window w of L = seq_len + 1 tokens becomes, with probability `rate` (else it stays as
it is), the same number of tokens. Its first n = L - 4 ids are cut at a <= b <= e into prefix
c[:a], middle c[a:b], suffix c[b:e] and the rest c[e:n]; the piece c[:e] is the FIM document,
closed by the end id, and the rest follows it as the next document follows <|endoftext|> in
StarCoder's packed data:

    PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <end> rest
    SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <end> rest   (prob. spm_rate)

SPM is the paper's "variant 2" (prefix and middle stay one left-to-right run). The loss covers
every position, as in the paper; the middle starts at index e - b + a + 3 in both formats, the
end id sits at e + 3. Were the piece the whole window, the end id would always sit at its last
position, and a model would learn to stop from the position alone (a causal model can tell
it: measured, docs/benchmarks.md, fill-in-the-middle); with the piece's end drawn it sits anywhere, so stopping
must come from the middle meeting the suffix.

The piece's end e is uniform over the window's legal cuts (documents end anywhere in a packed
window), a <= b two uniform draws over the legal cuts up to e, sorted (an empty middle is
possible, as in the paper). Cuts are token positions (not characters: the loader sees ids,
and MIDI and audio have no characters). Legal cuts keep a modality's units whole
(`Modality.span_layout`: MIDI 3-token events after the AMT flag, audio K-codebook frames after
<eot>): a cut sits on a unit boundary of the document holding it, after its header. Where units
are whole only inside a document (`inside_documents`), b and e are also cut back to the end of
the document a falls in, so a middle (and the suffix) is always whole units of one piece, as a
rollout asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

NUM_SENTINELS = 3
FIM_STREAM = 7_170_707  # keeps FIM's draws apart from every other use of the training seed


@dataclass(frozen=True)
class FimSpec:
    """How a run's windows are transformed (module doc); recorded as the run's meta["fim"]."""

    rate: float
    """Share of training windows turned into FIM examples (data.fim_rate)."""
    spm_rate: float
    """Share of FIM examples in SPM order, the rest PSM (data.fim_spm_rate)."""
    base_vocab_size: int
    """V: the sentinels are V, V+1, V+2."""
    end_id: int
    """The id closing a middle (the tokenizer's end id)."""
    unit: int = 1
    """Tokens per unit: cuts never split one."""
    offset: int = 0
    """Tokens at each document start before its first unit (a cut never falls inside them)."""
    inside_documents: bool = False
    """A middle never crosses a document boundary."""

    @property
    def prefix_id(self) -> int:
        return self.base_vocab_size

    @property
    def suffix_id(self) -> int:
        return self.base_vocab_size + 1

    @property
    def middle_id(self) -> int:
        return self.base_vocab_size + 2

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: base ids plus the three sentinels."""
        return self.base_vocab_size + NUM_SENTINELS

    @property
    def spm_at_inference(self) -> bool:
        """Prompt in the order trained more often (PSM on a tie, as StarCoder prompts)."""
        return self.spm_rate > 0.5

    @property
    def needs_documents(self) -> bool:
        """Legal cuts depend on where documents start."""
        return self.unit > 1 or self.offset > 0 or self.inside_documents

    def meta(self) -> dict:
        return {**asdict(self), "prefix_id": self.prefix_id, "suffix_id": self.suffix_id,
                "middle_id": self.middle_id}

    @classmethod
    def from_meta(cls, d: dict) -> FimSpec:
        return cls(**{k: d[k] for k in ("rate", "spm_rate", "base_vocab_size", "end_id", "unit", "offset",
                                        "inside_documents")})


def legal_cuts(n: int, start: int, doc_starts: np.ndarray | None, unit: int, offset: int) -> np.ndarray:
    """Cut positions p in [0, n] of content starting at shard position `start` that keep units
    whole: shard position q = start + p lies `offset + k * unit` after the start of the document
    holding token q (so a middle starts after a document's header, never on it). (k,) int64,
    ascending."""
    p = np.arange(n + 1, dtype=np.int64)
    if doc_starts is None:
        return p
    q = start + p
    into = q - doc_starts[np.searchsorted(doc_starts, q, side="right") - 1]  # from the start of q's document
    return p[(into >= offset) & ((into - offset) % unit == 0)]


def draw_cuts(rng: np.random.Generator, cuts: np.ndarray, doc_bounds: np.ndarray | None) -> tuple[int, int, int]:
    """(a, b, e): e uniform over the legal cuts, a <= b two uniform draws over those up to e,
    sorted; with `doc_bounds` (document starts inside the content, as positions) b and e are
    cut back to the end of a's document."""
    e = rng.choice(cuts)
    a, b = np.sort(rng.choice(cuts[cuts <= e], size=2))
    if doc_bounds is not None:
        later = doc_bounds[doc_bounds > a]
        if later.size:
            b, e = min(b, later[0]), min(e, later[0])
    return int(a), int(b), int(e)


def permute(content: np.ndarray, a: int, b: int, e: int, spm: bool, spec: FimSpec) -> np.ndarray:
    """The FIM example of content cut at a <= b <= e (module doc): len(content) + 4 ids."""
    prefix, middle, suffix, rest = content[:a], content[a:b], content[b:e], content[e:]
    pre, suf, mid, end = ([spec.prefix_id], [spec.suffix_id], [spec.middle_id], [spec.end_id])
    parts = ([pre, suf, suffix, mid, prefix, middle] if spm else [pre, prefix, suf, suffix, mid, middle]) + [end, rest]
    return np.concatenate([np.asarray(x, np.int64) for x in parts])


def middle_start(a: int, b: int, e: int) -> int:
    """Index of the middle's first id in the FIM example of content cut at (a, b, e), in PSM
    and SPM alike; the middle runs to e + 3, where the end id sits."""
    return e - b + a + 3


class FimWindows:
    """The loader's FIM transform: rows of whole windows in, the same shape out; window `i` of
    epoch `e` is transformed (or not) by a generator seeded with (seed, FIM_STREAM, e, i) alone,
    so batches do not depend on the world size and a resumed run draws as the uninterrupted one."""

    def __init__(self, spec: FimSpec, seed: int, doc_starts: list[np.ndarray] | None = None):
        """`doc_starts`: per shard, its documents' start offsets (needed when
        `spec.needs_documents`)."""
        self.spec, self.seed = spec, seed
        self.doc_starts: list[np.ndarray] | None = None
        if spec.needs_documents:
            assert doc_starts is not None, spec
            self.doc_starts = [np.asarray(d, np.int64) for d in doc_starts]

    def draw(self, n: int, epoch: int, window_id: int, shard: int, start: int) -> tuple[int, int, int, bool] | None:
        """The cuts (a, b, e) and order (SPM?) of a window whose n content ids start at `start` of
        shard `shard`, or None: the window stays plain."""
        rng = np.random.default_rng([self.seed, FIM_STREAM, epoch, window_id])
        if rng.random() >= self.spec.rate or n < 1:
            return None
        docs = None if self.doc_starts is None else self.doc_starts[shard]
        cuts = legal_cuts(n, start, docs, self.spec.unit, self.spec.offset)
        if cuts.size == 0:
            return None
        bounds = None
        if self.spec.inside_documents:
            assert docs is not None
            bounds = docs[(docs > start) & (docs < start + n)] - start
        return (*draw_cuts(rng, cuts, bounds), bool(rng.random() < self.spec.spm_rate))

    def window(self, w: np.ndarray, epoch: int, window_id: int, shard: int, start: int) -> np.ndarray:
        """One window (L,) starting at `start` of shard `shard` -> (L,) ids."""
        cut = self.draw(w.size - 4, epoch, window_id, shard, start)
        return w if cut is None else permute(w[:w.size - 4], *cut, self.spec)
