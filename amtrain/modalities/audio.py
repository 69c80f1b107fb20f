"""Audio as EnCodec codes in a codebook layout (`amtrain.tokens.audio`: flatten, delay, parallel).

Tape: codes (K, T). Prompts: audio files (encoded by the codec), prep-audio `.npz` codes, or id
files in the checkpoint's layout; outputs: .wav through the codec (the codes' layout stream as
.npy beside it), or the .npy alone without a codec. Lengths in seconds become frames through the
codec's frame rate.

Strategies: continuation keeps codebook k at position k of each frame (`CodebookConstraint`)
and, for the delay layout, forces the prompt's last K-1 frames' later codebooks so the prompt
is kept exactly; a denoiser in-fills a frame range as one sentinel span, a left-to-right model
trained to fill in the middle writes it as the middle of a FIM prompt (`amtrain.generate.fim`),
both under the codebook grammar with the gap's exact length (the waveform keeps its duration).
A denoiser's encoder never sees more than `t5_context` tokens of the prompt (its memory grows
with the square of its input): a continuation round shows it the prompt's last window, an
in-fill the frames nearest the range (`infill_window`); a note on stderr says how much was left
out.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.modalities.base import (
    GAP,
    Modality,
    RolloutModel,
    SpanLayout,
    check_ids,
    left_to_right_continue,
    note,
    read_ids,
    save_npy,
    seq2seq_continue,
)
from amtrain.registry import register_modality
from amtrain.tokens.audio import AudioTokenizer

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def audio_tokenizer(rm: RolloutModel) -> AudioTokenizer:
    assert isinstance(rm.tokenizer, AudioTokenizer), rm.tokenizer  # modality_of("audio") is this modality
    return rm.tokenizer


class AudioModality(Modality):
    name = "audio"
    tokenizers = ("audio",)
    prompt_files = ".wav/.flac/.ogg/.mp3, .npz codes, .npy ids"
    text_output = False
    needs_codec = True
    priority_scores = True

    def span_layout(self, tokenizer) -> SpanLayout:
        # one frame of K codebooks a unit; prep-audio opens every chunk with <eot>
        return SpanLayout(unit=int(tokenizer.tokens_per_step), offset=1, inside_documents=True)

    # -- prompts and outputs -------------------------------------------------------------
    def read_prompt(self, rm: RolloutModel, path: Path, cfg, codec=None) -> np.ndarray:
        """Audio (encoded by the codec), .npz codes (prep-audio) or an id file in the checkpoint's
        layout -> codes (K, T)."""
        tok = audio_tokenizer(rm)
        suffix = path.suffix.lower()
        if suffix in AUDIO_SUFFIXES:
            if codec is None:
                raise UserError("an audio prompt needs the codec: pass --codec-path")
            return encode_wave(path, codec, tok.num_codebooks)
        if suffix == ".npz":
            with np.load(path) as z:
                if "codes" not in z:
                    raise UserError(f"{path}: no 'codes' array; pass a prep-audio codes/<unit>.npz")
                codes = z["codes"].astype(np.int64)
            return check_codes(codes, tok, path)
        ids = check_ids(read_ids(path), tok.vocab_size, path)
        if (ids == GAP).any():
            raise UserError(f"{path}: audio prompts mark gaps by time (--infill-range), not by <gap>")
        try:
            docs = tok.split_documents(ids)
        except ValueError as e:
            raise UserError(f"{path}: not a {tok.layout} token stream ({e})") from None
        if not docs:
            raise UserError(f"{path}: no audio tokens")
        return docs[-1]

    def document_prompt(self, rm: RolloutModel, doc: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, str]:
        """The chunk's codes (in-filling takes its range from --infill-range)."""
        tok = audio_tokenizer(rm)
        docs = tok.split_documents(np.asarray(doc, np.int64))
        if not docs:
            raise UserError("the held-out document holds no audio frames; pass --prompt FILE")
        return docs[-1], docs[-1], f"all {docs[-1].shape[1]} frames"

    def write_tape(self, rm: RolloutModel, codes: np.ndarray, stem: Path, codec=None, prompt=None) -> list[Path]:
        stream = save_npy(audio_tokenizer(rm).encode(codes).astype(np.int64), stem)
        if codec is None:
            return [stream]
        import io

        import soundfile as sf

        from amtrain.fileio import write_bytes_atomic

        wave = codec.decode(codes)  # (C, T * hop)
        buf = io.BytesIO()
        sf.write(buf, wave.T, codec.sample_rate, format="WAV", subtype="PCM_16")
        write_bytes_atomic(stem.with_suffix(".wav"), buf.getvalue())
        return [stem.with_suffix(".wav"), stream]

    def continuation_tape(self, rm: RolloutModel, prompt):
        return prompt

    def tape_ids(self, rm: RolloutModel, codes: np.ndarray) -> np.ndarray:
        """As prep-audio stores a file: <eot>, then the codes in the tokenizer's layout."""
        tok = audio_tokenizer(rm)
        return np.concatenate([[tok.eot_id], tok.encode(codes).astype(np.int64)])

    def generated_part(self, rm: RolloutModel, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        return after[:, before.shape[1]:]

    def units(self, tokenizer, ids: np.ndarray) -> tuple[str, list]:
        """Frames: each frame's K codes."""
        codes = self.codes(tokenizer, ids)
        return "frames", [tuple(c) for c in codes.T.tolist()]

    def invalid_ids(self, tokenizer, ids: np.ndarray) -> np.ndarray:
        """The layout's grammar (`CodebookConstraint`): after each <eot>, step s position k holds
        an id of codebook k; <pad> only where the delay layout puts it (step s < k at a
        piece's start, the last K-1 steps at its end)."""
        ids = np.asarray(ids, np.int64)
        K, size = tokenizer.num_codebooks, tokenizer.codebook_size
        bad = np.zeros(ids.size, bool)
        cuts = np.flatnonzero(ids == tokenizer.eot_id)
        for a, b in zip(np.concatenate([[-1], cuts]), np.concatenate([cuts, [ids.size]]), strict=True):
            piece = ids[a + 1:b]
            p = np.arange(piece.size)
            k, step = p % K, p // K
            steps = -(-piece.size // K)
            ok = (piece // size == k) & (piece < tokenizer.eot_id)
            if tokenizer.layout == "delay":
                ok |= (piece == tokenizer.pad_id) & ((step < k) | (step >= steps - (K - 1)))
            bad[a + 1:b] = ~ok
        return bad

    def codes(self, tokenizer, ids: np.ndarray) -> np.ndarray:
        """The whole frames of every <eot>-separated piece of a stream cut anywhere, joined (K, T)."""
        ids = np.asarray(ids, np.int64)
        cuts = np.flatnonzero(ids == tokenizer.eot_id)
        bounds = np.concatenate([[-1], cuts, [ids.size]])
        pieces = [stream_codes(ids[a + 1:b], tokenizer) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return np.concatenate(pieces, axis=1) if pieces else np.zeros((tokenizer.num_codebooks, 0), np.int64)

    def describe(self, rm: RolloutModel, before: np.ndarray, after: np.ndarray, cfg) -> tuple[str, list[str]]:
        """Frames (and seconds, with the codec's frame rate) added, or changed by an in-fill."""
        if cfg.mode == "infill":
            n = min(before.shape[1], after.shape[1])
            frames = int((before[:, :n] != after[:, :n]).any(axis=0).sum())
            what = "frames changed in the range"
        else:
            frames = after.shape[1] - before.shape[1]
            what = "frames added"
        secs = f", {frames / cfg.frame_rate:+.2f} s" if cfg.frame_rate else ""
        warnings = [] if frames > 0 else [f"nothing was generated (0 {what})"]
        return f"{frames} {what}{secs}; {after.shape[1]} frames in all", warnings

    # -- generation ----------------------------------------------------------------------
    def continue_tape(self, rm: RolloutModel, codes: np.ndarray, cfg, num_samples: int, seed_offset: int = 0) -> list:
        from amtrain.generate.grammar import CodebookConstraint

        tok = audio_tokenizer(rm)
        K = tok.num_codebooks
        frames = audio_frames(cfg, cfg.length) if cfg.seconds else max(1, int(cfg.length) // K)
        n = (frames + (K - 1 if tok.layout == "delay" else 0)) * K
        stream, forced = delay_prefix(codes, tok), delay_forced(codes, tok)
        if not rm.family.left_to_right:
            seen = (cfg.t5_context - cfg.t5_stride(K)) // K
            if seen < codes.shape[1]:
                note(f"T5 continuation: each round's encoder sees the last {_frames(cfg, seen)} of the "
                     f"prompt's {_frames(cfg, codes.shape[1])} (--t5-context {cfg.t5_context})")
            tapes = seq2seq_continue(rm, stream, n, num_samples, cfg, seed_offset, unit=K,
                                     inner_for=lambda t: CodebookConstraint(K, tok.codebook_size), forced=forced)
            return [stream_codes(t, tok) for t in tapes]
        ids = np.concatenate([[tok.eot_id], stream])
        out = left_to_right_continue(rm, ids, n, num_samples, cfg, seed_offset, header=1, unit=K,
                                     processor=CodebookConstraint(K, tok.codebook_size, header=1), forced=forced)
        return [stream_codes(t[1:], tok) for t in out.numpy()]

    def infill_tape(self, rm: RolloutModel, codes: np.ndarray, cfg, num_samples: int, seed_offset: int = 0) -> list:
        from amtrain.generate.grammar import CodebookConstraint
        from amtrain.generate.t5 import infill_window, t5_infill

        tok = audio_tokenizer(rm)
        K = tok.num_codebooks
        if cfg.infill_range is None:
            raise UserError("audio in-filling needs --infill-range START:END (seconds)")
        a, b = (audio_frames(cfg, s) if s > 0 else 0 for s in cfg.infill_range)
        if not 0 <= a < b <= codes.shape[1]:
            raise UserError(f"--infill-range {cfg.infill_range}: frames [{a}, {b}) must lie inside the prompt's "
                            f"{codes.shape[1]} frames")
        # delay: step s holds codebook k of frame s - k, so frames [a, b) live in steps [a, b + K - 1);
        # inside the span, every id of a frame outside [a, b) (or a pad) is forced to the prompt's
        stream = tok.encode(codes).astype(np.int64)
        ext = K - 1 if tok.layout == "delay" else 0
        lo, hi = a * K, (b + ext) * K
        frame = np.arange(lo, hi) // K - np.arange(lo, hi) % K * (ext > 0)
        forced = {j: int(stream[lo + j]) for j in np.flatnonzero((frame < a) | (frame >= b)).tolist()}
        if rm.family.left_to_right:  # FIM: prefix = <eot> + the stream before the gap, as documents start
            from amtrain.generate.fim import fim_generate

            spec = rm.fim
            assert spec is not None, "rollout checks can_infill first"
            prefixes = np.tile(np.concatenate([[tok.eot_id], stream[:lo]]), (num_samples, 1))
            mids = fim_generate(rm.model, spec, prefixes, stream[hi:], hi - lo, unit=K, stop=False,
                                processor=CodebookConstraint(K, tok.codebook_size), forced=forced,
                                **cfg.sampling(seed_offset))
            return [tok.codes(np.concatenate([stream[:lo], m, stream[hi:]])) for m in mids]
        window = infill_window([stream[:lo], stream[hi:]], cfg.t5_context, unit=K)  # the encoder's memory
        if window.num_cut:
            before, after = (len(x) // K for x in window.segments)
            note(f"T5 in-fill: the encoder sees {_frames(cfg, before)} before the range and {_frames(cfg, after)} "
                 f"after it; {_frames(cfg, window.num_cut // K)} of the prompt's {_frames(cfg, codes.shape[1])} "
                 f"are not shown to it (--t5-context {cfg.t5_context}) and are kept as they are")
        out = t5_infill(rm.model, rm.t5_vocab(), window.segments, num_samples, mode=cfg.denoiser,
                        unit=K, inner=CodebookConstraint(K, tok.codebook_size), lengths=[hi - lo], forced=forced,
                        **cfg.sampling(seed_offset))
        return [tok.codes(window.restore(s)) for s in out]

    # -- alternate -----------------------------------------------------------------------
    def random_region(self, rm: RolloutModel, codes: np.ndarray, cfg, rng: np.random.Generator):
        """Seconds: as many frames as one continuation, placed uniformly."""
        frames = codes.shape[1]
        width = min(audio_frames(cfg, cfg.length) if cfg.seconds else max(1, int(cfg.length) // audio_tokenizer(rm).num_codebooks),
                    frames - 1)
        s = int(rng.integers(0, frames - width)) if frames > width else 0
        return s / cfg.frame_rate, (s + width) / cfg.frame_rate

    def infill_prompt(self, codes: np.ndarray, region):
        return codes  # the region travels as cfg.infill_range

    # -- after training ------------------------------------------------------------------
    def sample_command(self, run_dir: str, dataset, split: str, codec_path: str) -> str:
        """`amtrain rollout` prompted by the dataset's highest-priority chunk (prep-audio's
        scores), through the codec the run names (train.codec_path; else amtrain's default
        place, $AMTRAIN_CODEC_DIR), at the data's sample rate."""
        cmd = ["python", "-m", "amtrain", "rollout", run_dir, "--prompt-from-priority", str(dataset.folder),
               "--out", str(Path(run_dir) / "samples")]
        if codec_path:
            cmd += ["--codec-path", codec_path]
        rate = dataset.manifest.extra.get("sample_rate", 24000)
        if rate != 24000:
            cmd += ["--codec-model", f"{rate // 1000}khz"]
        return shlex.join(cmd)


def _frames(cfg, num: int) -> str:
    """'75 frames (1.00 s)', or '75 frames' without the codec's frame rate."""
    return f"{num} frames" + (f" ({num / cfg.frame_rate:.2f} s)" if cfg.frame_rate else "")


def audio_frames(cfg, seconds: float) -> int:
    if cfg.frame_rate is None:
        raise UserError("lengths in seconds for audio need the codec's frame rate: pass --codec-path")
    return max(1, round(seconds * cfg.frame_rate))


def check_codes(codes: np.ndarray, tok, path) -> np.ndarray:
    if codes.ndim != 2 or codes.shape[0] < tok.num_codebooks:
        raise UserError(f"{path}: codes of shape {codes.shape}; the checkpoint needs {tok.num_codebooks} codebooks")
    return codes[:tok.num_codebooks]


def bandwidth_for(codec, num_codebooks: int) -> float:
    for b in codec.bandwidths:
        if codec.num_codebooks(b) == num_codebooks:
            return b
    raise UserError(f"the codec has no bandwidth giving {num_codebooks} codebooks "
                    f"(it offers {codec.bandwidths} kbps); use the codec the checkpoint's data was made with")


def encode_wave(path: Path, codec, num_codebooks: int) -> np.ndarray:
    import librosa
    import soundfile as sf

    try:
        y, sr = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise UserError(f"{path}: unreadable audio ({e})") from None
    y = y.T  # (C, N)
    y = y.mean(0, keepdims=True) if codec.channels == 1 else (np.repeat(y, 2, 0) if y.shape[0] == 1 else y[:2])
    if sr != codec.sample_rate:
        y = librosa.resample(y, orig_sr=sr, target_sr=codec.sample_rate)
    codes, _ = codec.encode(y, bandwidth_for(codec, num_codebooks))
    return codes.astype(np.int64)


def delay_prefix(codes: np.ndarray, tok) -> np.ndarray:
    """The layout stream of codes (K, T) cut after the step holding codebook 0 of the last frame
    (for delay: T steps; the later codebooks of the last K-1 frames come in the next steps)."""
    stream = tok.encode(codes).astype(np.int64)
    return stream[:codes.shape[1] * tok.num_codebooks]


def delay_forced(codes: np.ndarray, tok) -> dict[int, int]:
    """Delay layout: the ids of the prompt's last K-1 frames that the steps after `delay_prefix`
    must carry (new-token index -> id), so a continuation keeps the prompt exactly."""
    if tok.layout != "delay":
        return {}
    K, T = codes.shape
    out = {}
    for s in range(K - 1):  # step T + s
        for k in range(s + 1, K):  # codebook k holds frame T + s - k < T
            if T + s - k >= 0:
                out[s * K + k] = k * tok.codebook_size + int(codes[k, T + s - k])
    return out


def stream_codes(stream: np.ndarray, tok) -> np.ndarray:
    """A layout stream cut anywhere (no trailing pads needed) -> the whole frames it holds (K, T)."""
    K = tok.num_codebooks
    stream = np.asarray(stream, np.int64)
    grid = stream[:stream.size // K * K].reshape(-1, K).T  # (K, S)
    if tok.layout == "delay":
        T = grid.shape[1] - K + 1
        grid = np.stack([grid[k, k:k + T] for k in range(K)]) if T > 0 else grid[:, :0]
    return grid - (np.arange(K) * tok.codebook_size)[:, None]


AUDIO = register_modality(AudioModality())
