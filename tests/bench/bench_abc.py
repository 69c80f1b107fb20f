"""Benchmark `prep-midi --encoding abc` on the bundled MIDI against a music21-based conversion of
the same files in the same run (what the symbolic-music scaling-laws seed did: music21 parses the
MIDI, its notes, chords and rests are written as ABC tokens), and report tokens per second of
music for abc.

    OMP_NUM_THREADS=1 python tests/bench/bench_abc.py [--repeat 1] [--rounds 2]

Needs music21 (`pip install -e '.[abc-bench]'`, music21==9.9.1). Prints a markdown table.
Both sides run in one process, file after file (workers=1), best of --rounds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MIDI_DIR = REPO / "data" / "midi"


def music21_abc(path: Path) -> list[str]:
    """The seed's way: music21 parses the file; per part, each note, chord and rest becomes ABC
    tokens (accidental + letter + octave marks, DUR:n in sixteenths, z, | per measure)."""
    import music21

    score = music21.converter.parse(str(path), quantizePost=True)
    tokens: list[str] = []
    for part in score.parts:
        tokens.append("V:")
        for measure in part.getElementsByClass("Measure"):
            for el in measure.flatten().notesAndRests:
                dur = f"DUR:{max(1, round(float(el.quarterLength) * 4))}"
                if el.isRest:
                    tokens += ["z", dur]
                    continue
                pitches = el.pitches
                if len(pitches) > 1:
                    tokens.append("[")
                for p in pitches:
                    acc = {1: "^", -1: "_", 0: ""}.get(int(p.alter), "")
                    octave = (p.octave or 4) - 4
                    name = p.step.lower() + "'" * (octave - 1) if octave >= 1 else p.step + "," * (-octave)
                    tokens += [acc + name, dur]
                if len(pitches) > 1:
                    tokens.append("]")
            tokens.append("|")
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1, help="copies of the bundled files")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        import music21  # noqa: F401
    except ImportError:
        sys.exit("bench_abc needs music21: pip install -e '.[abc-bench]' (music21==9.9.1)")
    from amtrain.midi.abc import midi_to_tunes
    from amtrain.prep.encodings import prep_encoding

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for k in range(args.repeat):
            for p in sorted(MIDI_DIR.glob("*.mid")):
                shutil.copy(p, src / f"{k}_{p.name}")
        files = sorted(src.glob("*.mid"))
        best: dict[str, float] = {}

        def timed(name, fn):
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                out = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            return out

        rep = timed("prep", lambda: prep_encoding("abc", [str(src)], Path(tmp) / f"ds{time.perf_counter_ns()}",
                                                  {"split": "98/1/1"}, workers=1, show_progress=False))
        timed("convert", lambda: [midi_to_tunes(p.read_bytes(), 5000) for p in files])
        m21 = timed("music21", lambda: [music21_abc(p) for p in files])
    s = rep.summary
    n = len(files)
    print(f"{n} files ({args.repeat} x the {n // args.repeat} bundled), {s.num_notes:,} notes, "
          f"{s.seconds_of_music:,.0f} s of music; best of {args.rounds}; workers=1\n")
    print("| conversion | seconds | files/s | notes/s | vs music21 |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("prep", "amtrain prep-midi --encoding abc (whole prep)"),
                        ("convert", "amtrain MIDI -> ABC units only"),
                        ("music21", "music21 parse + ABC tokens (seed style)")):
        t = best[name]
        print(f"| {label} | {t:.2f} | {n / t:.2f} | {s.num_notes / t:,.0f} | {best['music21'] / t:.1f}x |")
    total = sum(s.num_tokens.values())
    print(f"\nabc: {total:,} ids in {sum(s.num_tunes.values())} tunes, vocabulary {s.vocab_size}; "
          f"{s.tokens_per_second_of_music:.1f} ids per second of music "
          f"(music21 seed-style: {sum(len(t) for t in m21) / s.seconds_of_music:.1f} tokens per second of music)")


if __name__ == "__main__":
    main()
