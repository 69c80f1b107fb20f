"""Chunk features on real music against silence; novelty equals Foote's explicit checkerboard."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from audio_helpers import JOPLIN, MELODY

from amtrain.prep.audio_features import (
    FLOOR,
    FeatureParams,
    checkerboard_novelty,
    chunk_features,
    frame_features,
)


def _chunks(y, sr=24000, seconds=5.0):
    p = FeatureParams(sr, 320)
    frames = frame_features(y, p)
    num = -(-y.size // 320)
    step = int(seconds * 75)
    bounds = [(a, min(a + step, num)) for a in range(0, num, step)]
    return chunk_features(frames, p, bounds, 0), frames


@pytest.fixture(scope="module")
def music_then_silence():
    import librosa

    joplin, _ = sf.read(JOPLIN, dtype="float32")  # 30 s at 24 kHz
    melody, sr = sf.read(MELODY, dtype="float32")
    melody = librosa.resample(melody, orig_sr=sr, target_sr=24000)[: 10 * 24000]
    silence = np.zeros(10 * 24000, np.float32)
    return np.concatenate([joplin, melody, silence])  # chunks 0-5 piano, 6-7 melody, 8-9 silence


def test_features_finite_and_sensible(music_then_silence):
    ch, frames = _chunks(music_then_silence)
    assert len(ch["priority"]) == 10
    for k, v in {**ch, **frames}.items():
        assert np.all(np.isfinite(v)), k
    music = slice(0, 8)
    # chunk 8 is silence whose first analysis frame still overlaps the melody's last samples
    # (half an FFT window); chunk 9 sees digital silence only
    assert np.all(ch["rms_db"][music] > -50) and ch["rms_db"][8] < -90 and ch["rms_db"][9] < -150
    assert np.all(ch["flux"][music] > 0.3) and ch["flux"][8] < 0.1 and ch["flux"][9] == 0
    assert np.all(ch["stability"][music] > 0.5) and ch["stability"][8] < 0.1 and ch["stability"][9] == 0
    assert ch["novelty"][9] == 0
    assert np.all((frames["novelty"] >= 0) & (frames["novelty"] <= 4))
    # piano rag: many onsets -> higher flux than a sustained melody
    assert ch["flux"][:6].mean() > ch["flux"][6:8].mean()


def test_silence_gets_the_lowest_priority(music_then_silence):
    ch, _ = _chunks(music_then_silence)
    pri = ch["priority"]
    assert pri[9] == pytest.approx(FLOOR)  # pure digital silence: every term is 0
    assert pri[8:].max() < pri[:8].min()
    assert np.argmin(pri) in (8, 9)
    assert pri[:8].min() > 10 * FLOOR


def test_novelty_equals_explicit_checkerboard():
    """O(T) cumulative-sum novelty == sum of an explicit box checkerboard kernel over the cosine
    self-similarity matrix (Foote 2000), divided by L^2, wherever the kernel fits."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    x[60:] += 3.0  # a change at frame 60
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    half = 8
    fast = checkerboard_novelty(x, half)
    ssm = x @ x.T
    kernel = np.ones((2 * half, 2 * half))
    kernel[:half, half:] = kernel[half:, :half] = -1
    for t in range(half, 120 - half):
        explicit = np.sum(kernel * ssm[t - half:t + half, t - half:t + half]) / half**2
        assert fast[t] == pytest.approx(explicit, rel=1e-9, abs=1e-12)
    assert abs(int(np.argmax(fast)) - 60) <= 2
    assert np.all(fast[:half] == 0) and np.all(fast[-half + 1:] == 0)
