"""The debug T5 learns to denoise real MIDI: AMT arrival-time triples, spans over whole events.

Needs the MIDI prep of the `midi` area (amtrain/prep/midi.py and the bundled files in data/midi);
until that lands beside this file the module is skipped at import."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from amtrain.data.span_corruption import (
    IGNORE_INDEX,
    Denoiser,
    DenoisingBatcher,
    T5Vocab,
    merge_inputs_targets,
    required_targets_length,
)
from amtrain.models.t5 import T5
from amtrain.registry import family
from amtrain.store.dataset import Dataset

midi_prep = pytest.importorskip("amtrain.prep.midi", reason="MIDI prep (midi area) not in this checkout yet")

torch.set_num_threads(1)
MIDI_DIR = Path(__file__).resolve().parents[1] / "data" / "midi"
DENOISERS = [Denoiser("R", 0.15, 2.0), Denoiser("X", 0.5, 4.0), Denoiser("S", 0.25)]
INPUTS_LENGTH = 96


@pytest.fixture(scope="module")
def midi_dataset(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("midi_in")
    for f in sorted(MIDI_DIR.glob("*.mid")):
        shutil.copy(f, src / f.name)
    out = tmp_path_factory.mktemp("midi_ds")
    midi_prep.prep_midi([str(src)], out, midi_prep.MidiPrepConfig(split="ratio", val_fraction=0.25, test_fraction=0.0),
              workers=1, show_progress=False)
    return out


def batcher(ds: Dataset, split: str, seed: int) -> DenoisingBatcher:
    """Windows inside each 1024-token AMT sequence, after its flag token, on triple boundaries."""
    vocab = T5Vocab(ds.vocab_size)
    targets_length = required_targets_length(INPUTS_LENGTH, DENOISERS, unit=3)
    return DenoisingBatcher(ds.tokens(split), vocab, INPUTS_LENGTH, targets_length, unit=3,
                            seed=seed, doc_starts=[ds.doc_starts(r) for r in ds.shards(split)],
                            unit_offset=1)


def test_midi_spans_cover_whole_events(midi_dataset):
    ds = Dataset(midi_dataset)
    b = batcher(ds, "train", seed=0)
    batch = b.batch(16, DENOISERS[:2])
    for x, m, y in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        n = int(m.sum())
        targets = y[y != IGNORE_INDEX][:-1]
        chunk = merge_inputs_targets(x[1:n - 1], targets, b.vocab)
        assert len(chunk) % 3 == 0
        times, durations = chunk[0::3], chunk[1::3]
        assert ds.manifest.special_ids["AUTOREGRESS"] not in chunk  # never the sequence flag
        # AMT layout: onset ids in [0, 10000), durations in [10000, 11000): aligned triples
        assert (times < 10_000).all() and ((durations >= 10_000) & (durations < 11_000)).all()
        bounds = np.append(np.flatnonzero(b.vocab.is_sentinel(targets)), len(targets))
        assert all((c - a - 1) % 3 == 0 for a, c in zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.slow
def test_denoising_loss_falls_on_real_midi(midi_dataset):
    ds = Dataset(midi_dataset)
    train, val = batcher(ds, "train", seed=0), batcher(ds, "val", seed=1)
    vocab = train.vocab
    cfg = family("t5").config("debug", vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                             decoder_start_token_id=vocab.pad_id)
    torch.manual_seed(0)
    model = T5(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    as_torch = lambda b: {"input_ids": torch.from_numpy(b.input_ids),  # noqa: E731
                          "attention_mask": torch.from_numpy(b.attention_mask),
                          "labels": torch.from_numpy(b.labels)}
    val_batch = as_torch(val.batch(16, DENOISERS))
    with torch.no_grad():
        before = model(**val_batch)[1].item()
    for _ in range(40):
        loss = model(**as_torch(train.batch(8, DENOISERS)), return_logits=False)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = model(**val_batch)[1].item()
    print(f"midi: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.75 * before, (before, after)
