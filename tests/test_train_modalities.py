"""The same launcher and loop train the decoder on MIDI event shards (validation in AMT's event
perplexity) and on EnCodec audio-token shards; bitsandbytes' 8-bit AdamW through the engine."""

from __future__ import annotations

import math

import pytest

from amtrain.train.loop import train
from tests.conftest import REPO
from tests.train_helpers import from_args, metrics, tiny

pytestmark = pytest.mark.slow


def _train(data, out, **over):
    args = tiny(data, out, **{"data.seq_len": 96, "batch.global_tokens": 768, "train.max_steps": 16, "train.eval_batches": 2, **over})
    return train(from_args(args))


def test_decoder_trains_on_midi_and_reports_event_perplexity(tmp_path):
    from amtrain.prep.midi import MidiPrepConfig, prep_midi

    ds = tmp_path / "midi"
    prep_midi([str(REPO / "data" / "midi")], ds, MidiPrepConfig(split="ratio", val_fraction=0.2, test_fraction=0.0),
              show_progress=False)
    res = _train(ds, tmp_path / "run")
    rows = metrics(res.run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    val = metrics(res.run_dir, "val")[-1]
    assert val["event_ppl"] == pytest.approx(math.exp(3 * val["val_loss"]), rel=1e-9)
    assert val["bits_per_event"] == pytest.approx(3 * val["val_loss"] / math.log(2), rel=1e-9)


def test_decoder_trains_on_audio_codes(tmp_path):
    from amtrain.prep.audio import AudioPrepConfig, prep_audio
    from tests.audio_helpers import random_model, save_codec

    codec = save_codec(random_model(), tmp_path / "codec")
    ds = tmp_path / "audio"
    prep_audio([str(REPO / "data" / "audio")], ds, AudioPrepConfig(codec_path=str(codec), bandwidth=1.5, chunk_seconds=2.0,
                                                                  ), show_progress=False)
    res = _train(ds, tmp_path / "run", **{"data.val_split": "train"})  # two files: all in train (split per file)
    rows = metrics(res.run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert math.isfinite(metrics(res.run_dir, "val")[-1]["val_loss"])


def test_adamw8bit_trains_and_resumes_exactly(kjv_gpt2, tmp_path):
    """bitsandbytes' 8-bit AdamW (its CPU kernels here) through the DeepSpeed engine: the loss
    falls, and its quantized state resumes exactly."""
    over = {"optim.optimizer": "adamw8bit", "train.checkpoint_every": 4}
    full = train(from_args(tiny(kjv_gpt2, tmp_path / "full", **over)))
    assert full.losses[8] < full.losses[1] - 1.0
    step4 = full.run_dir / "checkpoints" / "step_00000004"
    resumed = train(from_args(tiny(kjv_gpt2, tmp_path / "resumed", **{**over, "train.resume": str(step4)})))
    for step in range(5, 9):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=0), step
