"""export (checkpoint -> safetensors folder) and sample (text from a trained decoder or T5)."""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("sample")(sample)
    app.command("models")(models)


def models(
    vocab_size: int = typer.Option(50257, help="Vocabulary the parameter counts are for (gpt2: 50257, midi: 55028)."),
) -> None:
    """List the model families (model.arch), their sizes (model.size) with parameter counts, and the modalities."""

    import torch
    from rich.table import Table

    from amtrain.registry import family, family_names, modality, modality_names

    table = Table("model.arch", "model.size", "params", "non-embedding", "generates", "scaling --arch")
    for name in family_names():
        fam = family(name)
        for size in fam.sizes:
            with torch.device("meta"):
                model = fam.build(fam.config(size, vocab_size=vocab_size))
            table.add_row(name, size, f"{model.num_params():,}", f"{model.num_params(non_embedding=True):,}",
                          "left-to-right" if fam.left_to_right else "denoiser", fam.study_name or "")
    con = console()
    con.print(table)
    con.print("modalities: " + "; ".join(f"{m} (tokenizers {', '.join(modality(m).tokenizers) or 'any other'})"
                                         for m in modality_names()))


def export(
    ckpt: Path = typer.Argument(..., help="Run folder, RUN/checkpoints or RUN/checkpoints/step_N (--format hf: also an export folder)."),
    out: Path = typer.Argument(..., help="Folder to write model.safetensors + config.json into."),
    format: str = typer.Option("amtrain", "--format", help="amtrain: for amtrain load_pretrained; hf: a transformers folder (from_pretrained, no custom code)."),
) -> None:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage) into fp32 safetensors + config that load without DeepSpeed."""
    from amtrain.errors import UserError
    from amtrain.train.export import export_checkpoint, export_hf_folder

    if format == "hf":
        folder = export_hf_folder(ckpt, out)
        typer.echo(f"exported {folder} (load with transformers AutoModelForCausalLM / AutoModelForSeq2SeqLM"
                   ".from_pretrained; README.md / docs/hf.md)")
        return
    if format != "amtrain":
        raise UserError(f"--format {format!r}: choose amtrain or hf")
    folder = export_checkpoint(ckpt, out)
    typer.echo(f"exported {folder} (load with amtrain.models.io.load_pretrained)")


def sample(
    model_path: Path = typer.Argument(..., metavar="CKPT", help="Export folder, run folder or checkpoint folder."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue (empty: start from end-of-text)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n", help="Tokens to generate per sample."),
    temperature: float = typer.Option(0.8, help="Softmax temperature (0 = greedy)."),
    top_k: int = typer.Option(None, "--top-k", help="Keep only the k most likely tokens."),
    top_p: float = typer.Option(None, "--top-p", help="Keep the smallest set of tokens with this much probability."),
    seed: int = typer.Option(None, help="Seed for reproducible samples."),
    num_samples: int = typer.Option(1, "--num-samples", help="Independent continuations."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the full prefix each step instead of the KV cache."),
) -> None:
    """Continue a text prompt with a trained decoder (KV cache; temperature, top-k, top-p, seed)."""
    import torch

    from amtrain.errors import UserError
    from amtrain.generate.grammar import IdsBelow
    from amtrain.generate.loop import generate
    from amtrain.registry import family_of, modality_of
    from amtrain.tokens import TextTokenizer, get_tokenizer
    from amtrain.train.export import load_any

    model, meta = load_any(model_path)
    if "tokenizer" not in meta:
        raise UserError(f"{model_path}: no tokenizer recorded; it was not made by amtrain training or export")
    tok = get_tokenizer(meta["tokenizer"], **meta.get("tokenizer_params", {}))
    if not (modality_of(tok.name).text_output and isinstance(tok, TextTokenizer)):  # (MIDI encodes event text)
        raise UserError(f"{model_path}: a {meta['tokenizer']} model; `amtrain sample` continues text prompts, "
                        f"`amtrain rollout {model_path} --prompt FILE --out DIR` continues MIDI and audio")
    if not family_of(model).left_to_right:  # a denoiser: prefix-LM continuation through amtrain.rollout
        _sample_t5(model_path, prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples)
        return
    ids = [tok.eot_id, *tok.encode(prompt)]  # documents start with end-of-text in training data
    room = model.cfg.max_seq_len - len(ids)
    if room < 1:
        raise UserError(f"--prompt is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}")
    x = torch.tensor([ids] * num_samples, dtype=torch.long)  # (N, T0)
    only_text = IdsBelow(tok.vocab_size) if model.cfg.vocab_size > tok.vocab_size else None  # no FIM sentinel
    out = generate(model, x, min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, use_cache=not no_cache, logits_processor=only_text)
    for i, row in enumerate(out.tolist()):
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(tok.decode(row[1:]))


def _sample_t5(model_path, prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples) -> None:
    """T5 checkpoints continue a prompt as rollout's `continue` mode does (S mode token, the
    prompt as prefix, KV-cached decoding)."""
    import numpy as np

    from amtrain.rollout.load import load_rollout_model
    from amtrain.rollout.run import RolloutConfig, continue_tape
    from amtrain.tokens import TextTokenizer

    rm = load_rollout_model(model_path)
    cfg = RolloutConfig(length=max_new_tokens, temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p,
                        seed=seed)
    assert isinstance(rm.tokenizer, TextTokenizer)
    tape = np.array(rm.tokenizer.encode(prompt), np.int64)
    for i, row in enumerate(continue_tape(rm, tape, cfg, num_samples)):
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(rm.tokenizer.decode(np.asarray(row).tolist()))
