"""Audio files -> EnCodec codes, chunk priority scores and token shards (`amtrain prep-audio`).

    OUT/
      codes/<unit>.npz       codes (K, T) int16 + sample_rate, bandwidth, frame_rate, hop_length,
                             codec_id, source_sha256, num_samples, scales (48 kHz), source
      scores/<unit>.parquet  one row per chunk (SCHEMA_VERSION): file, chunk, start/end frame,
                             start/end seconds, flux, rms, rms_db, novelty, stability, priority
      train/<unit>.bin ...   token shards (amtrain.store): one document per chunk,
                             [<eot>, *AudioTokenizer(layout).encode(codes[:, start:end])]
      manifest.json

A unit is one input file (`<stem>-<hash of path, size, mtime and settings>`). Audio is read in
blocks (soundfile: wav, flac, ogg, mp3), down-mixed / up-mixed to the codec's channels,
resampled by a streaming soxr resampler, and encoded window by window: each window of
`window_seconds` (whole chunks) is encoded with `context_seconds` of audio before it (and after
it too for non-causal codecs; the 24 kHz encoder is causal), whose codes are dropped; features
see 1 s either side (the novelty kernel). Memory is bounded for any length. Features are computed on the same
windows (amtrain/prep/audio_features.py). Files already finished are skipped (resume).
Unreadable, empty, truncated or unsupported files are skipped and reported by name.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.data.priority import SCHEMA_VERSION, SCORES_FORMAT, read_scores  # noqa: F401 (re-exported)
from amtrain.errors import UserError
from amtrain.fileio import file_sha256, source_id, write_bytes_atomic
from amtrain.prep.audio_features import (
    PRIORITY_WEIGHTS,
    FeatureParams,
    chunk_features,
    frame_features,
)
from amtrain.prep.common import SkipReport, begin_dataset, expand_inputs, process_pool, progress

SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
BLOCK_SECONDS = 10.0  # read granularity
NOVELTY_SECONDS = 1.0  # half-width of the novelty kernel = feature context


class BadAudio(Exception):
    """A file that cannot be used; the message says why."""


@dataclass(frozen=True)
class AudioPrepConfig:
    codec_path: str | None = None
    codec_model: str = "24khz"
    bandwidth: float = 6.0
    layout: str = "delay"
    chunk_seconds: float = 5.0
    window_seconds: float = 30.0
    context_seconds: float = 1.0
    val_fraction: float = 0.0

    def __post_init__(self):
        from amtrain.tokens.audio import LAYOUTS

        if self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.chunk_seconds <= 0 or self.window_seconds <= 0 or self.context_seconds < 0:
            raise UserError("--chunk-seconds and --window-seconds must be > 0, --context-seconds >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")

    def salt(self, codec_id: str) -> str:
        d = asdict(self)
        d.pop("codec_path")
        return json.dumps(d, sort_keys=True) + codec_id


@dataclass
class Times:
    """Seconds spent per stage; audio_seconds = duration of the audio processed."""

    audio_seconds: float = 0.0
    decode: float = 0.0  # read + mix + resample (+ source hash)
    codec: float = 0.0
    features: float = 0.0
    write: float = 0.0

    def add(self, other: Times) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def total(self) -> float:
        return self.decode + self.codec + self.features + self.write

    def real_time_factors(self) -> dict[str, float]:
        """How many times faster than real time each stage (and the whole) ran."""
        out = {k: self.audio_seconds / max(getattr(self, k), 1e-9) for k in ("decode", "codec", "features", "write")}
        out["total"] = self.audio_seconds / max(self.total, 1e-9)
        return out


@dataclass
class Geometry:
    """Frame arithmetic shared by the window loop: all in codec frames."""

    hop: int
    chunk_frames: int
    core_frames: int  # frames kept per window (whole chunks)
    context_frames: int  # codec context before each window
    right_frames: int  # codec context after it: 0 for causal codecs, whose codes never look ahead
    feature_frames: int  # feature context either side (the novelty kernel's half-width)


def geometry(codec, cfg: AudioPrepConfig) -> Geometry:
    chunk = max(1, round(cfg.chunk_seconds * codec.frame_rate))
    core = chunk * max(1, round(cfg.window_seconds / cfg.chunk_seconds))
    ctx = round(cfg.context_seconds * codec.frame_rate)
    if codec.chunk_frames:  # 48 kHz: normalised 1 s chunks must tile the windows, no context
        if core % codec.chunk_frames:
            raise UserError(f"--window-seconds {cfg.window_seconds}: the {codec.sample_rate // 1000} kHz codec encodes whole "
                            f"{codec.chunk_frames / codec.frame_rate:g} s chunks; use a whole number of seconds of whole chunks")
        ctx = 0
    right = 0 if codec.config.use_causal_conv else ctx
    return Geometry(codec.hop_length, chunk, core, ctx, right, round(NOVELTY_SECONDS * codec.frame_rate))


# ---------------------------------------------------------------- reading
MAX_LOSS = 0.01  # share of a file's frames that may fail to decode at its end (dropped with a warning)


@dataclass(frozen=True)
class Probe:
    frames: int  # frames that decode: what read_blocks reads
    warning: str = ""  # set when an undecodable end (<= MAX_LOSS) was dropped


def probe(path: Path, times: Times) -> Probe:
    """Decode the whole file once at its own rate, before anything is encoded (decoding runs
    hundreds of times faster than real time, the codec does not): count the frames that decode
    and check every sample is finite. A file losing more than MAX_LOSS of its frames, or holding
    NaN/inf samples, raises BadAudio; a smaller loss at the end is kept with a warning."""
    import soundfile as sf

    if path.suffix.lower() not in SUFFIXES:
        raise BadAudio(f"unsupported extension {path.suffix or '(none)'}; use {', '.join(SUFFIXES)}")
    t0 = time.perf_counter()
    f = _open(path)
    with f:
        declared, rate = f.frames, f.samplerate
        if declared == 0:
            raise BadAudio("no audio frames (empty file)")
        _check_wav_size(path)
        block, got, error = max(1, int(BLOCK_SECONDS * rate)), 0, ""
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)  # (n, Cin)
            except (sf.LibsndfileError, RuntimeError) as e:
                error = str(e)
                break
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                raise BadAudio(f"non-finite samples (NaN or inf) from {(got + int(np.argmin(finite))) / rate:.2f} s; "
                               "the file is damaged: re-export it")
            got += x.shape[0]
            if x.shape[0] < block:
                break
    times.decode += time.perf_counter() - t0
    lost = declared - got
    if lost <= 0:  # an estimated frame count (mp3 without a Xing header) may fall short
        return Probe(got)
    why = f"decoding failed after {got} frames ({error})" if error else f"truncated: header declares {declared} frames, only {got} decode"
    if lost > MAX_LOSS * declared:
        raise BadAudio(f"{why}; {lost / declared:.1%} of the file is unreadable")
    return Probe(got, f"kept {got / rate:.2f} s of {declared / rate:.2f} s: the last {lost / declared:.2%} "
                                f"does not decode ({why})")


def read_blocks(path: Path, sample_rate: int, channels: int, times: Times, num_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield the file's first `num_frames` frames (default: all that decode, by `probe`) as
    (C, n) float32 blocks at `sample_rate` with `channels` channels."""
    import soundfile as sf
    import soxr

    if num_frames is None:
        num_frames = probe(path, times).frames
    t0 = time.perf_counter()
    f = _open(path)
    with f:
        block = max(1, int(BLOCK_SECONDS * f.samplerate))
        rs = None if f.samplerate == sample_rate else soxr.ResampleStream(f.samplerate, sample_rate, channels, dtype="float32", quality="HQ")
        got = 0
        while got < num_frames:
            want = min(block, num_frames - got)
            try:
                x = f.read(want, dtype="float32", always_2d=True)  # (n, Cin)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise BadAudio(f"decoding failed after {got} frames ({e})") from None
            if x.shape[0] < want:
                raise BadAudio(f"only {got + x.shape[0]} of the {num_frames} frames found a moment ago decode; the file changed during the run")
            got += x.shape[0]
            x = _mix(x, channels)  # (n, C)
            if rs is not None:
                x = rs.resample_chunk(x, last=got >= num_frames)
            times.decode += time.perf_counter() - t0
            yield np.ascontiguousarray(x.T)  # (C, n)
            t0 = time.perf_counter()


def _open(path: Path):
    import soundfile as sf

    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise BadAudio(_sf_reason(e, path)) from None


def _sf_reason(e: Exception, path: Path) -> str:
    """libsndfile's reason, except where it misleads: it says "File does not exist" of an
    existing file it cannot parse (random bytes named .mp3)."""
    msg = str(e)
    msg = msg.split(": ", 1)[1] if ": " in msg else msg
    if path.is_file() and path.stat().st_size == 0:
        return "unreadable audio: empty file (0 bytes)"
    if path.is_file() and msg.startswith(("File does not exist", "Format not recognised")):
        return f"unreadable audio: not an audio file (libsndfile finds no {'/'.join(s[1:] for s in SUFFIXES)} stream in it)"
    return "unreadable audio: " + msg


def _mix(x: np.ndarray, channels: int) -> np.ndarray:
    """(n, Cin) -> (n, channels): mono codecs get the channel mean; stereo codecs get mono
    duplicated or the first two channels."""
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(axis=1, keepdims=True)
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    return x[:, :channels]


def _check_wav_size(path: Path) -> None:
    """libsndfile shortens a WAV whose data chunk was cut off instead of failing: detect it
    from the RIFF header (declared data bytes > bytes present)."""
    if path.suffix.lower() != ".wav":
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                return
            cid, n = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            if cid == b"data":
                present = size - f.tell()
                if n != 0xFFFFFFFF and n > present:
                    raise BadAudio(f"truncated: WAV header declares {n} bytes of audio, the file holds {present}")
                return
            f.seek(n + (n & 1), 1)


# ---------------------------------------------------------------- one file
@dataclass
class Encoded:
    codes: np.ndarray  # (K, T) int16
    scales: np.ndarray  # (S,) float32, empty for codecs without per-chunk scale
    num_samples: int  # at the codec's rate
    chunks: dict[str, np.ndarray]  # per-chunk columns
    bounds: list[tuple[int, int]]


def encode_stream(blocks: Iterator[np.ndarray], codec, cfg: AudioPrepConfig, geo: Geometry, times: Times) -> Encoded:
    """Slide windows over the stream; keep only a window plus context in memory."""
    fp = FeatureParams(codec.sample_rate, codec.hop_length, novelty_seconds=NOVELTY_SECONDS)
    hop = geo.hop
    ahead, behind = max(geo.right_frames, geo.feature_frames), max(geo.context_frames, geo.feature_frames)
    buf = np.zeros((codec.channels, 0), np.float32)  # (C, n) samples from buf_start
    buf_start, f0, eof = 0, 0, False
    codes, scales, feats, bounds = [], [], [], []
    while True:
        while not eof and buf_start + buf.shape[1] < (f0 + geo.core_frames + ahead) * hop:
            blk = next(blocks, None)
            if blk is None:
                eof = True
            else:
                buf = np.concatenate([buf, blk], axis=1)
        end = buf_start + buf.shape[1]  # samples known so far (all of them at eof)
        f1 = f0 + geo.core_frames if not eof else min(f0 + geo.core_frames, -(-end // hop))
        if f1 <= f0:
            break
        ca = max(0, (f0 - geo.context_frames) * hop)  # codec segment [ca, cb)
        cb = min(end, (f1 + geo.right_frames) * hop)
        t0 = time.perf_counter()
        c, s = codec.encode(buf[:, ca - buf_start: cb - buf_start], cfg.bandwidth)  # (K, .) from frame ca / hop
        times.codec += time.perf_counter() - t0
        codes.append(c[:, f0 - ca // hop: f1 - ca // hop])
        if s is not None:
            scales.append(s)
        t0 = time.perf_counter()
        fa = max(0, (f0 - geo.feature_frames) * hop)  # feature segment [fa, fb)
        fb = min(end, (f1 + geo.feature_frames) * hop)
        win_bounds = [(a, min(a + geo.chunk_frames, f1)) for a in range(f0, f1, geo.chunk_frames)]
        frames = frame_features(buf[:, fa - buf_start: fb - buf_start].mean(axis=0), fp)
        feats.append(chunk_features(frames, fp, win_bounds, fa // hop))
        bounds += win_bounds
        times.features += time.perf_counter() - t0
        drop = max(0, (f1 - behind) * hop - buf_start)
        buf, buf_start, f0 = buf[:, drop:], buf_start + drop, f1
    if f0 == 0:
        raise BadAudio("no audio frames after decoding")
    cols = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}
    return Encoded(np.concatenate(codes, axis=1).astype(np.int16),
                   np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32),
                   end, cols, bounds)


def unit_id(path: Path, salt: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "audio"
    return f"{stem}-{source_id(path, salt)}"


def is_val(sha256: str, val_fraction: float) -> bool:
    return int(sha256[:16], 16) < val_fraction * 2.0**64


@dataclass
class FileResult:
    path: str
    unit: str | None  # None: skipped
    reason: str = ""  # why it was skipped, or (unit set) what was dropped from it
    times: Times = field(default_factory=Times)
    num_chunks: int = 0
    tokens: dict[str, int] = field(default_factory=dict)


def process_file(path: Path, uid: str, codec, cfg: AudioPrepConfig, builder, tok, out: Path) -> FileResult:
    times = Times()
    res = FileResult(str(path), None, times=times)
    geo = geometry(codec, cfg)
    try:
        t0 = time.perf_counter()
        sha = file_sha256(path)
        times.decode += time.perf_counter() - t0
        found = probe(path, times)  # before the expensive encode
        enc = encode_stream(read_blocks(path, codec.sample_rate, codec.channels, times, found.frames), codec, cfg, geo, times)
    except BadAudio as e:
        res.reason = str(e)
        return res
    except OSError as e:
        res.reason = f"unreadable ({e.strerror or e})"
        return res
    times.audio_seconds = enc.num_samples / codec.sample_rate
    t0 = time.perf_counter()
    split = "val" if is_val(sha, cfg.val_fraction) else "train"
    _write_npz(out / "codes" / f"{uid}.npz", enc, codec, cfg, sha, path)
    _write_scores(out / "scores" / f"{uid}.parquet", enc, codec, path, split)
    docs = []
    for a, b in enc.bounds:
        ids = tok.encode(enc.codes[:, a:b])
        docs.append(np.concatenate([np.array([tok.eot_id], ids.dtype), ids]))
    warnings = [{"file": str(path), "reason": found.warning, "error": False}] if found.warning else []
    records = builder.write_unit(uid, {split: docs}, source=str(path), skipped=warnings)
    times.write += time.perf_counter() - t0
    res.unit, res.num_chunks, res.reason = uid, len(enc.bounds), found.warning
    res.tokens = {r.split: r.num_tokens for r in records}
    return res


def _write_npz(path: Path, enc: Encoded, codec, cfg: AudioPrepConfig, sha: str, source: Path) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, codes=enc.codes, scales=enc.scales, sample_rate=codec.sample_rate,
                        bandwidth=cfg.bandwidth, frame_rate=codec.frame_rate, hop_length=codec.hop_length,
                        codec_id=codec.codec_id, source_sha256=sha, num_samples=enc.num_samples,
                        source=str(source))
    write_bytes_atomic(path, buf.getvalue())


def _write_scores(path: Path, enc: Encoded, codec, source: Path, split: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = np.array([b[0] for b in enc.bounds], np.int64)
    b = np.array([b[1] for b in enc.bounds], np.int64)
    cols = {"file": pa.array([str(source)] * len(a)), "split": pa.array([split] * len(a)),
            "chunk": pa.array(np.arange(len(a), dtype=np.int32)),
            "start_frame": a, "end_frame": b,
            "start_s": a / codec.frame_rate, "end_s": b / codec.frame_rate}
    cols.update({k: enc.chunks[k].astype(np.float64) for k in ("flux", "rms", "rms_db", "novelty", "stability", "priority")})
    meta = {"format": SCORES_FORMAT, "schema_version": str(SCHEMA_VERSION), "codec_id": codec.codec_id,
            "frame_rate": str(codec.frame_rate), "priority_weights": json.dumps(PRIORITY_WEIGHTS)}
    table = pa.table(cols).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue().to_pybytes())




# ---------------------------------------------------------------- the batch
@dataclass
class AudioPrepSummary:
    files_done: int
    files_resumed: int
    skipped: list[dict]
    num_chunks: int
    tokens: dict[str, int]
    times: Times
    wall_seconds: float
    setup_seconds: float  # codec load + one-time librosa/numba warm-up, outside `times`
    out: Path


_WORKER: dict = {}


def _init_worker(cfg: AudioPrepConfig, out: str, builder_args: dict) -> None:
    import torch

    from amtrain.codec import load_codec
    from amtrain.store import DatasetBuilder
    from amtrain.tokens.audio import AudioTokenizer

    torch.set_num_threads(1)
    codec = load_codec(cfg.codec_path, cfg.codec_model)
    warm_up(codec)
    tok = AudioTokenizer(num_codebooks=codec.num_codebooks(cfg.bandwidth), layout=cfg.layout)
    _WORKER.update(codec=codec, tok=tok, cfg=cfg, out=Path(out), builder=DatasetBuilder(out, **builder_args))


def _work(path: Path, uid: str) -> FileResult:
    w = _WORKER
    return process_file(path, uid, w["codec"], w["cfg"], w["builder"], w["tok"], w["out"])


def prep_audio(inputs: list[str], out: str | Path, cfg: AudioPrepConfig | None = None, workers: int = 1,
               show_progress: bool = True, append: bool = False) -> AudioPrepSummary:
    from amtrain.codec import load_codec
    from amtrain.store import DatasetBuilder
    from amtrain.tokens.audio import AudioTokenizer

    cfg = cfg or AudioPrepConfig()
    out = Path(out)
    files = expand_inputs(inputs, SUFFIXES)
    t_setup = time.perf_counter()
    codec = load_codec(cfg.codec_path, cfg.codec_model)  # fail fast on missing weights
    warm_up(codec)
    t_setup = time.perf_counter() - t_setup
    geo = geometry(codec, cfg)
    tok = AudioTokenizer(num_codebooks=codec.num_codebooks(cfg.bandwidth), layout=cfg.layout)
    extra = {"modality": "audio", "codec_id": codec.codec_id, "sample_rate": codec.sample_rate,
             "frame_rate": codec.frame_rate, "bandwidth": cfg.bandwidth, "num_codebooks": tok.num_codebooks,
             "layout": cfg.layout, "chunk_frames": geo.chunk_frames, "chunk_seconds": geo.chunk_frames / codec.frame_rate,
             "codes_dir": "codes", "scores_dir": "scores", "scores_schema_version": SCHEMA_VERSION,
             "window_seconds": cfg.window_seconds, "context_seconds": cfg.context_seconds,
             "val_fraction": cfg.val_fraction, "priority_weights": PRIORITY_WEIGHTS, "eot_prepended": True,
             "document": "chunk"}
    builder_args: dict[str, Any] = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, special_ids=tok.special_ids,
                                        tokenizer_params=tok.params(), extra=extra)
    builder = DatasetBuilder(out, **builder_args)
    with builder.lock():
        files = begin_dataset(builder, files, append)
        skips, times = SkipReport(), Times()
        done, todo, order = _plan(files, builder, out, cfg.salt(codec.codec_id), skips)
        resumed = len(done)
        num_chunks, tokens = 0, dict[str, int]()
        t0 = time.perf_counter()
        with progress() as bar:
            task = bar.add_task("prep-audio", total=len(todo), visible=show_progress)
            for res in _run(todo, workers, codec, cfg, builder, tok, out, builder_args):
                bar.advance(task)
                if res.unit is None:
                    skips.add(res.path, res.reason)
                    continue
                if res.reason:
                    skips.add(res.path, res.reason, fatal=False)
                done.append(res.unit)
                times.add(res.times)
                num_chunks += res.num_chunks
                for k, v in res.tokens.items():
                    tokens[k] = tokens.get(k, 0) + v
        builder.finalize(sorted(done, key=order.__getitem__), skipped=skips.items)
    return AudioPrepSummary(len(done) - resumed, resumed, skips.items, num_chunks, tokens, times,
                            time.perf_counter() - t0, t_setup, out)


def _plan(files: list[Path], builder, out: Path, salt: str, skips: SkipReport):
    """-> (finished unit ids, [(file, unit id)] to do, unit id -> input order). Finished units
    are resumed, their warnings reported again."""
    done: list[str] = []
    todo: list[tuple[Path, str]] = []
    order: dict[str, int] = {}
    for p in files:
        try:
            uid = unit_id(p, salt)
        except OSError as e:
            skips.add(p, f"unreadable ({e.strerror})")
            continue
        order[uid] = len(order)
        if _finished(builder, out, uid):
            skips.restore(builder.unit_skipped(uid))
            done.append(uid)
        else:
            todo.append((p, uid))
    return done, todo, order


def warm_up(codec) -> None:
    """First calls into librosa's STFT pay a one-time import/JIT cost (about 2 s); pay it here,
    outside the per-file timings, so real-time factors describe steady-state throughput."""
    frame_features(np.zeros(codec.sample_rate, np.float32), FeatureParams(codec.sample_rate, codec.hop_length))


def _finished(builder, out: Path, uid: str) -> bool:
    return (builder.load_unit(uid) is not None and (out / "codes" / f"{uid}.npz").is_file()
            and (out / "scores" / f"{uid}.parquet").is_file())


def _run(todo, workers, codec, cfg, builder, tok, out, builder_args) -> Iterator[FileResult]:
    if workers <= 1 or len(todo) <= 1:
        for path, uid in todo:
            yield process_file(path, uid, codec, cfg, builder, tok, out)
        return
    import multiprocessing as mp

    with process_pool(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                      initializer=_init_worker, initargs=(cfg, str(out), builder_args)) as ex:
        yield from ex.map(_work, [p for p, _ in todo], [u for _, u in todo])
