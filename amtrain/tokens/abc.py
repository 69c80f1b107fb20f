"""The ABC-notation vocabulary (symbolic-music scaling laws): ABC text <-> (symbol, argument)
pairs <-> ids, with a vocabulary built from the corpus.

ABC text is read as a sequence of *units*, each exactly two tokens, so that T5 spans and
fill-in-the-middle cut on whole units and an ABC note (accidental, letter, octave marks and
length) is never split:

    unit                      symbol token          argument token
    note  ^c'6                `^c'` (accidental,    `DUR:6` (length in L units: DUR:1 is
                              letter, octave marks)  a bare note, DUR:3/2 is `3/2`)
    rest  z12                 `z` (or `x`)          `DUR:12`
    chord [C6E6]              `[` ... `]`           `DUR:0` (a `]` with a length: `DUR:n`)
    tie, bar line, tuplet     `-`, `|`, `:|`, `(3`  `DUR:0` (takes no time)
    field M:4/4 (line or [M:...] inline)  `M:` / `[M:`  the value: `4/4`
    MIDI directive            `%%MIDI program`      `40`

Text fields (T:, w:, ...), comments, other %% directives, quoted annotations, decorations
`!...!`, spaces and line breaks are not music and are dropped when lexing; `render` writes
the canonical text (a field on its own line, a line break after each bar line), and
`lex(render(pairs)) == pairs`.

Ids: the five specials first, then the corpus vocabulary in the order it was built (by
frequency, ties by first appearance), saved in the dataset's manifest (JSON):

    0 <PAD>   1 <UNK>   2 <START>   3 <END>   4 <SEP>   5.. vocabulary

A document is `<START>` + units + `<END>`; `<SEP>` is reserved (the seed's), unused by prep.
A token outside the vocabulary (rarer than `--min-freq` in the corpus) is `<UNK>`; rendering
drops a unit with an `<UNK>`, or skips a bad pairing, so any id sequence renders to text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction
from functools import lru_cache

import numpy as np

from amtrain.errors import UserError

PAD, UNK, START, END, SEP = "<PAD>", "<UNK>", "<START>", "<END>", "<SEP>"
SPECIALS = (PAD, UNK, START, END, SEP)
UNIT = 2
NO_LENGTH = "DUR:0"
FIELDS_KEPT = set("XMLQKVP")
"""Header fields that carry music (reference, meter, unit length, tempo, key, voice, parts)."""

Pair = tuple[str, str]

_FIELD_LINE = re.compile(r"^([A-Za-z]):(.*)$")
_MIDI_DIRECTIVE = re.compile(r"^%%MIDI\s+(program|channel)\s+(\S+)")
_BODY = re.compile(r"""
    (?P<inline>\[(?P<ik>[A-Za-z]):(?P<iv>[^\]\n]*)\])
  | (?P<note>(?P<acc>\^\^|\^|__|_|=)?(?P<letter>[A-Ga-g])(?P<oct>[,']*)(?P<len>\d*/*\d*))
  | (?P<rest>(?P<rs>[zxZX])(?P<rlen>\d*/*\d*))
  | (?P<close>\](?P<clen>\d*/*\d*))
  | (?P<bar>\[\||\|\]|\|\||\|:|:\|\d*|::|\|\d*)
  | (?P<tuplet>\(\d(?::\d*)*)
  | (?P<skip>\s+|\\|"[^"\n]*"|![^!\n]*!|%[^\n]*)
  | (?P<other>.)
""", re.VERBOSE)


def length_token(text: str) -> str:
    """An ABC length suffix -> its token: '' -> DUR:1, '6' -> DUR:6, '/' -> DUR:1/2,
    '3/2' -> DUR:3/2, '//' -> DUR:1/4."""
    m = re.fullmatch(r"(\d*)(/*)(\d*)", text)
    if m is None:
        raise ValueError(f"not an ABC length: {text!r}")
    num = int(m.group(1)) if m.group(1) else 1
    slashes, den_text = m.group(2), m.group(3)
    den = 1 if not slashes else int(den_text) if den_text else 2 ** len(slashes)
    value = Fraction(num, max(den, 1))
    return f"DUR:{value.numerator}" if value.denominator == 1 else f"DUR:{value.numerator}/{value.denominator}"


def length_text(token: str) -> str:
    """DUR:n -> the ABC suffix ('' for DUR:1 and DUR:0)."""
    value = token[4:]
    return "" if value in ("1", "0") else value


def is_length(token: str) -> bool:
    return token.startswith("DUR:")


def lex(text: str) -> list[Pair]:
    """ABC text -> (symbol, argument) units (see the module doc); what is not music is dropped."""
    pairs: list[Pair] = []
    for line in text.splitlines():
        stripped = line.strip()
        directive = _MIDI_DIRECTIVE.match(stripped)
        if directive:
            pairs.append((f"%%MIDI {directive.group(1)}", directive.group(2)))
            continue
        if stripped.startswith("%"):
            continue
        field = _FIELD_LINE.match(stripped)
        if field:
            key, value = field.group(1), field.group(2).split("%")[0].strip()
            if key in FIELDS_KEPT:
                pairs.append((f"{key}:", value))
            continue
        pairs.extend(_lex_body(line))
    return pairs


def _lex_body(line: str) -> list[Pair]:
    out: list[Pair] = []
    for m in _BODY.finditer(line):
        kind = m.lastgroup
        if kind == "skip" or kind is None:
            continue
        if kind == "inline":
            out.append((f"[{m.group('ik')}:", m.group("iv").strip()))
        elif kind == "note":
            out.append((f"{m.group('acc') or ''}{m.group('letter')}{m.group('oct')}", length_token(m.group("len"))))
        elif kind == "rest":
            out.append((m.group("rs"), length_token(m.group("rlen"))))
        elif kind == "close":
            out.append(("]", length_token(m.group("clen")) if m.group("clen") else NO_LENGTH))
        elif kind in ("bar", "tuplet"):
            out.append((m.group(0), NO_LENGTH))
        else:
            out.append((m.group(0), NO_LENGTH))
    return out


def render(pairs: Iterable[Pair]) -> str:
    """Units -> canonical ABC text: fields on their own lines, a line break after each bar line."""
    parts: list[str] = []
    at_line_start = True
    for sym, arg in pairs:
        field = sym.startswith("%%MIDI ") or (len(sym) == 2 and sym[1] == ":")
        if (field or sym.startswith("[") and sym.endswith(":")) and is_length(arg):
            continue  # a field holding a length: no lexer makes it (a model's output)
        if field:
            if not at_line_start:
                parts.append("\n")
            parts.append(f"{sym} {arg}\n" if sym.startswith("%%") else f"{sym}{arg}\n")
            at_line_start = True
            continue
        if sym.startswith("[") and sym.endswith(":"):
            parts.append(f"{sym}{arg}]")
        elif is_length(arg) and _body_unit_ok(sym, arg):
            parts.append(sym + length_text(arg) if sym == "]" or _is_timed(sym) else sym)
        else:
            continue  # a pairing no lexer makes (a model's output): dropped
        at_line_start = False
        if sym[0] in "|:[" and ("|" in sym or sym == "::"):
            parts.append("\n")
            at_line_start = True
    if not at_line_start:
        parts.append("\n")
    return "".join(parts)


@lru_cache(maxsize=4096)
def _body_unit_ok(sym: str, arg: str) -> bool:
    """A body unit renders to text that lexes back to it (not, e.g., `DUR:5` as a symbol)."""
    text = sym + length_text(arg) if sym == "]" or _is_timed(sym) else sym
    back = _lex_body(text)
    return len(back) == 1 and back[0][0] == sym and (back[0][1] == arg or length_text(back[0][1]) == length_text(arg))


def _is_timed(sym: str) -> bool:
    return sym in ("z", "x", "Z", "X") or bool(re.fullmatch(r"(\^\^|\^|__|_|=)?[A-Ga-g][,']*", sym))


class AbcTokenizer:
    """ABC text <-> ids over a vocabulary built from a corpus (`build`), saved as JSON params."""

    name = "abc"

    def __init__(self, vocab: list[str] | tuple[str, ...] = ()):
        tokens = list(SPECIALS) + [t for t in vocab if t not in SPECIALS]
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        if len(self.index) != len(tokens):
            raise UserError("abc tokenizer: the vocabulary lists a token twice; re-run prep")
        self.vocab_size = len(tokens)
        self.pad_id, self.unk_id, self.start_id, self.end_id, self.sep_id = range(5)
        self.eot_id = self.end_id
        self.special_ids = {t: i for i, t in enumerate(SPECIALS)}

    @classmethod
    def build(cls, pair_docs: Iterable[list[Pair]], min_freq: int = 1) -> AbcTokenizer:
        """A vocabulary of the tokens seen at least `min_freq` times, most frequent first."""
        counts: Counter[str] = Counter()
        for doc in pair_docs:
            for sym, arg in doc:
                counts[sym] += 1
                counts[arg] += 1
        return cls.from_counts(counts, min_freq)

    @classmethod
    def from_counts(cls, counts: Counter[str], min_freq: int = 1) -> AbcTokenizer:
        """The vocabulary of token counts: those >= `min_freq`, most frequent first (ties by
        first insertion)."""
        if min_freq < 1:
            raise UserError(f"--min-freq {min_freq}: must be >= 1")
        return cls([t for t, n in counts.most_common() if n >= min_freq])

    def params(self) -> dict:
        return {"vocab": self.tokens[len(SPECIALS):]}

    # -- ids ------------------------------------------------------------------------------
    def encode_pairs(self, pairs: Iterable[Pair], document: bool = True) -> np.ndarray:
        """Units -> ids (`<START>` ... `<END>` around a document); unknown tokens -> `<UNK>`."""
        get, unk = self.index.get, self.unk_id
        ids = [get(t, unk) for pair in pairs for t in pair]
        if document:
            ids = [self.start_id, *ids, self.end_id]
        return np.asarray(ids, np.int64)

    def encode(self, text: str) -> list[int]:
        """ABC text -> ids of its units (no `<START>`/`<END>`)."""
        return self.encode_pairs(lex(text), document=False).tolist()

    def decode_pairs(self, ids) -> list[Pair]:
        """Ids -> units: `<START>` re-aligns the pairing, `<END>` stops; a unit whose argument
        is `<UNK>`, `<PAD>` or outside the vocabulary is dropped; a symbol position holding one
        of those or a length is skipped by one token, so the pairing re-aligns on the next
        note (ids a model in-filled, an odd number of them, do not shift what follows)."""
        toks: list[str | None] = []
        for i in np.asarray(ids, np.int64).ravel().tolist():
            if i == self.end_id:
                break
            if i == self.start_id:
                if len(toks) % UNIT:
                    toks.pop()  # a document restarts: units pair up from here
                continue
            toks.append(self.tokens[i] if len(SPECIALS) <= i < self.vocab_size else None)
        pairs = []
        k = 0
        while k + 1 < len(toks):
            sym, arg = toks[k], toks[k + 1]
            if sym is None or is_length(sym):
                k += 1  # a length never opens a unit: re-align (after an odd in-fill, an <UNK>)
                continue
            if arg is not None:
                pairs.append((sym, arg))
            k += UNIT
        return pairs

    def decode(self, ids) -> str:
        return render(self.decode_pairs(ids))

    def layout(self) -> list[tuple[str, int, int, str]]:
        """Blocks for `amtrain vocab`: specials, then the corpus vocabulary."""
        return [("specials", 0, len(SPECIALS), " ".join(SPECIALS)),
                ("vocabulary", len(SPECIALS), self.vocab_size - len(SPECIALS),
                 "ABC symbols and arguments from the corpus, most frequent first")]
