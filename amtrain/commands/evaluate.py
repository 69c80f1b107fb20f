"""`amtrain evaluate [RUN] --out DIR` (or `--study DIR --best`): samples and their statistics
against held-out data (amtrain/rollout/evaluate.py, docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def best_run(study: Path) -> tuple[Path, str]:
    """(the run folder of a scaling study's row with the lowest val_loss, a line saying so)."""
    from amtrain.errors import UserError
    from amtrain.scaling.results import read_results

    table = study / "results.csv" if study.is_dir() else study
    rows = read_results(table)
    if not rows:
        raise UserError(f"{table}: no finished runs yet; let `amtrain scaling run` finish one")
    row = min(rows, key=lambda r: r["val_loss"])
    return table.parent / row["run_dir"], (f"best run: {row['arch']} {row['size']} "
                                           f"(val_loss {row['val_loss']:.4f} of {len(rows)} runs in {table})")


def evaluate(
    run: Path = typer.Argument(None, metavar="[RUN]", help="Run, checkpoint or export folder."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/evaluation)."),
    study: Path = typer.Option(None, "--study", help="A scaling study folder (or its results.csv): evaluate one of its runs."),
    best: bool = typer.Option(False, "--best", help="With --study: the run with the lowest val_loss."),
    samples: int = typer.Option(8, "--samples", "-n", help="Samples to generate."),
    length: int = typer.Option(256, help="New tokens per sample."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (0 = greedy)."),
    top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, help="Seed of sample 0 (sample i: seed + i)."),
    heldout_docs: int = typer.Option(32, help="Held-out documents whose openings the samples are compared with."),
    loss_tokens: int = typer.Option(16384, help="Held-out tokens the loss is measured on."),
    data: Path = typer.Option(None, "--data", help="Dataset folder (default: the one the checkpoint records)."),
    split: str = typer.Option(None, "--split", help="Held-out split (default: the run's data.val_split, else val)."),
    codec_path: Path = typer.Option(None, "--codec-path", help="EnCodec weights (audio); else $AMTRAIN_CODEC_DIR."),
    codec_model: str = typer.Option("24khz", "--codec-model", help="24khz | 48khz."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    progress: bool = typer.Option(True, help="A progress bar over the samples."),
) -> None:
    """Generate samples (unconditional where the modality can, else from held-out openings) and
    write them with samples_metadata.json, evaluation_results.json (held-out loss; repetition,
    distinct-n, validity; music and audio statistics against held-out data) and PNGs."""
    from amtrain.errors import UserError
    from amtrain.rollout.evaluate import EvalOptions
    from amtrain.rollout.evaluate import evaluate as run_evaluate
    from amtrain.rollout.load import load_rollout_model

    if study is not None:
        if run is not None or not best:
            raise UserError("--study DIR takes --best (the run with the lowest val_loss) and no RUN")
        run, line = best_run(study)
        typer.echo(line)
    elif best:
        raise UserError("--best picks from a scaling study: pass --study DIR")
    if run is None:
        from amtrain.rollout.defaults import newest_run

        run, line = newest_run()
        typer.echo(line)
    opts = EvalOptions(samples=samples, length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       heldout_docs=heldout_docs, loss_tokens=loss_tokens, data=str(data) if data else None,
                       split=split, progress=progress)
    codec = None
    rm = load_rollout_model(run, device=device)
    if rm.modality.needs_codec:
        from amtrain.codec import load_codec

        codec = load_codec(codec_path, codec_model)
    out = out or (Path(run) / "evaluation" if Path(run).is_dir() else Path(run).parent / "evaluation")
    results = run_evaluate(run, out, opts, codec=codec, device=device, log=typer.echo, rm=rm)
    loss = results["heldout_loss"]
    if loss.get("loss") is not None:
        typer.echo(f"held-out loss {loss['loss']:.4f} nats/token ({loss['bits_per_token']:.4f} bits) over {loss['tokens']} tokens")
    s, h = results["samples"], results["heldout"]
    for key in ("units", "rep_4", "distinct_2", "invalid_share", "pitch_class_entropy", "polyphony", "note_density"):
        if key in s:
            typer.echo(f"{key:>20}: samples {s[key]:.4g}   held-out {h.get(key, float('nan')):.4g}")
    for name, c in results["comparison"]["histograms"].items():
        if not name.startswith("codebook_"):
            typer.echo(f"{name + ' overlap':>20}: {c['overlap']:.3f}")
    typer.echo(f"wrote {out}/evaluation_results.json, {out}/samples_metadata.json, {len(results['pngs'])} PNGs, "
               f"samples under {out}/samples/")
