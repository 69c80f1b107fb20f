"""`amtrain serve generate|codec|web` (workers and the results page) and `amtrain client
submit|fetch|monitor`, around a Redis server. See docs/serving.md."""

from __future__ import annotations

from pathlib import Path

import typer

REDIS = typer.Option("redis://localhost:6379/0", "--redis",
                     help="Redis URL: redis://host:port/db, redis://user:password@host:port/db (password, ACL user), rediss://... (TLS). Default: a local one, or an ssh tunnel to one.")
QUEUE = typer.Option("default", "--queue", help="Queue name: workers of one checkpoint share one.")


def register(app: typer.Typer) -> None:
    serve = typer.Typer(help="Inference workers and the results page, around Redis (docs/serving.md).",
                        no_args_is_help=True)
    serve.command("generate")(generate)
    serve.command("codec")(codec)
    serve.command("web")(web)
    app.add_typer(serve, name="serve")
    client = typer.Typer(help="Submit jobs to the serve workers, fetch results, watch the queue.", no_args_is_help=True)
    client.command("submit")(submit)
    client.command("fetch")(fetch)
    client.command("monitor")(monitor)
    app.add_typer(client, name="client")


def _limits(max_prompt_mb: float, max_length: float):
    from amtrain.serve.jobs import Limits

    return Limits(max_prompt_bytes=int(max_prompt_mb * (1 << 20)), max_length=max_length)


def generate(
    ckpt: Path = typer.Argument(..., help="Export folder, run or checkpoint folder (as `amtrain rollout` takes)."),
    redis: str = REDIS,
    queue: str = QUEUE,
    batch_size: int = typer.Option(8, "--batch-size", help="Most jobs taken at once; compatible ones run as one batch (1 = one at a time)."),
    visibility: float = typer.Option(60.0, help="Seconds a job may sit unacknowledged with a dead worker before another takes it."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Failures (or worker deaths) before a job goes to the dead-letter stream."),
    max_prompt_mb: float = typer.Option(8.0, "--max-prompt-mb", help="Largest prompt accepted."),
    max_length: float = typer.Option(4096, "--max-length", help="Largest --length a job may ask for."),
    name: str = typer.Option(None, "--name", help="Consumer name (default host-pid-generate)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
) -> None:
    """A generation worker: rollout jobs from the queue (continue / infill / alternate, every
    option of `amtrain rollout`), results written back. SIGTERM finishes the batch, then exits."""
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import GenerateWorker

    w = GenerateWorker(Queue(redis, queue), ckpt, device=device, batch_size=batch_size, visibility=visibility,
                       max_attempts=max_attempts, limits=_limits(max_prompt_mb, max_length), name=name)
    w.install_signals()
    typer.echo(f"serve generate: {w.consumer} on queue {queue}: {ckpt} ({w.rm.family.name}, {w.rm.modality.name})",
               err=True)
    w.run()
    typer.echo(f"serve generate: {w.consumer} stopped after {w.jobs_done} jobs", err=True)


def codec(
    codec_path: Path = typer.Option(None, "--codec-path", help="EnCodec weights; else $AMTRAIN_CODEC_DIR."),
    codec_model: str = typer.Option("24khz", "--codec-model", help="24khz | 48khz."),
    redis: str = REDIS,
    queue: str = QUEUE,
    visibility: float = typer.Option(60.0, help="Seconds before a dead worker's job is taken by another."),
    max_attempts: int = typer.Option(3, "--max-attempts"),
    max_prompt_mb: float = typer.Option(32.0, "--max-prompt-mb", help="Largest audio file accepted."),
    name: str = typer.Option(None, "--name"),
) -> None:
    """A codec worker: audio prompts -> codes with prep-audio's chunk analysis (flux, RMS,
    novelty, stability, priority; `priority_rank` picks the prompt chunk), generated codes -> WAV."""
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import CodecWorker

    w = CodecWorker(Queue(redis, queue), codec_path, codec_model, batch_size=1, visibility=visibility,
                    max_attempts=max_attempts, limits=_limits(max_prompt_mb, 4096), name=name)
    w.install_signals()
    typer.echo(f"serve codec: {w.consumer} on queue {queue}: {w.codec.codec_id}", err=True)
    w.run()
    typer.echo(f"serve codec: {w.consumer} stopped after {w.jobs_done} jobs", err=True)


def web(
    redis: str = REDIS,
    queue: str = QUEUE,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port."),
) -> None:
    """The results page: jobs, status, text, an audio player for WAV, the piano roll for MIDI."""
    from amtrain.serve.queue import Queue
    from amtrain.serve.web import serve

    q = Queue(redis, queue)
    serve(q, host, port)


def submit(
    prompt: Path = typer.Option(None, "--prompt", help="Prompt file: .txt, .npy, .npz, .mid, .wav/.flac/.ogg/.mp3 (sent with the job). Default: a held-out document of the checkpoint's dataset, by --seed."),
    text: str = typer.Option(None, "--text", help="A text prompt, instead of --prompt."),
    mode: str = typer.Option("continue", help="continue | infill | alternate."),
    length: float = typer.Option(256, help="New material per continuation, in tokens (or seconds with --seconds)."),
    seconds: bool = typer.Option(False, "--seconds"),
    num_samples: int = typer.Option(1, "--num-samples", "-n"),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, help="Seed; with --count N the jobs take seed, seed+1, ..."),
    no_cache: bool = typer.Option(False, "--no-cache"),
    stride: int = typer.Option(None),
    infill_range: str = typer.Option(None, "--infill-range", help="START:END seconds (MIDI, audio)."),
    control_instruments: str = typer.Option("", "--control-instruments"),
    gap_marker: str = typer.Option("<gap>"),
    postfix_repeat: int = typer.Option(1),
    denoiser: str = typer.Option("X"),
    schedule: str = typer.Option("ci"),
    iterations: int = typer.Option(4),
    t5_context: int = typer.Option(512, "--t5-context"),
    priority_rank: int = typer.Option(None, "--priority-rank", help="Audio prompt: the codec worker takes the chunk of this priority rank (0 = best) as the prompt; with --mode alternate the whole file, weakest chunks re-generated."),
    options: str = typer.Option(None, "--options", help="Further options as JSON (RolloutConfig fields), e.g. '{\"max_span\": 64}'."),
    count: int = typer.Option(1, "--count", help="Submit N jobs."),
    redis: str = REDIS,
    queue: str = QUEUE,
) -> None:
    """Submit rollout jobs; prints one job id a line."""
    from amtrain.commands.rollout import _range
    from amtrain.errors import UserError
    from amtrain.serve import client
    from amtrain.serve.queue import Queue

    try:
        instruments = [int(x) for x in control_instruments.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--control-instruments {control_instruments!r}: comma-separated integers") from None
    rng = _range(infill_range)
    opts = {"mode": mode, "length": length, "seconds": seconds, "num_samples": num_samples, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "seed": seed, "use_cache": not no_cache, "stride": stride,
            "infill_range": list(rng) if rng else None, "control_instruments": instruments, "gap_marker": gap_marker,
            "postfix_repeat": postfix_repeat, "denoiser": denoiser, "schedule": schedule, "iterations": iterations,
            "t5_context": t5_context, "priority_rank": priority_rank} | client.options_json(options)
    for job_id in client.submit(Queue(redis, queue), opts, prompt, text, count):
        typer.echo(job_id)


def fetch(
    out: Path = typer.Option(..., "--out", help="Folder: one sub-folder per job (its files + result.json)."),
    job: list[str] = typer.Option(None, "--job", help="Fetch these jobs (repeat); default: every result not fetched into --out yet."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the jobs (or, without --job, keep fetching until Ctrl-C)."),
    timeout: float = typer.Option(None, help="With --wait: stop after this many seconds (with --job: an error naming the jobs unfinished)."),
    redis: str = REDIS,
    queue: str = QUEUE,
) -> None:
    """Write finished jobs' results into --out."""
    from amtrain.serve import client
    from amtrain.serve.queue import Queue

    n = client.fetch(Queue(redis, queue), out, wait=wait, jobs=job or None, timeout=timeout, echo=typer.echo)
    typer.echo(f"fetched {n} jobs into {out}", err=True)


def monitor(
    once: bool = typer.Option(False, "--once", help="Print the figures once as plain lines and exit."),
    interval: float = typer.Option(1.0, help="Seconds between refreshes."),
    redis: str = REDIS,
    queue: str = QUEUE,
) -> None:
    """A live view of the queue: waiting, in flight, finished, failed, dead; each worker's heartbeat and jobs/s."""
    from amtrain.serve.monitor import monitor as run
    from amtrain.serve.queue import Queue

    run(Queue(redis, queue), once=once, interval=interval)
