"""import-hf: a local transformers folder (GPT-2 / the Anticipatory Music Transformer's
checkpoints, Phi, Starcoder2, Arcee, T5) -> an amtrain export folder. Export the other way is
`amtrain export RUN OUT --format hf` (amtrain.commands.model). See docs/hf.md."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("import-hf")(import_hf)


def import_hf(
    path: str = typer.Argument(..., help="Local transformers folder (config.json + model.safetensors); hub ids are refused: download first."),
    out: Path = typer.Argument(..., help="amtrain export folder to write (model.safetensors + config.json)."),
    tokenizer: str = typer.Option(None, help="amtrain tokenizer of the checkpoint's ids (default: recorded by amtrain, else 50257 ids: gpt2, 55028: midi)."),
) -> None:
    """Import a transformers checkpoint for `amtrain sample`, `amtrain rollout` and `--train.init_from`."""
    from amtrain.hf import import_hf as run

    folder, model, meta = run(path, out, tokenizer)
    c = model.cfg
    shape = ", ".join(f"{k}={getattr(c, k)}" for k in ("block", "num_layers", "num_heads", "d_model", "vocab_size")
                      if hasattr(c, k))
    typer.echo(f"imported {meta['imported_from']} from {path} -> {folder} ({model.num_params():,} params; {shape}; "
               f"tokenizer {meta['tokenizer']})")
