"""`amtrain scaling run|fit|plot`: a ladder of model sizes per architecture, power-law fits, plots."""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console
from amtrain.errors import UserError

scaling = typer.Typer(help="Scaling studies: run a ladder of sizes, fit L(N), plot.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(scaling, name="scaling")


def _fits(rows, num_boot: int, seed: int):
    from amtrain.scaling.fit import fit_with_bootstrap

    fits = {}
    for arch in sorted({r["arch"] for r in rows}):
        sub = [r for r in rows if r["arch"] == arch]
        if len({r["non_embedding_params"] for r in sub}) >= 3:
            fits[arch] = fit_with_bootstrap([r["non_embedding_params"] for r in sub], [r["val_loss"] for r in sub],
                                            num_boot=num_boot, seed=seed)
    return fits


@scaling.command("run")
def run(
    data: Path = typer.Option(..., "--data", help="Dataset folder (from amtrain prep-*)."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: runs/ and results.csv."),
    sizes: str = typer.Option("tiny,small,medium", help="Comma-separated sizes of the --size-table (ladder: debug, tiny, small, medium, large, xl; seeds: tiny, small, medium, large, xl)."),
    size_table: str = typer.Option("ladder", help="ladder (sizes matched by parameter count across families) | seeds (the symbolic-music seed's shapes, seed-tiny..seed-xl; docs in amtrain/models/sizes.py)."),
    arch: str = typer.Option("transformer,lstm", help="Comma-separated architectures (the families' study names: transformer = decoder, lstm)."),
    tokens: int = typer.Option(0, help="Token budget per run (0 = one epoch of the train split)."),
    seq_len: int = typer.Option(128, help="Training window length."),
    micro_batch: int = typer.Option(8, help="Sequences per micro-batch per process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    nproc: int = typer.Option(1, help="Processes per run (torchrun) — tokens per step scale with it."),
    ds_config: str = typer.Option("ds_configs/zero2.json", help="DeepSpeed engine config for every run."),
    lr: float = typer.Option(0.0, help="Peak learning rate for every run (0 = the run config default)."),
    rollout_prompt: list[str] = typer.Option([], "--rollout-prompt",
                                             help="A prompt every run rolls out (repeatable: text, or a prompt file such as a .mid); the statistics of each run's last rollout become rollout_* columns of results.csv."),
    rollout_every: int = typer.Option(0, help="Steps between rollouts (0 = once, at the last step)."),
    rollout_length: int = typer.Option(64, help="Tokens generated per prompt and rollout."),
) -> None:
    """Train one model per (architecture, size) under identical settings; append results.csv."""
    from amtrain.models.sizes import table_sizes
    from amtrain.scaling.run import StudySettings, run_study

    prompts = tuple(str(Path(p).resolve()) if Path(p).exists() else p for p in rollout_prompt)  # runs start in the repo
    settings = StudySettings(data=data, out=out, tokens=tokens or None, seq_len=seq_len, micro_batch=micro_batch,
                             grad_accum=grad_accum, nproc=nproc, ds_config=ds_config, lr=lr or None,
                             rollout_prompts=prompts, rollout_every=rollout_every, rollout_length=rollout_length)
    results = run_study(settings, arch.split(","), table_sizes(size_table, sizes.split(",")), log=typer.echo)
    typer.echo(f"results: {results}  (next: amtrain scaling fit {results}; amtrain scaling plot {results} --out {out})")


def _ci(f) -> str:
    lo, hi = f.alpha_ci
    return "n/a (3 sizes: no spread to resample)" if lo != lo else f"[{lo:.4f}, {hi:.4f}]"


@scaling.command("fit")
def fit(
    results: Path = typer.Argument(..., help="results.csv written by `amtrain scaling run`."),
    num_boot: int = typer.Option(200, help="Bootstrap resamples for the α interval."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Fit L(N) = a·N^(−α) + c per architecture (Huber in log space) with a bootstrap CI for α."""
    from rich.table import Table

    from amtrain.scaling.fit import fit_data_power_law
    from amtrain.scaling.results import read_results

    rows = read_results(results)
    fits = _fits(rows, num_boot, seed)
    if not fits:
        raise UserError(f"{results}: no architecture has runs at 3 or more sizes; a fit needs 3")
    table = Table("arch", "runs", "a", "α", "α 90% CI", "c (irreducible)", "max |residual| (nats)")
    for arch, f in fits.items():
        table.add_row(arch, str(f.num_runs), f"{f.law.a:.4g}", f"{f.law.alpha:.4f}",
                      _ci(f), f"{f.law.c:.4f}", f"{f.max_abs_residual:.4f}")
    con = console()
    con.print(table)
    for arch, f in fits.items():
        sub = [r for r in rows if r["arch"] == arch]
        con.print(f"{arch} residuals (loss − fit): " + ", ".join(
            f"{r['size']} {res:+.4f}" for r, res in zip(sub, f.residuals, strict=True)), highlight=False)
        for w in f.warnings:
            con.print(f"[yellow]warning[/]: {arch}: {w}", highlight=False)
    for arch in fits:
        sub = [r for r in rows if r["arch"] == arch]
        if len({r["tokens"] for r in sub}) >= 2 and len(sub) >= 5:
            law = fit_data_power_law([r["non_embedding_params"] for r in sub], [r["tokens"] for r in sub],
                                     [r["val_loss"] for r in sub])
            con.print(f"{arch}: L(N, D) = {law.E:.4f} + {law.A:.4g}/N^{law.alpha:.4f} + {law.B:.4g}/D^{law.beta:.4f}")


@scaling.command("plot")
def plot(
    results: Path = typer.Argument(..., help="results.csv written by `amtrain scaling run`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs."),
    num_boot: int = typer.Option(200, help="Bootstrap resamples for the α interval."),
    stat: list[str] = typer.Option([], "--stat",
                                   help="A rollout statistic (a rollout_* column, e.g. rollout_pitch_class_entropy or pitch_class_entropy) drawn against model size beside the loss; repeatable."),
    heldout: Path = typer.Option(None, "--heldout",
                                 help="An evaluation_results.json of `amtrain evaluate` on the study's data: each --stat's held-out value is drawn as a dashed line."),
) -> None:
    """PNGs: validation loss against parameters with fitted curves, and every run's training curve;
    with --stat, each statistic against parameters beside the loss."""
    from amtrain.scaling.plot import plot_loss_vs_params, plot_stat_vs_params, plot_training_curves
    from amtrain.scaling.results import read_results

    rows = read_results(results)
    reference = {}
    if heldout is not None:
        import json

        try:
            reference = json.loads(heldout.read_text())["heldout"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--heldout {heldout}: not an evaluation_results.json of `amtrain evaluate`") from None
    out.mkdir(parents=True, exist_ok=True)
    a = plot_loss_vs_params(rows, _fits(rows, num_boot, 0), out / "loss_vs_params.png")
    b = plot_training_curves(rows, results.parent, out / "training_curves.png")
    typer.echo(f"wrote {a} and {b}")
    for name in stat:
        column = name if name.startswith("rollout_") else f"rollout_{name}"
        have = sorted(k for k in rows[0] if k.startswith("rollout_")) if rows else []
        if column not in have:
            raise UserError(f"--stat {name}: {results} has no column {column}; it has "
                            f"{', '.join(have) or 'none (run the study with --rollout-prompt)'}")
        png = out / f"{column.removeprefix('rollout_')}_vs_params.png"
        ref = reference.get(column.removeprefix("rollout_"))
        typer.echo(f"wrote {plot_stat_vs_params(rows, column, png, ref)}")
