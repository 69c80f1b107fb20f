"""`amtrain rollout [CKPT] --mode continue|infill|alternate`: generate from decoder and T5
checkpoints to .txt, .mid and .wav (plus the token sequences). See docs/rollout.md. Without
CKPT, --prompt or --out, the newest run under runs/, a held-out document of its dataset and
RUN/rollouts/<mode>_<n> (`amtrain.rollout.defaults`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)


def _range(value: str | None) -> tuple[float, float] | None:
    from amtrain.errors import UserError

    if not value:
        return None
    try:
        a, b = (float(x) for x in value.split(":"))
    except ValueError:
        raise UserError(f"--infill-range {value!r}: write START:END in seconds, e.g. 4:8") from None
    return a, b


def rollout(
    ckpt: Path = typer.Argument(None, metavar="[CKPT]", help="Export folder (amtrain export / save_pretrained), run or checkpoint folder. Default: the newest run under runs/."),
    mode: str = typer.Option("continue", help="continue | infill | alternate."),
    prompt: Path = typer.Option(None, "--prompt", help="Prompt: .txt text or ids, .mid, .wav, .npz codes, .npy ids. Default: a held-out document of the checkpoint's dataset (--seed picks which)."),
    prompt_from_priority: Path = typer.Option(None, "--prompt-from-priority",
                                              help="prep-audio output folder (or a scores .parquet): the chunk with the highest priority is the prompt."),
    priority_rank: int = typer.Option(0, help="With --prompt-from-priority: take the chunk of this rank (0 = best)."),
    out: Path = typer.Option(None, "--out", help="Output folder: sample_<i>.{txt,mid,wav} + sample_<i>.npy. Default: RUN/rollouts/<mode>_<n>."),
    length: float = typer.Option(256, help="New material per continuation, in tokens (or seconds with --seconds)."),
    seconds: bool = typer.Option(False, "--seconds", help="--length is in seconds (MIDI, audio)."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples, generated as one batch."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (0 = greedy)."),
    top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, help="Seed (a fixed seed reproduces the output)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the window each step (same tokens, slower)."),
    stride: int = typer.Option(None, help="Sliding window: new tokens per window after the first (default context/2)."),
    infill_range: str = typer.Option(None, "--infill-range", help="START:END seconds to regenerate (MIDI, audio)."),
    control_instruments: str = typer.Option("", "--control-instruments",
                                            help="MIDI decoder in-filling: comma-separated instruments (0-127, drums 128) kept as controls."),
    gap_marker: str = typer.Option("<gap>", help="Text in-filling: marker between prefix and suffix."),
    postfix_repeat: int = typer.Option(1, help="T5 in-filling of prefix<gap>postfix: the postfix recurs N times, a gap before each."),
    denoiser: str = typer.Option("X", help="T5 in-filling mode token: R or X."),
    schedule: str = typer.Option("ci", help="Alternate: c/i letters, cycled (c = continue, i = in-fill)."),
    iterations: int = typer.Option(4, help="Alternate: iterations."),
    t5_context: int = typer.Option(512, "--t5-context",
                                   help="T5: most prompt tokens the encoder sees (continuation: each round's window; in-filling: around the range)."),
    codec_path: Path = typer.Option(None, "--codec-path", help="EnCodec weights (audio); else $AMTRAIN_CODEC_DIR."),
    codec_model: str = typer.Option("24khz", "--codec-model", help="24khz | 48khz."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
) -> None:
    """Generate from a decoder or T5 checkpoint: continue (sliding window), infill (T5 sentinels,
    fill-in-the-middle, MIDI anticipation) or alternate; writes .txt / .mid / .wav and the token
    sequence."""
    from amtrain.errors import UserError
    from amtrain.rollout import defaults
    from amtrain.rollout.load import load_rollout_model
    from amtrain.rollout.run import RolloutConfig, read_prompt, summaries, write_tapes
    from amtrain.rollout.run import rollout as run_rollout

    if prompt is not None and prompt_from_priority is not None:
        raise UserError("give at most one of --prompt FILE and --prompt-from-priority DIR")
    if ckpt is None:
        ckpt, line = defaults.newest_run()
        typer.echo(line)
    rm = load_rollout_model(ckpt, device=device)
    codec = None
    if rm.modality.needs_codec:
        from amtrain.codec import load_codec

        codec = load_codec(codec_path, codec_model)
    try:
        instruments = tuple(int(x) for x in control_instruments.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--control-instruments {control_instruments!r}: comma-separated integers") from None
    cfg = RolloutConfig(mode=mode, length=length, seconds=seconds, num_samples=num_samples, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, use_cache=not no_cache, stride=stride,
                        infill_range=_range(infill_range), control_instruments=instruments, gap_marker=gap_marker,
                        postfix_repeat=postfix_repeat,
                        denoiser=denoiser, schedule=schedule, iterations=iterations,
                        frame_rate=codec.frame_rate if codec is not None else None,
                        t5_context=t5_context)
    if prompt is not None and prompt_from_priority is not None:
        raise UserError("give one of --prompt FILE and --prompt-from-priority DIR (or neither: a held-out document)")
    original = None
    if prompt_from_priority is not None:
        from amtrain.rollout.priority import prompt_from_priority as pick

        if not rm.modality.priority_scores:
            raise UserError("--prompt-from-priority picks audio chunks; the checkpoint is not an audio model")
        tape, chunks, info = pick(prompt_from_priority, rm.tokenizer, priority_rank, whole_file=mode == "alternate")
        typer.echo(info)
        if mode == "alternate":
            cfg.priorities = chunks
    elif prompt is not None:
        tape = read_prompt(rm, prompt, cfg, codec)
    else:
        tape, original, line = defaults.heldout_prompt(rm, cfg)
        typer.echo(line)
    if out is None:
        out = defaults.default_out(ckpt, mode)
        typer.echo(f"out: {out}")
    results = run_rollout(rm, tape, cfg)
    files = write_tapes(rm, results, out, codec, prompt=tape)
    if original is not None:  # the document as it was, to compare with
        files += write_tapes(rm, [original], out, codec, name="original")
    for f in files:
        typer.echo(str(f))
    for i, (line, warnings) in enumerate(summaries(rm, tape, results, cfg)):
        typer.echo(f"sample_{i}: {line}")
        for w in warnings:
            typer.echo(f"warning: sample_{i}: {w}", err=True)
