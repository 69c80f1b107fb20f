"""Structural features and the priority score of audio chunks (librosa).

Frame-level features on one mono window, then aggregated per chunk (a run of codec frames):

  flux       spectral flux = librosa onset strength (mean positive log-mel difference, dB per
             frame) — how much new is starting
  rms        root-mean-square amplitude (librosa.feature.rms), reported also as dBFS
  novelty    Foote's checkerboard novelty on the cosine self-similarity of MFCC 1..19 with a
             box kernel of half-width `novelty_seconds`: with unit feature rows x_i,
             sum_ij K_ij S_ij / L^2 = |mean(x[t-L:t]) - mean(x[t:t+L])|^2 (expanding the
             checkerboard sums), computed in O(T) with cumulative sums — how much the
             texture changes around t (0..4)
  stability  mean cosine similarity of consecutive MFCC frames, negative clipped to 0
             (0..1) — how coherent the sound is from frame to frame; silence has none

Priority (one number per chunk, documented in docs/audio.md):
  loud = clip((rms_db + 60) / 60, 0, 1)
  priority = FLOOR + W_RMS*loud + W_FLUX*flux/(flux + FLUX_HALF) + W_NOVELTY*min(novelty/NOVELTY_FULL, 1)
             + W_STABILITY*stability
Every term is 0 for digital silence, so silence gets exactly FLOOR, the lowest priority;
FLOOR > 0 keeps every chunk drawable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

W_RMS, W_FLUX, W_NOVELTY, W_STABILITY = 0.25, 0.35, 0.25, 0.15
FLUX_HALF = 1.0  # dB/frame of onset strength that scores half the flux term
NOVELTY_FULL = 0.5  # novelty that scores the full novelty term
FLOOR = 1e-3
PRIORITY_WEIGHTS = {"rms": W_RMS, "flux": W_FLUX, "novelty": W_NOVELTY, "stability": W_STABILITY,
                    "flux_half": FLUX_HALF, "novelty_full": NOVELTY_FULL, "floor": FLOOR}
FEATURES = ("flux", "rms", "rms_db", "novelty", "stability", "priority")


@dataclass(frozen=True)
class FeatureParams:
    sample_rate: int
    codec_hop: int  # samples per codec frame; feature hops are a whole multiple of it
    novelty_seconds: float = 1.0
    n_mels: int = 64

    @property
    def hop(self) -> int:
        """Feature hop: the multiple of the codec hop closest to 25 ms (24 kHz: 640)."""
        return self.codec_hop * max(1, round(0.025 * self.sample_rate / self.codec_hop))

    @property
    def n_fft(self) -> int:
        return 1 << int(np.ceil(np.log2(3 * self.hop)))

    @property
    def novelty_frames(self) -> int:
        return max(1, round(self.novelty_seconds * self.sample_rate / self.hop))


def frame_features(y: np.ndarray, p: FeatureParams) -> dict[str, np.ndarray]:
    """y (N,) mono float32 -> per feature frame (centred at j * hop): flux, rms, novelty, stability."""
    import librosa

    y = np.asarray(y, dtype=np.float32)
    spec = np.abs(librosa.stft(y, n_fft=p.n_fft, hop_length=p.hop, center=True)) ** 2  # (F, J)
    mel = librosa.feature.melspectrogram(S=spec, sr=p.sample_rate, n_mels=p.n_mels)  # (M, J)
    log_mel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)  # absolute dB
    flux = librosa.onset.onset_strength(S=log_mel, sr=p.sample_rate, hop_length=p.hop)  # (J,)
    rms = librosa.feature.rms(S=np.sqrt(spec), frame_length=p.n_fft)[0]  # (J,)
    mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=20)[1:]  # (19, J): drop the energy term
    x = _unit_rows(mfcc.T)  # (J, 19)
    return {"flux": flux, "rms": rms, "novelty": checkerboard_novelty(x, p.novelty_frames),
            "stability": consecutive_similarity(x)}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; rows with (near) no energy become 0 (silence has no timbre)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 1e-3, x / np.maximum(norm, 1e-12), 0.0)


def checkerboard_novelty(x: np.ndarray, half: int) -> np.ndarray:
    """x (J, D) unit rows -> (J,) Foote novelty with a box checkerboard kernel of half-width
    `half`, |mean(x[t-L:t]) - mean(x[t:t+L])|^2; 0 where the kernel does not fit (the first and
    last `half` frames), so the edges of a recording do not count as changes."""
    j = x.shape[0]
    csum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])  # (J+1, D)
    t = np.arange(j)
    lo, hi = np.maximum(t - half, 0), np.minimum(t + half, j)
    past = (csum[t] - csum[lo]) / np.maximum(t - lo, 1)[:, None]
    future = (csum[hi] - csum[t]) / np.maximum(hi - t, 1)[:, None]
    nov = np.sum((past - future) ** 2, axis=1)
    nov[(t - lo < half) | (hi - t < half)] = 0.0
    return nov


def consecutive_similarity(x: np.ndarray) -> np.ndarray:
    """x (J, D) unit rows -> (J,) max(0, cos(x_t, x_{t+1})) (last frame repeats the one before)."""
    if x.shape[0] < 2:
        return np.zeros(x.shape[0])
    sim = np.maximum(np.sum(x[1:] * x[:-1], axis=1), 0.0)
    return np.append(sim, sim[-1])


def chunk_features(frames: dict[str, np.ndarray], p: FeatureParams, bounds: list[tuple[int, int]],
                   offset_frames: int) -> dict[str, np.ndarray]:
    """Aggregate frame features over chunks. bounds: (start, end) codec frames of each chunk,
    relative to the file; offset_frames: codec frame where the analysed window starts."""
    ratio = p.hop // p.codec_hop  # codec frames per feature frame
    num = frames["flux"].shape[0]
    out = {k: np.zeros(len(bounds)) for k in ("flux", "rms", "novelty", "stability")}
    for i, (a, b) in enumerate(bounds):
        # feature frame j is centred on codec frame j * ratio (relative to the window)
        ja = max(0, -(-(a - offset_frames) // ratio))
        jb = min(num, max(ja + 1, -(-(b - offset_frames) // ratio)))
        for k in out:
            out[k][i] = float(np.mean(frames[k][ja:jb]))
    rms_db = 20 * np.log10(np.maximum(out["rms"], 1e-10))
    out["rms_db"] = rms_db
    out["priority"] = priority(out["flux"], rms_db, out["novelty"], out["stability"])
    return out


def priority(flux, rms_db, novelty, stability) -> np.ndarray:
    loud = np.clip((np.asarray(rms_db) + 60.0) / 60.0, 0.0, 1.0)
    flux = np.maximum(np.asarray(flux), 0.0)
    return (FLOOR + W_RMS * loud + W_FLUX * flux / (flux + FLUX_HALF)
            + W_NOVELTY * np.minimum(np.asarray(novelty) / NOVELTY_FULL, 1.0) + W_STABILITY * np.asarray(stability))
