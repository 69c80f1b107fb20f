"""The nvd vocabulary: nano-GPT-v3's note / velocity / duration tokens, built from a corpus.

A note is one *event* of four tokens, in this order:

    sep{k}   time since the previous note's onset, k grid steps (0 = a chord tone); the seed's
             `sepxx` separators, read as the time between events
    n{p}     pitch, p = 0..127
    v{v}     velocity, v = 1..127 (all values; no bins)
    d{k}     duration, k grid steps (0 = shorter than one step)

A document (one piece, or one `max_length` part of it) is `START` followed by whole events, the
first with `sep0` (leading silence is trimmed). `END` closes a generated piece (the tokenizer's
end id); prep writes none, so a document is exactly 1 + 4 x events ids. Grid: `grid_ms`
milliseconds (default 10, the MIDI reader's resolution); `sep` and `d` are capped at
MAX_SECONDS (longer silences and notes are shortened and counted by prep).

The vocabulary is the corpus's: every token seen at least `min_freq` times, ids in a fixed order
(START, END, then sep, n, v, d, each by value), saved as the tokenizer's parameters in the
dataset manifest (and as `vocab.json` beside it). A value with no token of its own (a rare
duration under `--min-freq`, a new file's long silence) is written as the nearest value of the
same kind that has one.

Example (grid 10 ms): middle C, velocity 80, held 0.5 s, then E and G together 0.5 s later:
`START sep0 n60 v80 d50 sep50 n64 v72 d50 sep0 n67 v72 d50`.
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("sep", "n", "v", "d")
"""Token kinds in event order; an event's values are (sep, pitch, velocity, duration)."""
EVENT_SIZE = len(KINDS)
SPECIALS = ("START", "END")
MAX_SECONDS = 10.0
"""Longest silence between onsets and longest duration one token holds."""
_TOKEN = re.compile(r"^(sep|n|v|d)(\d+)$")


def max_steps(grid_ms: int) -> int:
    return round(MAX_SECONDS * 1000 / grid_ms)


def token_of(kind: int, value: int) -> str:
    return f"{KINDS[kind]}{value}"


def parse_token(token: str) -> tuple[int, int] | None:
    """"n60" -> (kind 1, value 60); a special -> None."""
    m = _TOKEN.match(token)
    if m is None:
        return None
    return KINDS.index(m.group(1)), int(m.group(2))


def count_tokens(values: np.ndarray, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Add the tokens of event values (N, 4) to `counts` (token -> occurrences)."""
    counts = {} if counts is None else counts
    for k in range(EVENT_SIZE):
        vals, n = np.unique(values[:, k], return_counts=True)
        for v, c in zip(vals.tolist(), n.tolist(), strict=True):
            t = token_of(k, v)
            counts[t] = counts.get(t, 0) + c
    return counts


def vocabulary(counts: dict[str, int], min_freq: int = 1) -> list[str]:
    """Tokens seen at least `min_freq` times (always sep0, n60, v64, d0 so every kind has a
    value to snap to), in id order: specials, then by kind and value."""
    kept = {t for t, c in counts.items() if c >= min_freq} | {"sep0", "n60", "v64", "d0"}
    parsed = sorted(p for p in (parse_token(t) for t in kept) if p is not None)
    return list(SPECIALS) + [token_of(k, v) for k, v in parsed]


class NvdTokenizer:
    """Event values (N, 4) <-> ids over a corpus vocabulary (module doc)."""

    name = "nvd"

    def __init__(self, tokens: list[str], grid_ms: int = 10):
        if list(tokens[:len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"an nvd vocabulary starts with {SPECIALS}")
        self.tokens = list(tokens)
        self.grid_ms = int(grid_ms)
        self.vocab_size = len(self.tokens)
        self.start_id, self.eot_id = 0, 1
        self.special_ids = {"START": 0, "END": 1}
        self.cap = max_steps(self.grid_ms)
        kind = np.full(self.vocab_size, -1, np.int64)
        value = np.zeros(self.vocab_size, np.int64)
        for i, t in enumerate(self.tokens[len(SPECIALS):], len(SPECIALS)):
            p = parse_token(t)
            if p is None:
                raise ValueError(f"nvd token {t!r} is not sep/n/v/d followed by a number")
            kind[i], value[i] = p
        self.kind, self.value = kind, value
        limits = (self.cap, 127, 127, self.cap)
        self._lookup = []  # per kind: value 0..limit -> id of the nearest value with a token
        for k, limit in enumerate(limits):
            ids = np.flatnonzero(kind == k)
            vals = value[ids]
            grid = np.arange(limit + 1)
            pos = np.clip(np.searchsorted(vals, grid), 1, len(vals) - 1) if len(vals) > 1 else np.zeros_like(grid)
            if len(vals) > 1:
                left_closer = (grid - vals[pos - 1]) <= (vals[pos] - grid)
                pos = np.where(left_closer, pos - 1, pos)
            self._lookup.append(ids[pos])

    def params(self) -> dict:
        return {"tokens": self.tokens, "grid_ms": self.grid_ms}

    def encode_values(self, values: np.ndarray) -> np.ndarray:
        """Event values (N, 4) -> ids: START then the events (values clipped to the token caps,
        a value without a token as the nearest that has one)."""
        values = np.asarray(values, np.int64).reshape(-1, EVENT_SIZE)
        out = np.empty((len(values), EVENT_SIZE), np.int64)
        for k in range(EVENT_SIZE):
            table = self._lookup[k]
            out[:, k] = table[np.clip(values[:, k], 0, len(table) - 1)]
        return np.concatenate([[self.start_id], out.ravel()])

    def decode_values(self, ids) -> np.ndarray:
        """Ids -> event values (N, 4) in grid steps: every `n` followed by `v` and `d` is a note,
        its onset the sum of all `sep` values before it; specials, stray and out-of-range ids
        are skipped. The first column is the onset (absolute steps), not the separator."""
        ids = np.asarray(ids, np.int64).ravel()
        ok = (ids >= 0) & (ids < self.vocab_size)
        ids = ids[ok]
        kind, value = self.kind[ids], self.value[ids]
        onset = np.cumsum(np.where(kind == 0, value, 0))
        n = np.flatnonzero(kind[:-2] == 1) if len(ids) > 2 else np.zeros(0, np.int64)
        n = n[(kind[n + 1] == 2) & (kind[n + 2] == 3)]
        return np.stack([onset[n], value[n], value[n + 1], value[n + 2]], 1).reshape(-1, EVENT_SIZE)

    def decode(self, ids) -> str:
        return " ".join(self.tokens[i] if 0 <= i < self.vocab_size else f"<{i}>" for i in np.asarray(ids).tolist())

    def encode(self, text: str) -> list[int]:
        """Token text ("START sep0 n60 v80 d50 ...") -> ids; a word outside the vocabulary is an error."""
        index = {t: i for i, t in enumerate(self.tokens)}
        try:
            return [index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not in this nvd vocabulary") from None

    def layout(self) -> list[tuple[str, int, int, str]]:
        """(block, offset, size, meaning) per block, for `amtrain vocab`."""
        rows = [("START", 0, 1, "document start"), ("END", 1, 1, "end of a generated piece")]
        meaning = {"sep": f"time since the previous onset, {self.grid_ms} ms steps", "n": "pitch",
                   "v": "velocity", "d": f"duration, {self.grid_ms} ms steps"}
        for k, name in enumerate(KINDS):
            ids = np.flatnonzero(self.kind == k)
            if len(ids):
                rows.append((name, int(ids[0]), len(ids), f"{meaning[name]}: {self.value[ids[0]]}..{self.value[ids[-1]]}"))
        return rows
