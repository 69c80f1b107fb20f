"""Prompts in, files out: the tape of each modality, how a prompt file becomes one, and how a
tape is written (a file a person can open, plus the token sequence).

    modality  tape                                    prompt files                 output
    text      ids (T,)                                .txt text, .ids.txt / .npy   .txt + .npy
    midi      MidiTape(flag, triples (N, 3))          .mid, .txt ids / .npy        .mid + .npy
    audio     codes (K, T) EnCodec                    .wav (encoded), .npz codes,  .wav + .npy
                                                      .txt ids / .npy (layout)
    tokens    ids (T,)                                .txt ids / .npy              .npy + .txt ids

MIDI tapes hold absolute times (10 ms bins; AMT's `generate` returns the same): the .npy is the
flag followed by the triples, so for pieces longer than 100 s the time ids run past the TIME
block. Audio .npy is the tape in the checkpoint's layout (`AudioTokenizer.encode`).
A gap marker splits a prompt for T5 in-filling: `<gap>` in text (`--gap-marker`), the word
`<gap>` or -1 in an id file, -1 in a .npy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.tokens.midi import ANTICIPATE, AUTOREGRESS, CONTROL_OFFSET, SEPARATOR, TIME_OFFSET

GAP = -1
TEXT_SUFFIXES = (".txt",)
MIDI_SUFFIXES = (".mid", ".midi")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class MidiTape:
    flag: int
    triples: np.ndarray  # (N, 3) int64, absolute times, events and controls

    def ids(self) -> np.ndarray:
        return np.concatenate([[self.flag], self.triples.ravel()]).astype(np.int64)

    def events(self) -> np.ndarray:
        """Controls turned back into events (the notes a listener hears), in tape order."""
        tri = self.triples.copy()
        ctrl = tri[:, 2] >= CONTROL_OFFSET
        tri[ctrl] -= CONTROL_OFFSET
        return tri


def read_ids(path: Path) -> np.ndarray:
    """An id file: .npy (any shape, -1 = gap) or text of whitespace-separated ints (`<gap>`)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64).ravel()
    words = path.read_text().split()
    try:
        return np.array([GAP if w == "<gap>" else int(w) for w in words], np.int64)
    except ValueError:
        raise UserError(f"{path}: not a file of integer ids (space-separated, `<gap>` for a gap); "
                        "plain text prompts need a text checkpoint") from None


def is_id_text(path: Path) -> bool:
    words = path.read_text().split()[:64]
    return bool(words) and all(w == "<gap>" or w.lstrip("-").isdigit() for w in words)


def split_gaps(ids: np.ndarray) -> list[np.ndarray]:
    cuts = np.flatnonzero(ids == GAP)
    bounds = np.concatenate([[-1], cuts, [ids.size]])
    return [ids[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_ids(ids: np.ndarray, vocab_size: int, path: Path) -> np.ndarray:
    real = ids[ids != GAP]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise UserError(f"{path}: ids must lie in [0, {vocab_size}) for this checkpoint's tokenizer")
    return ids


# --------------------------------------------------------------------------- text
def read_text_prompt(path: Path, tok, gap_marker: str = "<gap>") -> list[np.ndarray]:
    """Text (or an id file) -> token segments split at gap markers (one segment: no gap)."""
    if path.suffix == ".npy" or is_id_text(path):
        return split_gaps(check_ids(read_ids(path), tok.vocab_size, path))
    return [np.array(tok.encode(part), np.int64) for part in path.read_text().split(gap_marker)]


def write_text(ids: np.ndarray, tok, stem: Path) -> list[Path]:
    from amtrain.fileio import write_bytes_atomic

    ids = np.asarray(ids, np.int64)
    body = ids[1:] if ids.size and ids[0] == tok.eot_id else ids  # the decoder's document-start header
    write_bytes_atomic(stem.with_suffix(".txt"), tok.decode(body.tolist()).encode())
    return [stem.with_suffix(".txt"), save_npy(ids, stem)]


def save_npy(arr: np.ndarray, stem: Path) -> Path:
    import io

    from amtrain.fileio import write_bytes_atomic

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    path = stem.with_suffix(".npy")
    write_bytes_atomic(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- MIDI
def read_midi_prompt(path: Path) -> MidiTape:
    """.mid -> events (no controls; padding happens at generation); id file -> the triples as
    given (flags dropped, SEPARATOR triples dropped, controls kept)."""
    if path.suffix.lower() in MIDI_SUFFIXES:
        from amtrain.midi.events import MidiReadError, notes_to_events, read_notes

        try:
            events, _ = notes_to_events(read_notes(path))
        except MidiReadError as e:
            raise UserError(f"{path}: {e}") from None
        return MidiTape(AUTOREGRESS, events[np.argsort(events[:, 0], kind="stable")])
    from amtrain.tokens.midi import VOCAB_SIZE

    ids = check_ids(read_ids(path), VOCAB_SIZE, path)
    if (ids == GAP).any():
        raise UserError(f"{path}: MIDI prompts mark gaps by time (--infill-range), not by <gap>")
    flag = AUTOREGRESS
    while ids.size and ids[0] in (AUTOREGRESS, ANTICIPATE):
        flag, ids = int(ids[0]), ids[1:]
    if ids.size % 3:
        raise UserError(f"{path}: {ids.size} ids after the flag is not a whole number of (time, dur, note) triples")
    tri = ids.reshape(-1, 3)
    return MidiTape(flag, tri[tri[:, 2] != SEPARATOR])


def write_midi_tape(tape: MidiTape, stem: Path) -> list[Path]:
    from amtrain.midi.decode import events_to_notes, write_midi

    write_midi(events_to_notes(tape.events()), stem.with_suffix(".mid"))
    return [stem.with_suffix(".mid"), save_npy(tape.ids(), stem)]


def onset_seconds(tri: np.ndarray) -> np.ndarray:
    from amtrain.rollout.amt import triple_times
    from amtrain.tokens.midi import TIME_RESOLUTION

    return triple_times(tri) / TIME_RESOLUTION


# --------------------------------------------------------------------------- audio
def read_audio_prompt(path: Path, tok, codec, bandwidth: float | None = None) -> np.ndarray:
    """.wav/.flac/.ogg/.mp3 (encoded by the codec), .npz codes (prep-audio) or an id file in the
    checkpoint's layout -> codes (K, T)."""
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
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


def write_audio_tape(codes: np.ndarray, tok, codec, stem: Path) -> list[Path]:
    import io

    import soundfile as sf

    from amtrain.fileio import write_bytes_atomic

    wave = codec.decode(codes)  # (C, T * hop)
    buf = io.BytesIO()
    sf.write(buf, wave.T, codec.sample_rate, format="WAV", subtype="PCM_16")
    write_bytes_atomic(stem.with_suffix(".wav"), buf.getvalue())
    return [stem.with_suffix(".wav"), save_npy(tok.encode(codes).astype(np.int64), stem)]


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


def relative_onsets(tri: np.ndarray) -> np.ndarray:
    return tri[:, 0] - TIME_OFFSET
