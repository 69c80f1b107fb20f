"""Shared helpers for the MIDI tests (a plain module, imported by tests/test_midi*.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIDI_DIR = REPO / "data" / "midi"
MIDI_FILES = sorted(MIDI_DIR.glob("*.mid"))
SMALL_FILES = [MIDI_DIR / n for n in ("music21_test03_soprano_piano.mid", "music21corpus_bach_bwv66.6.mid",
                                       "music21corpus_clara_schumann_polonaise_op1n1.mid")]


def smf(tracks: list[bytes], fmt: int = 1, tpb: int = 96) -> bytes:
    """A Standard MIDI File from raw track bodies (delta-time + message bytes)."""
    out = b"MThd" + (6).to_bytes(4, "big") + fmt.to_bytes(2, "big") + len(tracks).to_bytes(2, "big") + tpb.to_bytes(2, "big")
    for body in tracks:
        out += b"MTrk" + len(body).to_bytes(4, "big") + body
    return out


def vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))
