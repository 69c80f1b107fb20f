"""The nvd encoding (note / velocity / duration tokens, nano-GPT-v3): MIDI -> nvd -> MIDI round
trips on the bundled files, augmentation, odd and corrupt files, the corpus vocabulary; the
`prep-midi --encoding` plumbing; bits per second of music; the seeds' size table."""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amtrain.errors import UserError
from amtrain.midi.events import Notes, read_notes
from amtrain.midi.nvd import augment, notes_to_values, transpose, values_to_notes, variants
from amtrain.prep.encodings import prep_encoding
from amtrain.registry import encoding, encoding_names, family, modality
from amtrain.store import Dataset
from amtrain.tokens import get_tokenizer
from amtrain.tokens.midi import DRUMS
from amtrain.tokens.nvd import NvdTokenizer, count_tokens, max_steps, vocabulary
from tests.midi_helpers import MIDI_DIR, MIDI_FILES, SMALL_FILES, smf, vlq

SHARED_MIDI = Path("/work/shared/data/midi")


def bundled_files() -> list[Path]:
    """The repo's data/midi and, where present, the shared data folder, one file per content."""
    seen, out = set(), []
    for f in MIDI_FILES + sorted(SHARED_MIDI.glob("*.mid")):
        h = hashlib.md5(f.read_bytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(f)
    return out


def expected(notes: Notes, grid_ms: int) -> list[tuple[int, int, int, int]]:
    """What nvd keeps of a file: non-drum notes, (onset, pitch, velocity, duration) on the grid
    in 10 ms bins, leading silence trimmed, unclosed notes 250 ms, times capped at 10 s."""
    f = grid_ms // 10
    keep = notes.instr != DRUMS
    t = np.round(notes.time[keep] / f).astype(np.int64)
    d = np.round(np.where(notes.dur[keep] < 0, 25, notes.dur[keep]) / f).astype(np.int64)
    d = np.minimum(d, max_steps(grid_ms))
    t = t - t.min()
    assert (np.diff(np.sort(t)) <= max_steps(grid_ms)).all()  # no silence capped on these files
    return sorted(zip((t * f).tolist(), notes.pitch[keep].tolist(), notes.velocity[keep].tolist(),
                      (d * f).tolist(), strict=True))


def as_tuples(notes: Notes) -> list[tuple[int, int, int, int]]:
    return sorted(zip(notes.time.tolist(), notes.pitch.tolist(), notes.velocity.tolist(), notes.dur.tolist(),
                      strict=True))


@pytest.mark.parametrize("grid_ms", [10, 30])
def test_round_trip_keeps_pitch_onset_duration_and_velocity_on_the_grid(grid_ms):
    files = bundled_files()
    assert len(files) >= 8
    rng = np.random.default_rng(0)
    for f in files:
        notes = read_notes(f)
        # most bundled files hold one velocity: give every note its own, so velocity is tested
        notes = Notes(notes.time, notes.dur, notes.pitch, notes.instr, rng.integers(1, 128, len(notes)))
        values = notes_to_values(notes, grid_ms)
        tok = NvdTokenizer(vocabulary(count_tokens(values)), grid_ms)
        ids = tok.encode_values(values)
        assert ids[0] == tok.start_id and (ids.size - 1) % 4 == 0
        back = values_to_notes(tok.decode_values(ids), grid_ms)
        assert as_tuples(back) == expected(notes, grid_ms), f.name


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory):
    """The real files (one of them format 0) plus odd and corrupt ones."""
    d = tmp_path_factory.mktemp("nvd_in")
    for f in MIDI_FILES:
        shutil.copy(f, d / f.name)
    good = (MIDI_DIR / "music21_k525_mozart_mvt1.mid").read_bytes()
    (d / "zz_truncated.mid").write_bytes(good[: len(good) // 2])
    (d / "zz_text.midi").write_bytes(b"this is not MIDI at all\n")
    (d / "zz_huge_ticks.mid").write_bytes(smf([b"\xff\xff\xff\xff\x7f\x90\x3c\x40\x00\xff\x2f\x00"]))
    drums = b"".join(vlq(48) + bytes([0x99, 36 + i % 4, 100]) + vlq(48) + bytes([0x89, 36 + i % 4, 0]) for i in range(16))
    (d / "yy_drums_only.mid").write_bytes(smf([drums + b"\x00\xff\x2f\x00"]))
    (d / "yy_no_notes.mid").write_bytes(smf([b"\x00\xff\x51\x03\x07\xa1\x20\x00\xff\x2f\x00"]))
    return d


@pytest.fixture(scope="module")
def prepped(odd_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("nvd_out")
    rep = prep_encoding("nvd", [str(odd_corpus)], out, {"split": "ratio", "val_fraction": 0.0,
                                                         "test_fraction": 0.0, "max_length": 100_000},
                        workers=1, show_progress=False)
    return out, rep


def test_odd_and_corrupt_files_are_reported_by_name_and_the_batch_goes_on(prepped):
    out, rep = prepped
    s = rep.summary
    assert rep.num_corrupt == 3 and s.num_odd == 2 and s.num_files == len(MIDI_FILES) + 5
    reasons = {i["file"].rsplit("/", 1)[-1]: (i["reason"], i["error"]) for i in Dataset(out).manifest.skipped}
    assert "truncated" in reasons["zz_truncated.mid"][0] and "not a MIDI file" in reasons["zz_text.midi"][0]
    assert "absurd tick" in reasons["zz_huge_ticks.mid"][0]
    assert reasons["yy_drums_only.mid"] == ("drums only (16 drum notes; nvd has no drum tokens)", False)
    assert reasons["yy_no_notes.mid"] == ("no notes", False)
    assert s.num_docs["train"] == len(MIDI_FILES)  # format 0 (music21_test06_type0) included
    assert any(line.startswith(f"{out}: {len(MIDI_FILES) + 5} files (3 corrupt skipped") for line in rep.lines)


def test_prepped_dataset_decodes_to_the_files_notes(prepped):
    """Through the real pipeline: shards, the vocabulary in the manifest, the modality's notes."""
    out, _ = prepped
    ds = Dataset(out)
    m = ds.manifest
    tok = get_tokenizer(m.tokenizer, **m.tokenizer_params)
    assert isinstance(tok, NvdTokenizer) and m.tokenizer == "nvd" and ds.vocab_size == tok.vocab_size
    assert (out / "vocab.json").is_file()
    nvd = modality("nvd")
    got = sorted(as_tuples(nvd.notes(tok, np.asarray(d, np.int64))) for d in ds.documents("train"))
    want = sorted(expected(read_notes(f), 10) for f in MIDI_FILES)
    assert got == want


def test_augmentation_transpose_velocity_and_both():
    assert variants((-2, 0, 2), (5,)) == [(-2, 0), (-2, 5), (0, 5), (2, 0), (2, 5)]
    values = notes_to_values(read_notes(SMALL_FILES[1]))
    up = transpose(values, 3)
    assert (up[:, 1] == values[:, 1] + 3).all() and (up[:, [0, 2, 3]] == values[:, [0, 2, 3]]).all()
    # leaving 0..127 drops the note; the next separator takes its time, so onsets stay
    top = int(values[:, 1].max())
    cut = transpose(values, 127 - top + 1)
    kept = values[:, 1] != top
    assert len(cut) == kept.sum() and (np.cumsum(cut[:, 0]) == np.cumsum(values[:, 0])[kept] - (0 if kept[0] else 0)).all()
    loud = augment(values, 0, 200)
    assert (loud[:, 2] == 127).all() and (loud[:, [0, 1, 3]] == values[:, [0, 1, 3]]).all()
    both = augment(values, -2, -10)
    assert (both[:, 1] == values[:, 1] - 2).all() and (both[:, 2] == np.clip(values[:, 2] - 10, 1, 127)).all()


def test_augmented_share_of_train_and_val_untouched(tmp_path):
    files = [str(f) for f in MIDI_FILES]
    opts = {"split": "ratio", "val_fraction": 0.2, "test_fraction": 0.0, "transpose": (-2, 2), "velocity_shift": (8,)}
    plain = prep_encoding("nvd", files, tmp_path / "a", {k: opts[k] for k in ("split", "val_fraction", "test_fraction")},
                          workers=1, show_progress=False).summary
    s = prep_encoding("nvd", files, tmp_path / "b", {**opts, "augmented_share": 0.3}, workers=1,
                      show_progress=False).summary
    n_plain = plain.num_docs["train"]
    assert s.num_augmented_available >= 5 * n_plain - 5  # 5 variants (-2/+2, +8, both) of every piece
    assert s.num_augmented == round(0.3 / 0.7 * n_plain) and s.num_docs["train"] == n_plain + s.num_augmented
    assert s.num_docs["val"] == plain.num_docs["val"] and s.num_tokens["val"] == plain.num_tokens["val"]
    with pytest.raises(UserError, match="--augmented-share"):
        prep_encoding("nvd", files, tmp_path / "c", {"augmented_share": 1.0}, workers=1, show_progress=False)


def test_min_freq_vocabulary_snaps_rare_values_to_the_nearest_kept():
    values = notes_to_values(read_notes(SMALL_FILES[2]))
    counts = count_tokens(values)
    full, pruned = vocabulary(counts, 1), vocabulary(counts, 20)
    assert len(pruned) < len(full) and all(counts.get(t, 0) >= 20 or t in ("START", "END", "sep0", "n60", "v64", "d0")
                                           for t in pruned)
    tok = NvdTokenizer(pruned)
    back = tok.decode_values(tok.encode_values(values))
    kept = {k: np.array(sorted(tok.value[tok.kind == k])) for k in range(4)}
    for k in (1, 2, 3):  # pitch, velocity, duration: each the nearest value that has a token
        nearest = kept[k][np.abs(kept[k][None, :] - values[:, k][:, None]).argmin(1)]
        assert (np.abs(back[:, k] - values[:, k]) == np.abs(nearest - values[:, k])).all()


def test_prep_midi_encoding_plumbing_refuses_foreign_options(tmp_path):
    names = encoding_names()  # amt first; others (nvd, abc, plugins) by name
    assert names[0] == "amt" and "nvd" in names and names[1:] == sorted(names[1:]) and encoding("nvd").name == "nvd"
    with pytest.raises(UserError, match=r"--stretch: not an option of --encoding nvd"):
        prep_encoding("nvd", [str(SMALL_FILES[0])], tmp_path, {"stretch": (1.1,)})
    with pytest.raises(UserError, match=r"--min-freq, --velocity-shift: not an option of --encoding amt"):
        prep_encoding("amt", [str(SMALL_FILES[0])], tmp_path, {"min_freq": 2, "velocity_shift": (3,)})
    with pytest.raises(UserError, match=r"not a MIDI encoding; choose one of amt, .*nvd"):
        prep_encoding("xyz", [str(SMALL_FILES[0])], tmp_path, {})


def test_cli_prep_midi_nvd_exit_status_and_lines(odd_corpus, tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "amtrain", "prep-midi", str(odd_corpus), "--encoding", "nvd", "--out",
                        str(out), "--workers", "1", "--min-freq", "2", "--transpose", "-1,1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # corrupt inputs: non-zero, the rest written
    assert "skipped" in r.stderr and "zz_text.midi" in r.stderr and "yy_drums_only.mid" in r.stderr
    assert "vocabulary" in r.stdout and "--min-freq 2" in r.stdout
    assert Dataset(out).manifest.tokenizer == "nvd"


# ---------------------------------------------------------------- bits per second of music
def test_bits_per_second_hand_example():
    from amtrain.modalities.music import bits_per_second, seconds_of, tokens_per_second

    tok = NvdTokenizer(vocabulary({"sep100": 1, "n60": 1, "n62": 1, "v80": 1, "d100": 1}))
    nvd = modality("nvd")
    # two notes: 0-1 s and 1-2 s -> 2 s of music in 9 ids (START + 2 x 4)
    doc = np.array(tok.encode("START sep0 n60 v80 d100 sep100 n62 v80 d100"))
    assert seconds_of(nvd.notes(tok, doc)) == 2.0
    assert tokens_per_second(nvd, tok, [doc, doc]) == pytest.approx(4.5)
    # 1 nat per token over 18 tokens and 4 s: 18 / ln 2 / 4 bits per second
    assert bits_per_second(1.0, 4.5) == pytest.approx(18 / math.log(2) / 4)
    # AMT ids through the same door: one (time 0, dur 1 s, note) event = 3 tokens over 1 s
    from amtrain.tokens.midi import AUTOREGRESS, DUR_OFFSET, NOTE_OFFSET, TIME_OFFSET

    amt = np.array([AUTOREGRESS, TIME_OFFSET, DUR_OFFSET + 100, NOTE_OFFSET + 60])
    assert tokens_per_second(modality("midi"), get_tokenizer("midi"), [amt]) == pytest.approx(4.0)
    assert tokens_per_second(modality("tokens"), get_tokenizer("ascii"), [amt]) is None  # not music


# ---------------------------------------------------------------- the seeds' size table
SEED_NON_EMBEDDING = {"seed-tiny": 393_600, "seed-small": 3_147_008, "seed-medium": 18_877_952,
                      "seed-large": 56_630_016, "seed-xl": 151_008_256}


@pytest.mark.parametrize("size", list(SEED_NON_EMBEDDING))
def test_seed_size_table_shapes_and_matched_lstms(size):
    from amtrain.models.sizes import SEED_DECODER_SIZES

    cfg = family("decoder").config(size, vocab_size=600)
    row = SEED_DECODER_SIZES[size]
    assert (cfg.d_model, cfg.num_layers, cfg.d_ff) == (row["d_model"], row["num_layers"], row["d_ff"])
    with torch.device("meta"):
        dec = family("decoder").build(cfg)
        lstm = family("lstm").build(family("lstm").config(size, vocab_size=600))
    assert dec.num_params(non_embedding=True) == SEED_NON_EMBEDDING[size]
    assert lstm.num_params(non_embedding=True) == pytest.approx(SEED_NON_EMBEDDING[size], rel=0.005)


def test_size_tables_select_names():
    from amtrain.models.sizes import table_sizes

    assert table_sizes("seeds", ["tiny", "small"]) == ["seed-tiny", "seed-small"]
    assert table_sizes("seeds", None) == ["seed-tiny", "seed-small", "seed-medium", "seed-large", "seed-xl"]
    assert table_sizes("ladder", ["debug", "tiny"]) == ["debug", "tiny"]
    with pytest.raises(UserError, match="--size-table"):
        table_sizes("nope", None)
    with pytest.raises(UserError, match="not in the seeds size table"):
        table_sizes("seeds", ["huge"])
