"""Helpers for tests/test_audio*.py and tests/bench/bench_audio.py: random-weight EnCodec models
with data-initialised codebooks, saved through amtrain.codec's writers (both weight forms)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO / "data" / "audio"
JOPLIN = AUDIO / "joplin_maple_leaf_fluidr3_24k_mono_30s.wav"
MELODY = AUDIO / "music21_test_audio.wav"


def random_model(model: str = "24khz", size: str = "debug", seed: int = 0, init_seconds: float = 10.0):
    """EnCodec with random weights (seeded) and codebooks fitted to `init_seconds` of Joplin."""
    import soundfile as sf

    from amtrain.codec import stand_in_model

    y, sr = sf.read(JOPLIN, dtype="float32", frames=int(init_seconds * 24000))
    if model == "48khz":
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=48000)
    x = y[None] if model == "24khz" else np.stack([y, y])
    return stand_in_model(model, "debug" if size == "debug" else "full", [x], seed=seed)


def save_codec(net, folder: Path, form: str = "hf", weights: str = "model.safetensors") -> Path:
    """Write `net` as a HF folder (form='hf') or an original .th checkpoint (+ config.json when
    the architecture is not the standard one); returns the path to pass as --codec-path."""
    from amtrain.codec import save_hf_folder, save_original_checkpoint
    from amtrain.codec.encodec import ORIGINAL_NAMES, encodec_config

    rate = "48khz" if net.config.sampling_rate == 48000 else "24khz"
    if form == "hf":
        return save_hf_folder(net, folder, weights)
    standard = encodec_config(rate).to_dict()
    mine = net.config.to_dict()
    differs = any(mine.get(k) != v for k, v in standard.items() if k not in ("transformers_version", "overlap"))
    save_original_checkpoint(net, folder / ORIGINAL_NAMES[rate], with_config=differs)
    return folder
