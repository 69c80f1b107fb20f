"""`amtrain codec init OUT`: a stand-in EnCodec for trying the audio path offline.

The real architecture (or the small `debug` one) with random weights, whose codebooks are fitted
to real audio (`init_codebooks_from_audio`: k-means on the first stage, matched Gaussians on
the rest), written as a Hugging Face folder (config.json + model.safetensors) that
`--codec-path OUT` (or `AMTRAIN_CODEC_DIR=OUT`) loads like the pretrained weights. Its codes
use many entries at every stage, so prep, training and rollouts behave as with the real codec;
the decoded audio is not faithful (the weights are random). See docs/audio.md.
"""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console
from amtrain.config import REPO_ROOT

BUNDLED_AUDIO = REPO_ROOT / "data" / "audio"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def register(app: typer.Typer) -> None:
    codec = typer.Typer(help="Audio codec utilities (EnCodec).", no_args_is_help=True)
    codec.command("init")(init)
    app.add_typer(codec, name="codec")


def init(
    out: Path = typer.Argument(..., help="Folder to write config.json + model.safetensors into."),
    from_audio: Path = typer.Option(BUNDLED_AUDIO, "--from-audio", help="Audio file or folder the codebooks are fitted to (default: the bundled data/audio)."),
    codec_model: str = typer.Option("24khz", "--codec-model", help="24khz (mono) | 48khz (stereo)."),
    size: str = typer.Option("full", help="full: EnCodec's own architecture; debug: a small one (fast, for tests)."),
    seconds: float = typer.Option(30.0, help="Seconds of audio read per file for the codebook fit."),
    seed: int = typer.Option(0, help="Seed of the random weights and the fit."),
) -> None:
    """Make a stand-in EnCodec (random weights, codebooks fitted to real audio) to try the audio path offline."""

    from amtrain.codec import debug_config, encodec_config, save_hf_folder, stand_in_model
    from amtrain.errors import UserError

    if codec_model not in ("24khz", "48khz"):
        raise UserError(f"--codec-model {codec_model!r}: 24khz or 48khz")
    if size not in ("full", "debug"):
        raise UserError(f"--size {size!r}: full or debug")
    files = sorted(p for p in ([from_audio] if from_audio.is_file() else from_audio.rglob("*"))
                   if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"--from-audio {from_audio}: no audio files ({', '.join(AUDIO_SUFFIXES)}) there")
    config = debug_config(codec_model) if size == "debug" else encodec_config(codec_model)
    rate, channels = config.sampling_rate, config.audio_channels
    waves = [_read(p, rate, channels, seconds) for p in files]
    folder = save_hf_folder(stand_in_model(codec_model, size, waves, seed), out)
    total = sum(w.shape[-1] for w in waves) / rate
    console().print(f"[bold]{folder}[/]: EnCodec {codec_model} ({size}, random weights), codebooks fitted to "
                    f"{total:.1f} s of {len(files)} file(s); use it with --codec-path {folder}", highlight=False)


def _read(path: Path, rate: int, channels: int, seconds: float):
    """(C, N) float32 at the codec's rate and channel count, at most `seconds` long."""
    import librosa
    import numpy as np

    from amtrain.errors import UserError

    try:
        y, _ = librosa.load(path, sr=rate, mono=channels == 1, duration=seconds)
    except Exception as e:  # noqa: BLE001 - soundfile/audioread failures all mean "unreadable"
        raise UserError(f"{path}: not readable audio ({type(e).__name__}: {e}); pass other files with --from-audio") from None
    y = np.atleast_2d(y).astype(np.float32)
    if channels == 2 and y.shape[0] == 1:
        y = np.repeat(y, 2, axis=0)
    return y
