"""ABC notation (`prep-midi --encoding abc`): MIDI -> ABC -> MIDI keeps every note on the grid on
the bundled files, the tokenizer round-trips and builds its vocabulary from the corpus
(--min-freq, <UNK>), odd and corrupt files are reported by name while the batch goes on, units
of two keep an ABC note whole, notes() reads ids back in 10 ms bins, and the decoder, LSTM and
T5 train on it under the launcher."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest

from amtrain.midi.abc import (
    GRID,
    AbcError,
    abc_to_notes,
    abc_to_score,
    midi_to_tunes,
    score_grid_notes,
)
from amtrain.tokens.abc import AbcTokenizer, lex, render
from tests.midi_helpers import MIDI_FILES, smf, vlq
from tests.train_helpers import LAUNCHER, argv, metrics, run, tiny


@pytest.mark.parametrize("path", MIDI_FILES, ids=lambda p: p.stem)
def test_midi_abc_midi_keeps_every_note_on_the_grid(path):
    piece, tunes = midi_to_tunes(path.read_bytes())
    assert len(tunes) == 1
    text = render(tunes[0])
    back = score_grid_notes(abc_to_score(text))
    # (is_drum, program, pitch, onset, duration): the same multiset, note for note
    assert Counter(back) == Counter(piece.notes()), path.name
    assert len(back) > 100


def test_grid_is_the_files_rhythm_rounded_to_sixteenths():
    """The grid notes are the file's own onsets and durations in quarter notes, rounded."""
    import symusic

    path = next(p for p in MIDI_FILES if "bach" in p.name)
    score = symusic.Score(str(path))
    piece, _ = midi_to_tunes(path.read_bytes())
    tpq = score.ticks_per_quarter
    want = sorted((int(n.pitch), round(n.time * GRID / tpq), round(n.duration * GRID / tpq))
                  for t in score.tracks for n in t.notes)
    first = min(a for _, a, _ in want) // (4 * GRID) * 4 * GRID
    assert sorted((p, a + first, d) for _, _, p, a, d in piece.notes()) == sorted(want)


def test_tokenizer_round_trips_text_ids_text():
    path = next(p for p in MIDI_FILES if "bach" in p.name)
    _, tunes = midi_to_tunes(path.read_bytes())
    text = render(tunes[0])
    tok = AbcTokenizer.build(tunes, min_freq=1)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_pairs(tunes[0])) == text  # with <START> ... <END>
    assert "UNK" not in text and len(ids) == 2 * len(tunes[0])


def test_lexer_reads_abc_written_elsewhere():
    """Flats, naturals, chords with a length, fractions, tuplets, inline fields; text fields,
    comments, decorations and annotations dropped; canonical text lexes back the same."""
    text = ("X:3\nT:A title\nM:6/8\nL:1/8\nQ:1/4=80\nK:F % comment\nV:1\n%%MIDI program 40\n"
            '_B,/2=B3/2 [CEG]2 (3abc z// "Am"!trill!c\'2-c\'|[K:D] ^^f,, x4 :|\n')
    pairs = lex(text)
    assert pairs[:5] == [("X:", "3"), ("M:", "6/8"), ("L:", "1/8"), ("Q:", "1/4=80"), ("K:", "F")]
    assert ("%%MIDI program", "40") in pairs
    body = pairs[pairs.index(("%%MIDI program", "40")) + 1:]
    assert body == [("_B,", "DUR:1/2"), ("=B", "DUR:3/2"), ("[", "DUR:0"), ("C", "DUR:1"), ("E", "DUR:1"),
                    ("G", "DUR:1"), ("]", "DUR:2"), ("(3", "DUR:0"), ("a", "DUR:1"), ("b", "DUR:1"),
                    ("c", "DUR:1"), ("z", "DUR:1/4"), ("c'", "DUR:2"), ("-", "DUR:0"), ("c'", "DUR:1"),
                    ("|", "DUR:0"), ("[K:", "D"), ("^^f,,", "DUR:1"), ("x", "DUR:4"), (":|", "DUR:0")]
    assert lex(render(pairs)) == pairs


def test_min_freq_vocabulary_and_unk():
    a = [("X:", "1"), ("C", "DUR:4"), ("C", "DUR:4"), ("^F", "DUR:2"), ("|", "DUR:0")]
    b = [("X:", "1"), ("C", "DUR:4"), ("|", "DUR:0")]
    tok = AbcTokenizer.build([a, b], min_freq=2)
    assert tok.tokens[:5] == ["<PAD>", "<UNK>", "<START>", "<END>", "<SEP>"]
    assert set(tok.tokens[5:]) == {"X:", "1", "C", "DUR:4", "|", "DUR:0"}  # ^F and DUR:2 seen once
    assert tok.tokens[5:7] == ["C", "DUR:4"]  # most frequent first
    ids = tok.encode_pairs(a)
    assert (ids == tok.unk_id).sum() == 2
    assert tok.decode_pairs(ids) == [p for p in a if p != ("^F", "DUR:2")]  # the <UNK> unit dropped
    from amtrain.tokens import get_tokenizer

    again = get_tokenizer("abc", **json.loads(json.dumps(tok.params())))
    assert again.tokens == tok.tokens and again.vocab_size == len(tok.tokens)


def test_decode_survives_any_ids():
    tok = AbcTokenizer(["C", "DUR:4", "M:", "4/4", "|", "DUR:0", "1/4=96", "[", "]"])
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = tok.decode(rng.integers(-3, tok.vocab_size + 3, 40))
        # what is written is what a lexer reads back: no length or value in a symbol's place
        assert all(not s.startswith("DUR:") and s not in ("4/4", "1/4=96") for s, _ in lex(text)), text
        abc_to_notes(text)  # abc2midi is tolerant; never raises
    assert tok.decode([tok.start_id, 5, 6, 5, tok.start_id, 5, 6, tok.end_id, 5, 6]) == "C4C4\n"
    assert tok.decode([5, 6, 6, 5, 6, 1, 6, 5, 6]) == "C4C4C4\n"  # an odd in-fill and an <UNK>: re-aligned


def _odd_files(folder):
    """format 0, drums only, huge ticks, no notes, garbage bytes, and a good file."""
    on, off = b"\x90\x3c\x40", b"\x80\x3c\x00"
    end = b"\x00\xff\x2f\x00"
    files = {
        "format0.mid": smf([b"\x00\xc0\x05\x00" + on + b"\x60" + off + b"\x00\x91\x40\x40\x60\x81\x40\x00" + end], fmt=0),
        "drums.mid": smf([b"\x00\x99\x24\x64\x30\x89\x24\x00\x00\x99\x26\x64\x30\x89\x26\x00" + end]),
        "huge_ticks.mid": smf([b"\x00" + on + vlq(0x0FFFFFFF) + off + b"\x00" + on + b"\x60" + off + end]),
        "no_notes.mid": smf([b"\x00\xff\x51\x03\x07\xa1\x20" + end]),
        "garbage.mid": bytes(range(256)) * 4,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    good = next(p for p in MIDI_FILES if "bach" in p.name)
    (folder / good.name).write_bytes(good.read_bytes())
    return files


def test_odd_files_are_reported_by_name_and_the_batch_goes_on(tmp_path, capsys):
    from amtrain.prep.encodings import prep_encoding
    from amtrain.store import Dataset

    src = tmp_path / "in"
    src.mkdir()
    _odd_files(src)
    with pytest.raises(AbcError, match="no notes"):
        midi_to_tunes((src / "no_notes.mid").read_bytes())
    _, drum_tunes = midi_to_tunes((src / "drums.mid").read_bytes())
    assert ("%%MIDI channel", "10") in drum_tunes[0]
    drums = abc_to_notes(render(drum_tunes[0]))
    assert len(drums) == 2 and set(drums.instr.tolist()) == {128} and sorted(drums.pitch.tolist()) == [36, 38]
    _, f0 = midi_to_tunes((src / "format0.mid").read_bytes())
    assert ("%%MIDI program", "5") in f0[0] and ("%%MIDI program", "0") in f0[0]  # two channels, two voices
    assert sorted(abc_to_notes(render(f0[0])).pitch.tolist()) == [60, 64]

    rep = prep_encoding("abc", [str(src)], tmp_path / "ds", {"split": "1/0/0", "min_freq": 1}, workers=1,
                        show_progress=False)
    err = capsys.readouterr().err
    for bad, why in (("garbage.mid", "not a readable MIDI file"), ("no_notes.mid", "no notes"),
                     ("huge_ticks.mid", "absurd tick values")):
        line = next((ln for ln in " ".join(err.split()).split("skipped ") if f"{bad}: " in ln), "")
        assert why in line, err
    assert rep.num_corrupt == 3
    assert rep.summary.num_tunes["train"] == 3  # bach, drums, format 0
    ds = Dataset(tmp_path / "ds")
    assert ds.manifest.tokenizer == "abc"
    assert json.loads((tmp_path / "ds" / "vocab.json").read_text())["tokens"][:5] == ["<PAD>", "<UNK>", "<START>",
                                                                                     "<END>", "<SEP>"]


def test_units_keep_notes_whole_and_notes_read_back_in_10ms_bins(tmp_path):
    """Documents are <START>, (symbol, argument) units, <END>: the T5/FIM unit (2, offset 1)
    never splits an ABC note; notes() of a document plays its tune at its tempo."""
    from amtrain.prep.encodings import prep_encoding
    from amtrain.registry import modality_of
    from amtrain.store import Dataset
    from amtrain.tokens import get_tokenizer

    bach = next(p for p in MIDI_FILES if "bach" in p.name)
    prep_encoding("abc", [str(bach)], tmp_path / "ds", {"split": "1/0/0", "min_freq": 1, "max_length": 200},
                  workers=1, show_progress=False)
    ds = Dataset(tmp_path / "ds")
    tok = get_tokenizer(ds.manifest.tokenizer, **ds.manifest.tokenizer_params)
    mod = modality_of("abc")
    layout = mod.span_layout(tok)
    assert (layout.unit, layout.offset, layout.inside_documents) == (2, 1, True)
    docs = [np.asarray(d) for d in ds.documents("train")]
    assert len(docs) >= 2 and all(d.size <= 200 for d in docs)
    for d in docs:
        assert d[0] == tok.start_id and d[-1] == tok.end_id and d.size % 2 == 0
        syms = [tok.tokens[i] for i in d[1:-1:2]]
        args = [tok.tokens[i] for i in d[2:-1:2]]
        assert not any(s.startswith("DUR:") for s in syms)
        assert all(a.startswith("DUR:") for s, a in zip(syms, args, strict=True) if not s.endswith(":") and "%" not in s)
    notes = mod.notes(tok, docs[0])
    assert mod.has_velocity is False and len(notes) > 10
    # 96 bpm, a grid step a sixteenth: onsets are multiples of 60 / 96 / 4 s = 15.625 bins
    step = 100 * 60 / 96 / GRID
    assert np.abs(notes.time / step - np.round(notes.time / step)).max() * step <= 1.0
    assert np.all(np.diff(notes.time) >= 0)


@pytest.mark.slow
def test_decoder_lstm_and_t5_train_on_abc_under_the_launcher(tmp_path):
    from amtrain.prep.encodings import prep_encoding

    ds = tmp_path / "ds"
    prep_encoding("abc", [str(p) for p in MIDI_FILES], ds, {"split": "6/1/1", "max_length": 1000}, workers=1,
                  show_progress=False)
    for arch, extra in (("decoder", {}), ("lstm", {}), ("t5", {"batch.global_tokens": 1028, "train.max_steps": 4})):
        args = tiny(ds, tmp_path / arch, **{"model.arch": arch, "train.max_steps": 6, "train.eval_every": 6, **extra})
        run([sys.executable, LAUNCHER, *argv(args)], timeout=300)
        rows = metrics(tmp_path / arch)
        assert rows[-1]["loss"] < rows[0]["loss"], (arch, rows)
        assert np.isfinite(metrics(tmp_path / arch, "val")[-1]["val_loss"])
    p = run([sys.executable, "-m", "amtrain", "rollout", str(tmp_path / "decoder"), "--length", "60",
             "--out", str(tmp_path / "roll")])
    assert (tmp_path / "roll" / "sample_0.abc").is_file() and (tmp_path / "roll" / "sample_0.mid").is_file(), p.stdout


@pytest.mark.parametrize("context", [64, 70, 98])
def test_held_out_prompts_cut_between_units(context):
    """`amtrain rollout` without --prompt: the opening and an in-fill gap fall between units."""
    from types import SimpleNamespace

    from amtrain.modalities.base import RolloutConfig
    from amtrain.registry import modality_of

    _, tunes = midi_to_tunes(next(p for p in MIDI_FILES if "bach" in p.name).read_bytes())
    tok = AbcTokenizer.build(tunes)
    doc = tok.encode_pairs(tunes[0])
    rm = SimpleNamespace(context=context, tokenizer=tok)
    mod = modality_of("abc")
    (opening,), _, _ = mod.document_prompt(rm, doc, RolloutConfig(mode="continue"))
    assert opening.size % 2 == 0 and opening.size > 0
    (pre, suf), piece, what = mod.document_prompt(rm, doc, RolloutConfig(mode="infill"))
    assert pre.size % 2 == 0 and (piece.size - suf.size) % 2 == 0 and piece.size % 2 == 0, what
    assert pre.size < piece.size - suf.size  # a gap is held out
    assert tok.decode_pairs(np.concatenate([pre, suf])) == tok.decode_pairs(pre) + tok.decode_pairs(suf)


def test_split_shares_and_length_filter(tmp_path):
    from amtrain.errors import UserError
    from amtrain.prep.abc import AbcPrepConfig, file_split
    from amtrain.prep.encodings import prep_encoding

    assert AbcPrepConfig().shares() == pytest.approx((0.01, 0.01))  # the seed's 98/1/1
    assert AbcPrepConfig(split="6/1/1").shares() == pytest.approx((1 / 8, 1 / 8))
    assert AbcPrepConfig(split="ratio", val_fraction=0.2, test_fraction=0.0).shares() == (0.2, 0.0)
    for bad in ("98/2", "a/b/c", "0/1/0"):
        with pytest.raises(UserError, match="--split"):
            AbcPrepConfig(split=bad)
    assert [file_split(m, 0.25, 0.25) for m in ("0" * 32, "5" + "0" * 31, "9" + "0" * 31)] == ["val", "test", "train"]
    bach = next(p for p in MIDI_FILES if "bach" in p.name)
    _, tunes = midi_to_tunes(bach.read_bytes(), 200)
    sizes = [2 * len(t) + 2 for t in tunes]
    assert len(sizes) >= 3 and max(sizes) <= 200
    cut = min(sizes) + 1
    rep = prep_encoding("abc", [str(bach)], tmp_path / "a", {"split": "1/0/0", "max_length": 200, "min_length": cut},
                        workers=1, show_progress=False)
    assert (rep.summary.num_tunes["train"], rep.summary.num_short) == (sum(n >= cut for n in sizes),
                                                                      sum(n < cut for n in sizes))
    assert rep.summary.num_short >= 1


def test_tempo_changes_keep_seconds():
    """Inline [Q:] in the first voice, also after its last note: onsets and durations in 10 ms
    bins follow the file's tempo map."""
    import symusic

    from amtrain.midi.abc import midi_to_abc

    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, qpm=120.0))
    s.tempos.append(symusic.Tempo(480 * 8, qpm=60.0))
    for program, time, pitch in ((0, 0, 60), (40, 480 * 8, 67)):
        track = symusic.Track(program=program)
        track.notes.append(symusic.Note(time, 480, pitch, 80))
        s.tracks.append(track)
    notes = abc_to_notes(midi_to_abc(s.dumps_midi()))
    assert notes.time.tolist() == [0, 400] and notes.dur.tolist() == [50, 100]
    assert notes.instr.tolist() == [0, 40] and notes.velocity.tolist() == [72, 72]


def test_rerun_resumes_from_the_per_file_cache(tmp_path):
    """A rerun reads converted files back from OUT/.abc_units; a torn or missing entry is
    converted again, and the dataset comes out the same."""
    from amtrain.prep.encodings import prep_encoding
    from amtrain.store import Dataset

    files = [str(p) for p in MIDI_FILES if "bach" in p.name or "soprano" in p.name or "type0" in p.name]
    opts = {"split": "2/1/0", "min_freq": 1, "max_length": 1000}
    prep_encoding("abc", files, tmp_path / "ds", opts, workers=1, show_progress=False)
    def docs():
        ds = Dataset(tmp_path / "ds")
        return {k: [np.asarray(d).tolist() for d in ds.documents(k)] for k in ds.manifest.splits}

    first = docs()
    entries = sorted((tmp_path / "ds" / ".abc_units").glob("*.json"))
    assert len(entries) == 3
    entries[0].write_text(entries[0].read_text()[:100])  # torn
    entries[1].unlink()
    rep = prep_encoding("abc", files, tmp_path / "ds", opts, workers=1, show_progress=False)
    again = docs()
    assert again == first and sum(len(v) for v in first.values()) == sum(rep.summary.num_tunes.values())
