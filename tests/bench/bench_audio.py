"""Benchmark `prep-audio` on this CPU with the real EnCodec 24 kHz architecture (random weights,
codebooks fitted to real audio: timing does not depend on the weights' values).

Reports the real-time factor (seconds of audio per second of compute) of the whole prep and of
its stages (decode = read + mix + resample, codec, features, write), and compares the whole prep
with the baseline measured in the same run: the codec's own `EncodecModel.encode` of the same
audio, already decoded and resampled, one call per file.

    OMP_NUM_THREADS=1 python tests/bench/bench_audio.py [--repeat 2] [--threads 1] [--rounds 2]

Targets (issue 5): features >= 50x real time; whole prep <= 1.3x the codec's own encode time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for audio_helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo

from audio_helpers import JOPLIN, MELODY, random_model, save_codec  # noqa: E402


def make_inputs(folder: Path, repeat: int) -> list[Path]:
    """The shipped recordings as they are (24 kHz mono wav; 44.1 kHz wav) plus a longer mix of
    both as flac and mp3 at 44.1 kHz, so decoding and resampling are exercised too."""
    import librosa
    import soundfile as sf

    j, _ = sf.read(JOPLIN, dtype="float32")
    m, sr = sf.read(MELODY, dtype="float32")
    j44 = librosa.resample(j, orig_sr=24000, target_sr=sr)
    long = np.concatenate([j44, m] * repeat)
    sf.write(folder / "mix.flac", long, sr)
    sf.write(folder / "mix.mp3", long[: len(long) // 2], sr)
    return [JOPLIN, MELODY, folder / "mix.flac", folder / "mix.mp3"]


def codec_baseline(codec, files: list[Path]) -> tuple[float, float]:
    """(seconds of audio, seconds of codec.model.encode) on the decoded, resampled audio."""
    import torch

    from amtrain.prep.audio import Times, read_blocks

    audio_s, enc_s = 0.0, 0.0
    for f in files:
        y = np.concatenate(list(read_blocks(f, codec.sample_rate, codec.channels, Times())), axis=1)
        x = torch.from_numpy(y)[None]  # (1, C, N)
        t0 = time.perf_counter()
        with torch.inference_mode():
            codec.model.encode(x, bandwidth=6.0)
        enc_s += time.perf_counter() - t0
        audio_s += y.shape[1] / codec.sample_rate
    return audio_s, enc_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="copies of joplin+melody in the long inputs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved baseline/prep rounds; best of each is reported")
    args = ap.parse_args()
    import torch

    from amtrain.codec import load_codec
    from amtrain.prep.audio import AudioPrepConfig, prep_audio, warm_up

    torch.set_num_threads(args.threads)
    base_runs, prep_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codec_dir = save_codec(random_model("24khz", size="real"), tmp / "codec", "original")
        files = make_inputs(tmp, args.repeat)
        codec = load_codec(codec_dir, "24khz")
        warm_up(codec)
        codec_baseline(codec, [JOPLIN])  # warm the codec too
        for r in range(args.rounds):  # interleaved, best of each: the machine is shared
            audio_s, enc_s = codec_baseline(codec, files)
            base_runs.append(enc_s)
            prep_runs.append(prep_audio([str(f) for f in files], tmp / f"ds{r}", AudioPrepConfig(codec_path=str(codec_dir)),
                                        show_progress=False))
    enc_s = min(base_runs)
    s = min(prep_runs, key=lambda x: x.wall_seconds)
    print(f"rounds: baseline {', '.join(f'{x:.2f}' for x in base_runs)} s; prep "
          f"{', '.join(f'{x.wall_seconds:.2f}' for x in prep_runs)} s (best of each below)")
    t = s.times
    rtf = t.real_time_factors()
    print(f"device: CPU, torch threads {args.threads}; EnCodec 24 kHz real architecture "
          f"({sum(p.numel() for p in codec.model.parameters()) / 1e6:.2f} M params), 6 kbps (8 codebooks)")
    print(f"audio: {len(files)} files, {audio_s:.1f} s")
    print(f"baseline codec encode (whole files, in memory): {enc_s:.2f} s = {audio_s / enc_s:.1f}x real time")
    print(f"prep-audio wall (excl. {s.setup_seconds:.1f} s setup): {s.wall_seconds:.2f} s = {t.audio_seconds / s.wall_seconds:.1f}x real time")
    for k in ("decode", "codec", "features", "write"):
        print(f"  {k:9s} {getattr(t, k):7.2f} s  {rtf[k]:9.1f}x real time")
    ratio = s.wall_seconds / enc_s
    print(f"features >= 50x real time: {rtf['features']:.1f}x -> {'PASS' if rtf['features'] >= 50 else 'FAIL'}")
    print(f"whole prep / codec encode = {ratio:.3f} (target <= 1.3) -> {'PASS' if ratio <= 1.3 else 'FAIL'}")
    print(f"prep wall / its own codec calls = {s.wall_seconds / t.codec:.3f} (everything that is not the codec)")


if __name__ == "__main__":
    main()
