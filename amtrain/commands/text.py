"""prep-text, inspect, import-bin."""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console


def register(app: typer.Typer) -> None:
    app.command("prep-text")(prep_text)
    app.command("inspect")(inspect)
    app.command("import-bin")(import_bin)


def prep_text(
    inputs: list[str] = typer.Argument(..., help=".txt/.jsonl files, folders or globs."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (resumes a prep of the same inputs)."),
    tokenizer: str = typer.Option("gpt2", help="gpt2 | ascii"),
    txt_docs: str = typer.Option("paragraph", help="Documents in .txt: paragraph (blank-line separated) | line | file | sep:MARK (lines holding only MARK separate them, e.g. sep:% for fortune files)."),
    text_field: str = typer.Option("text", help="JSON field holding the text in .jsonl records."),
    val_fraction: float = typer.Option(0.05, help="Share of documents (by content hash) in the val split."),
    errors: str = typer.Option("replace", help="Invalid UTF-8: replace (U+FFFD) | strict (report and skip the file)."),
    workers: int = typer.Option(0, help="Encoding threads (0 = all cores)."),
    unit_mb: int = typer.Option(32, help="Units of about this many MB: big files are cut, small ones packed (resume granularity)."),
    append: bool = typer.Option(False, "--append", help="Add these inputs to the dataset already in --out (same settings); without it a folder holding other inputs is refused."),
) -> None:
    """Tokenize text corpora into token shards (train/val by document hash)."""
    from amtrain.prep.common import default_workers
    from amtrain.prep.text import prep_text as run

    s = run(inputs, out, tokenizer=tokenizer, txt_docs=txt_docs, text_field=text_field,
            val_fraction=val_fraction, errors=errors, workers=workers or default_workers(),
            unit_bytes=unit_mb << 20, append=append)
    mb = s.bytes_read / 1e6
    console().print(
        f"[bold]{out}[/]: {sum(s.docs.values()):,} documents, {sum(s.tokens.values()):,} tokens "
        f"(train {s.tokens['train']:,} / val {s.tokens['val']:,}); {s.units_done} units written, "
        f"{s.units_skipped_finished} already done; {mb:.1f} MB in {s.seconds:.2f} s "
        f"({mb / max(s.seconds, 1e-9):.1f} MB/s)", highlight=False)
    errors_n = sum(1 for i in s.skipped if i["error"])
    if errors_n:
        console(stderr=True).print(f"[red]{errors_n} input(s) skipped with errors[/]; the rest is written")
        raise typer.Exit(1)


def inspect(
    folder: Path = typer.Argument(..., help="Dataset folder (with manifest.json)."),
    validate: bool = typer.Option(False, "--validate", help="Scan every shard and report what is wrong."),
    ids: bool = typer.Option(False, "--ids", help="Print raw token ids, one document per line."),
    split: str = typer.Option("", help="Split for --ids / the sample (default: the first)."),
    limit: int = typer.Option(10, help="Documents printed with --ids."),
    sample_tokens: int = typer.Option(64, help="Tokens decoded in the sample."),
) -> None:
    """Show a dataset's header, counts, vocabulary and a decoded sample."""
    import sys

    from rich.table import Table

    from amtrain.store import Dataset
    from amtrain.store.dataset import validate_dataset
    from amtrain.tokens import get_tokenizer

    if validate:
        problems = validate_dataset(folder)
        for p in problems:
            console(stderr=True).print(f"[red]problem[/] {p}", highlight=False)
        if problems:
            raise typer.Exit(1)
    ds = Dataset(folder)
    m = ds.manifest
    split = split or next(iter(sorted(m.splits)), "train")
    if ids:
        for i, doc in enumerate(ds.documents(split)):
            if i >= limit:
                break
            sys.stdout.write(" ".join(map(str, doc.tolist())) + "\n")
        return
    con = console()
    con.print(f"[bold]{folder}[/]  tokenizer [cyan]{m.tokenizer}[/] {m.tokenizer_params or ''}  vocab {m.vocab_size:,}  "
              f"specials {m.special_ids}", highlight=False)
    table = Table("split", "shards", "documents", "tokens", "MB")
    for name, c in sorted(m.splits.items()):
        nbytes = sum((ds.folder / s.file).stat().st_size for s in ds.shards(name))
        table.add_row(name, str(c["shards"]), f"{c['docs']:,}", f"{c['tokens']:,}", f"{nbytes / 1e6:.2f}")
    con.print(table)
    if m.skipped:
        con.print(f"{len(m.skipped)} input(s) skipped at prep: " + "; ".join(f"{s['file']} ({s['reason']})" for s in m.skipped[:5]))
    con.print(f"made by: {m.command}  ({m.created})", highlight=False)
    if m.shards:
        tok = get_tokenizer(m.tokenizer, **m.tokenizer_params)
        doc = next(ds.documents(split))[:sample_tokens]
        con.print(f"sample ({split}, first {doc.size} tokens): {doc.tolist()}", highlight=False)
        con.print(repr(tok.decode(doc)), highlight=False)
    if validate:
        con.print("[green]valid[/]: every shard's header, checksum, ids and index agree with the manifest")


def import_bin(
    train: list[Path] = typer.Option(..., "--train", help="nanoGPT/modded-nanogpt .bin files for the train split."),
    val: list[Path] = typer.Option([], "--val", help=".bin files for the val split."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),
    tokenizer: str = typer.Option("gpt2", help="Tokenizer the ids belong to."),
) -> None:
    """Import nanoGPT (raw uint16) or modded-nanogpt (headered) .bin token files."""
    from amtrain.prep.nanogpt import import_bins

    split_of = {p: "train" for p in train} | {p: "val" for p in val}
    import_bins(list(split_of), out, split_of, tokenizer)
    typer.echo(f"{out}: imported {len(split_of)} file(s)")
