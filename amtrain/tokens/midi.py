"""The MIDI vocabulary: arrival-time event triples in the Anticipatory Music Transformer layout.

Constants transcribed from jthickstun/anticipation (Apache-2.0), `anticipation/config.py`
(commit 08a1a5d) and `anticipation/vocab.py` (commit e1bbb9c); the tests pin every value.

An *event* is three ids (time, duration, note), all in absolute 10 ms bins:

    block            offset   size    id = offset + ...
    TIME             0        10000   onset bin (0..9999 = up to 100 s inside one sequence)
    DUR              10000    1000    duration bin (0..999, capped at 10 s)
    NOTE             11000    16512   instrument*128 + pitch (instrument 128 = drums)
    REST             27512    1       the note of a rest event (time, DUR+0, REST)
    CONTROL block    27513    27512   the same three blocks again, for anticipated controls:
      ATIME          27513    10000
      ADUR           37513    1000
      ANOTE          38513    16512
    SEPARATOR        55025    1       file boundary, written as a triple (SEP, SEP, SEP)
    AUTOREGRESS      55026    1       sequence flag: no controls in the sequence
    ANTICIPATE       55027    1       sequence flag: anticipated controls interleaved
    vocab size       55028

A training sequence is 1024 ids: one flag, then 341 events (AMT's CONTEXT_SIZE = 1 + 3*M).
`eot_id` is SEPARATOR: it is the id AMT puts where one piece ends and the next begins.
"""

from __future__ import annotations

import numpy as np

# anticipation/config.py
CONTEXT_SIZE = 1024
EVENT_SIZE = 3
M = 341
DELTA = 5  # anticipation interval, seconds
MAX_TIME_IN_SECONDS = 100
MAX_DURATION_IN_SECONDS = 10
TIME_RESOLUTION = 100  # bins per second (10 ms)
MAX_PITCH = 128
MAX_INSTR = 129  # 128 General MIDI programs + drums
MAX_NOTE = MAX_PITCH * MAX_INSTR
COMPOUND_SIZE = 5
MAX_TRACK_INSTR = 16
MAX_TRACK_TIME_IN_SECONDS = 3600
MIN_TRACK_TIME_IN_SECONDS = 10
MIN_TRACK_EVENTS = 100
LAKH_SPLITS = "0123456789abcdef"
LAKH_VALID = ("e",)
LAKH_TEST = ("f",)
MAX_TIME = TIME_RESOLUTION * MAX_TIME_IN_SECONDS
MAX_DUR = TIME_RESOLUTION * MAX_DURATION_IN_SECONDS
DRUMS = 128  # the instrument code of channel 10 (index 9)

# anticipation/vocab.py
EVENT_OFFSET = 0
TIME_OFFSET = EVENT_OFFSET
DUR_OFFSET = TIME_OFFSET + MAX_TIME
NOTE_OFFSET = DUR_OFFSET + MAX_DUR
REST = NOTE_OFFSET + MAX_NOTE
CONTROL_OFFSET = NOTE_OFFSET + MAX_NOTE + 1
ATIME_OFFSET = CONTROL_OFFSET + 0
ADUR_OFFSET = ATIME_OFFSET + MAX_TIME
ANOTE_OFFSET = ADUR_OFFSET + MAX_DUR
SPECIAL_OFFSET = ANOTE_OFFSET + MAX_NOTE
SEPARATOR = SPECIAL_OFFSET
AUTOREGRESS = SPECIAL_OFFSET + 1
ANTICIPATE = SPECIAL_OFFSET + 2
VOCAB_SIZE = ANTICIPATE + 1

SPECIAL_IDS = {"SEPARATOR": SEPARATOR, "AUTOREGRESS": AUTOREGRESS, "ANTICIPATE": ANTICIPATE, "REST": REST}


def layout() -> list[tuple[str, int, int, str]]:
    """Every block of the vocabulary: (name, offset, size, meaning), in id order."""
    return [
        ("TIME", TIME_OFFSET, MAX_TIME, "event onset, 10 ms bins since the sequence start"),
        ("DUR", DUR_OFFSET, MAX_DUR, "event duration, 10 ms bins (capped at 9.99 s)"),
        ("NOTE", NOTE_OFFSET, MAX_NOTE, "instrument*128 + pitch; instrument 128 = drums"),
        ("REST", REST, 1, "note id of a rest event (no gap between events exceeds 1 s)"),
        ("ATIME", ATIME_OFFSET, MAX_TIME, "anticipated control onset"),
        ("ADUR", ADUR_OFFSET, MAX_DUR, "anticipated control duration"),
        ("ANOTE", ANOTE_OFFSET, MAX_NOTE, "anticipated control note"),
        ("SEPARATOR", SEPARATOR, 1, "piece boundary, as the triple (SEP, SEP, SEP)"),
        ("AUTOREGRESS", AUTOREGRESS, 1, "sequence flag: plain autoregressive sequence"),
        ("ANTICIPATE", ANTICIPATE, 1, "sequence flag: controls interleaved (anticipation)"),
    ]


def describe_triple(t: int, d: int, n: int) -> str:
    """One triple as text: `1.23s+0.50s i0:p60`, `A1.23s+...` for controls, `rest@1.00s`, `SEP`."""
    if t == d == n == SEPARATOR:
        return "SEP"
    if n == REST and TIME_OFFSET <= t < DUR_OFFSET:
        return f"rest@{(t - TIME_OFFSET) / TIME_RESOLUTION:.2f}s"
    for base, tag in ((TIME_OFFSET, ""), (ATIME_OFFSET, "A")):
        time, dur, note = t - base, d - base - MAX_TIME, n - base - MAX_TIME - MAX_DUR
        if 0 <= time < MAX_TIME and 0 <= dur < MAX_DUR and 0 <= note < MAX_NOTE:
            instr, pitch = divmod(note, MAX_PITCH)
            who = "drums" if instr == DRUMS else f"i{instr}"
            return f"{tag}{time / TIME_RESOLUTION:.2f}s+{dur / TIME_RESOLUTION:.2f}s {who}:p{pitch}"
    return f"?({t},{d},{n})"


class MidiTokenizer:
    """The AMT arrival-time vocabulary (55,028 ids). Text in/out is the readable event listing;
    MIDI files are turned into ids by `amtrain.midi` (prep-midi), not by `encode`."""

    name = "midi"
    vocab_size = VOCAB_SIZE
    eot_id = SEPARATOR
    special_ids = dict(SPECIAL_IDS)

    def encode(self, text: str) -> list[int]:
        """Space-separated integer ids (AMT's pre-tokenized text format) -> ids, checked."""
        from amtrain.errors import UserError

        ids = [int(x) for x in text.split()]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise UserError(f"id {bad[0]} outside the MIDI vocabulary [0, {VOCAB_SIZE}); check the token file")
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Readable events: flags by name, then one item per triple (see `describe_triple`)."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        out, i = [], 0
        while i < len(ids) and ids[i] in (AUTOREGRESS, ANTICIPATE):
            out.append("AUTOREGRESS" if ids[i] == AUTOREGRESS else "ANTICIPATE")
            i += 1
        for j in range(i, len(ids) - 2, 3):
            out.append(describe_triple(*ids[j:j + 3]))
        tail = (len(ids) - i) % 3
        if tail:
            out.append("+" + ",".join(map(str, ids[len(ids) - tail:])))
        return " | ".join(out)

    def layout(self) -> list[tuple[str, int, int, str]]:
        return layout()

    def params(self) -> dict:
        return {}
