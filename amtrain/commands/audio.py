"""prep-audio, decode-audio, plot-audio."""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console
from amtrain.fileio import atomic_target

CODEC_PATH_HELP = ("EnCodec weights: encodec_24khz-d7cc33bc.th, a facebook/encodec_24khz folder, or a folder "
                   "holding either (default $AMTRAIN_CODEC_DIR, else ~/.cache/amtrain/encodec).")


def register(app: typer.Typer) -> None:
    app.command("prep-audio")(prep_audio)
    app.command("decode-audio")(decode_audio)
    app.command("plot-audio")(plot_audio)


def prep_audio(
    inputs: list[str] = typer.Argument(..., help="wav/flac/ogg/mp3 files, folders or globs."),
    out: Path = typer.Option(None, "--out", "-o", help="Dataset folder to write (resumes a prep of the same inputs); default runs/data/NAME, NAME the first input's stem."),
    codec_path: str = typer.Option("", "--codec-path", help=CODEC_PATH_HELP),
    codec_model: str = typer.Option("24khz", help="24khz (mono) | 48khz (stereo)."),
    bandwidth: float = typer.Option(6.0, help="kbps; 24 kHz: 1.5/3/6/12/24 -> 2/4/8/16/32 codebooks."),
    layout: str = typer.Option("delay", help="Token layout: flatten | delay | parallel."),
    chunk_seconds: float = typer.Option(5.0, help="Chunk length: one priority score and one document each."),
    window_seconds: float = typer.Option(30.0, help="Audio encoded per window (bounds memory)."),
    context_seconds: float = typer.Option(1.0, help="Extra audio either side of a window, encoded then dropped."),
    val_fraction: float = typer.Option(0.0, help="Share of files (by content hash) in the val split."),
    workers: int = typer.Option(1, help="Parallel processes, one file each (0 = all cores)."),
    append: bool = typer.Option(False, "--append", help="Add these inputs to the dataset already in --out (same settings); without it a folder holding other inputs is refused."),
) -> None:
    """Encode audio to EnCodec codes (.npz), chunk priority scores (.parquet) and token shards."""
    from amtrain.prep.audio import AudioPrepConfig
    from amtrain.prep.audio import prep_audio as run
    from amtrain.prep.common import default_workers

    if out is None:
        out = default_out(inputs)
        console().print(f"no --out given: writing the dataset to {out}", highlight=False)
    cfg = AudioPrepConfig(codec_path or None, codec_model, bandwidth, layout, chunk_seconds, window_seconds,
                          context_seconds, val_fraction)
    s = run(inputs, out, cfg, workers=workers or default_workers(), append=append)
    num_errors = sum(1 for i in s.skipped if i["error"])
    t, rtf = s.times, s.times.real_time_factors()
    con = console()
    con.print(f"[bold]{out}[/]: {s.files_done} files encoded, {s.files_resumed} already done, {num_errors} skipped; "
              f"{s.num_chunks} new chunks, {sum(s.tokens.values()):,} new tokens; {t.audio_seconds:.1f} s of audio in "
              f"{s.wall_seconds:.2f} s wall (+{s.setup_seconds:.1f} s setup)", highlight=False)
    if t.audio_seconds:
        con.print(f"real-time factor (x real time): total {rtf['total']:.1f}, decode {rtf['decode']:.1f} ({t.decode:.2f} s), "
                  f"codec {rtf['codec']:.1f} ({t.codec:.2f} s), features {rtf['features']:.1f} ({t.features:.2f} s), "
                  f"write {rtf['write']:.1f} ({t.write:.2f} s)", highlight=False)
    if num_errors:
        console(stderr=True).print(f"[red]{num_errors} input(s) skipped[/]; the rest is written")
        raise typer.Exit(1)


def default_out(inputs: list[str]) -> Path:
    """runs/data/NAME for the first input (a file's stem, a folder's name; a glob's folder)."""
    import re

    first = Path(inputs[0].split("*")[0].rstrip("/") or ".")
    name = first.stem if first.suffix else first.resolve().name
    return Path("runs") / "data" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "audio")


def decode_audio(
    codes: Path = typer.Argument(..., help="prep-audio .npz, or token ids (.npy, or .txt of integers)."),
    out: Path = typer.Argument(..., help="Output .wav."),
    codec_path: str = typer.Option("", "--codec-path", help=CODEC_PATH_HELP),
    codec_model: str = typer.Option("", help="24khz | 48khz (default: from the .npz, else 24khz)."),
    dataset: Path = typer.Option(None, help="Dataset whose manifest gives the token layout (for token input)."),
    layout: str = typer.Option("", help="Token layout if no --dataset: flatten | delay | parallel."),
    num_codebooks: int = typer.Option(0, help="Codebooks if no --dataset."),
) -> None:
    """Codes or tokens -> waveform through the EnCodec decoder."""
    info = decode_to_wav(codes, out, codec_path or None, codec_model or None, dataset, layout or None,
                         num_codebooks or None)
    console().print(f"[bold]{out}[/]: {info['seconds']:.2f} s at {info['sample_rate']} Hz, "
                    f"{info['channels']} channel(s), {info['num_codebooks']} codebooks x {info['num_frames']} frames",
                    highlight=False)


def plot_audio(
    file: Path = typer.Argument(..., help="An audio file (wav/flac/ogg/mp3)."),
    out: Path = typer.Option(None, "--out", "-o", help="PNG to write (default: FILE.png beside it)."),
    chunk_seconds: float = typer.Option(5.0, help="Chunk length for the priority bars."),
    sample_rate: int = typer.Option(24000, help="Analysis rate (the codec's)."),
) -> None:
    """Draw waveform, frame features and chunk priority to a PNG."""
    out = out or file.with_name(file.name + ".png")
    plot_features(file, out, chunk_seconds, sample_rate)
    console().print(f"[bold]{out}[/] written", highlight=False)


# ---------------------------------------------------------------- helpers (importable)
def load_codes(codes: Path, dataset: Path | None, layout: str | None, num_codebooks: int | None):
    """-> (codes (K, T), scales or None, npz metadata dict)."""
    import numpy as np

    from amtrain.errors import UserError
    from amtrain.tokens.audio import AudioTokenizer

    if not codes.is_file():
        raise UserError(f"{codes}: no such file")
    if codes.suffix == ".npz":
        try:
            z = np.load(codes)
            meta = {k: z[k].item() for k in ("sample_rate", "codec_id", "num_samples", "bandwidth")}
            scales = z["scales"] if z["scales"].size else None
            return z["codes"].astype(np.int64), scales, meta
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"{codes}: not a prep-audio codes file ({e}); make one with `amtrain prep-audio`") from None
    try:
        ids = np.load(codes) if codes.suffix == ".npy" else np.loadtxt(codes, dtype=np.int64, ndmin=1)
    except (ValueError, OSError) as e:
        raise UserError(f"{codes}: cannot read token ids ({e}); give .npy or whitespace-separated integers") from None
    if dataset is not None:
        from amtrain.store import Dataset

        params = Dataset(dataset).manifest.tokenizer_params
    elif layout and num_codebooks:
        params = {"layout": layout, "num_codebooks": num_codebooks}
    else:
        raise UserError(f"{codes}: token ids need their layout: pass --dataset DIR, or --layout and --num-codebooks")
    tok = AudioTokenizer(**params)
    try:
        grids = tok.split_documents(np.asarray(ids, dtype=np.int64).reshape(-1))
    except ValueError as e:
        raise UserError(f"{codes}: not a valid {tok.layout} token stream for {tok.num_codebooks} codebooks ({e})") from None
    if not grids:
        raise UserError(f"{codes}: no audio frames in the token stream")
    return np.concatenate(grids, axis=1), None, {}


def decode_to_wav(codes_path: Path, out: Path, codec_path: str | None, codec_model: str | None,
                  dataset: Path | None, layout: str | None, num_codebooks: int | None) -> dict:

    import soundfile as sf

    from amtrain.codec import load_codec
    from amtrain.errors import UserError

    codes, scales, meta = load_codes(codes_path, dataset, layout, num_codebooks)
    model = codec_model or ("48khz" if meta.get("sample_rate") == 48000 else "24khz")
    codec = load_codec(codec_path, model)
    if meta and meta["sample_rate"] != codec.sample_rate:
        raise UserError(f"{codes_path}: codes made at {meta['sample_rate']} Hz, the codec runs at {codec.sample_rate} Hz; "
                        "pass the matching --codec-model")
    if codes.shape[0] > len(codec.model.quantizer.layers):
        raise UserError(f"{codes_path}: {codes.shape[0]} codebooks, the codec has {len(codec.model.quantizer.layers)}")
    wave = codec.decode(codes, scales)  # (C, T * hop)
    if meta:
        wave = wave[:, : int(meta["num_samples"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        sf.write(tmp, wave.T, codec.sample_rate, subtype="PCM_16", format="WAV")
    return {"seconds": wave.shape[1] / codec.sample_rate, "sample_rate": codec.sample_rate,
            "channels": wave.shape[0], "num_codebooks": codes.shape[0], "num_frames": codes.shape[1]}


def plot_features(file: Path, out: Path, chunk_seconds: float, sample_rate: int) -> None:
    """Waveform, frame features and per-chunk priority of an audio file, as a PNG."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from amtrain.errors import UserError
    from amtrain.prep.audio import BadAudio, Times, read_blocks
    from amtrain.prep.audio_features import FeatureParams, chunk_features, frame_features

    try:
        y = np.concatenate(list(read_blocks(file, sample_rate, 1, Times())), axis=1)[0]  # (N,)
    except BadAudio as e:
        raise UserError(f"{file}: {e}") from None
    hop = 320 * sample_rate // 24000  # EnCodec's frame hop at this rate
    fp = FeatureParams(sample_rate, hop)
    frames = frame_features(y, fp)
    num_frames = -(-y.size // hop)
    chunk = max(1, round(chunk_seconds * sample_rate / hop))
    bounds = [(a, min(a + chunk, num_frames)) for a in range(0, num_frames, chunk)]
    ch = chunk_features(frames, fp, bounds, 0)
    tf = np.arange(frames["flux"].size) * fp.hop / sample_rate
    fig, ax = plt.subplots(6, 1, figsize=(12, 10), sharex=True)
    step = max(1, y.size // 20000)
    ax[0].plot(np.arange(0, y.size, step) / sample_rate, y[::step], lw=0.5)
    ax[0].set_ylabel("waveform")
    for a, key in zip(ax[1:5], ("flux", "rms", "novelty", "stability"), strict=True):
        a.plot(tf, frames[key], lw=0.8)
        a.set_ylabel(key)
    starts = np.array([b[0] for b in bounds]) * hop / sample_rate
    widths = np.array([b[1] - b[0] for b in bounds]) * hop / sample_rate
    ax[5].bar(starts, ch["priority"], width=widths, align="edge", edgecolor="k")
    ax[5].set_ylabel("priority")
    ax[5].set_xlabel("seconds")
    fig.suptitle(f"{file.name}: {y.size / sample_rate:.1f} s, chunks of {chunk_seconds:g} s")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
