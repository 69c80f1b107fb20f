"""prep-midi (MIDI or AMT token files -> shards), decode-midi, plot-midi, vocab."""

from __future__ import annotations

from pathlib import Path

import typer

from amtrain.commands import console


def register(app: typer.Typer) -> None:
    app.command("prep-midi")(prep_midi)
    app.command("decode-midi")(decode_midi)
    app.command("plot-midi")(plot_midi)
    app.command("vocab")(vocab)


def _ints(text: str, what: str) -> tuple[int, ...]:
    from amtrain.errors import UserError

    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated integers, e.g. -2,0,2") from None


def _floats(text: str, what: str) -> tuple[float, ...]:
    from amtrain.errors import UserError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated numbers, e.g. 0.9,1.0,1.1") from None


def prep_midi(
    inputs: list[str] = typer.Argument(None, help="MIDI files, folders (recursive .mid/.midi) or globs."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (resumes a prep of the same inputs)."),
    encoding: str = typer.Option("amt", "--encoding", "-e", help="Symbolic encoding: amt (Anticipatory Music Transformer events) | nvd (note/velocity/duration tokens) | any registered encoding (docs/midi.md)."),
    from_tokens: list[Path] = typer.Option([], "--from-tokens", help="amt: import AMT pre-tokenized .txt files unchanged instead (one sequence of ids a line)."),
    token_split: str = typer.Option("train", help="Split the --from-tokens sequences go to."),
    augment: int | None = typer.Option(None, help="amt: augmentation factor for train (default 1 = none; AMT trains on 10)."),
    split: str | None = typer.Option(None, help="md5 (amt's default: first MD5 hex digit e = val, f = test) | ratio (by --val/--test-fraction)."),
    val_fraction: float | None = typer.Option(None, help="With --split ratio: share of files in val (default 0.0625; abc: its own)."),
    test_fraction: float | None = typer.Option(None, help="With --split ratio: share of files in test (default 0.0625; abc: its own)."),
    transpose: str | None = typer.Option(None, help="Semitone shifts, comma-separated; each makes a train variant (drums untouched)."),
    stretch: str | None = typer.Option(None, help="amt: tempo factors (time multipliers), comma-separated; each makes a train variant."),
    velocity_shift: str | None = typer.Option(None, help="nvd: velocity offsets, comma-separated; each makes a train variant (also combined with every --transpose)."),
    augmented_share: float | None = typer.Option(None, help="nvd: share of augmented sequences in train (nano-GPT-v3: 0.3)."),
    min_freq: int | None = typer.Option(None, help="nvd: keep tokens seen at least this often in the corpus (default 1)."),
    min_length: int | None = typer.Option(None, help="Drop pieces of fewer tokens."),
    max_length: int | None = typer.Option(None, help="Cut pieces into documents of at most this many tokens."),
    grid_ms: int | None = typer.Option(None, help="nvd: time grid in ms, a multiple of 10 (default 10)."),
    seed: int | None = typer.Option(None, help="Augmentation RNG seed (default 0)."),
    workers: int = typer.Option(0, help="Parser processes (0 = all cores)."),
    append: bool = typer.Option(False, "--append", help="Add these inputs to the dataset already in --out (same settings); without it a folder holding other inputs is refused."),
) -> None:
    """MIDI -> a symbolic encoding's token shards (--encoding; amt by default), or --from-tokens passthrough."""
    from amtrain.errors import UserError
    from amtrain.prep.common import default_workers
    from amtrain.prep.encodings import prep_encoding

    con = console()
    if from_tokens:
        from amtrain.prep.midi import import_token_files

        if inputs:
            raise UserError("give MIDI inputs or --from-tokens files, not both")
        if encoding != "amt":
            raise UserError("--from-tokens imports AMT token files; it takes no --encoding")
        imported = import_token_files([str(p) for p in from_tokens], out, token_split, append=append)
        lens = ", ".join(f"{n:,} x {length}" for length, n in sorted(imported.lengths.items()))
        con.print(f"[bold]{out}[/]: imported {imported.num_sequences:,} sequences, {imported.num_tokens:,} ids into "
                  f"'{token_split}' ({lens or 'resumed'}); {imported.num_bad_lines} bad lines skipped",
                  highlight=False, soft_wrap=True)
        if imported.num_bad_lines:
            raise typer.Exit(1)
        return
    if not inputs:
        raise UserError("no inputs: give MIDI files/folders, or --from-tokens FILE.txt")
    given = {"augment": augment, "split": split, "val_fraction": val_fraction, "test_fraction": test_fraction,
             "transpose": _ints(transpose, "--transpose") if transpose is not None else None,
             "stretch": _floats(stretch, "--stretch") if stretch is not None else None,
             "velocity_shift": _ints(velocity_shift, "--velocity-shift") if velocity_shift is not None else None,
             "augmented_share": augmented_share, "min_freq": min_freq, "min_length": min_length,
             "max_length": max_length, "grid_ms": grid_ms, "seed": seed}
    options = {k: v for k, v in given.items() if v is not None}
    rep = prep_encoding(encoding, inputs, out, options, workers=workers or default_workers(), append=append)
    for line in rep.lines:
        con.print(line, highlight=False, soft_wrap=True, markup=False)
    if rep.num_corrupt:
        console(stderr=True).print(f"[red]{rep.num_corrupt} file(s) skipped as unreadable/corrupt[/]; the rest is written")
        raise typer.Exit(1)


def _load_ids(tokens: Path, line: int):
    import numpy as np

    from amtrain.errors import UserError
    from amtrain.midi.decode import read_token_file

    if not tokens.is_file():
        raise UserError(f"{tokens}: no such token file; give a .txt of ids (one sequence a line) or a .npy")
    seqs = read_token_file(tokens, line)
    if not seqs:
        raise UserError(f"{tokens}: no token lines")
    return np.concatenate(seqs)


def decode_midi(
    tokens: Path = typer.Argument(..., help="Token ids: .txt (space-separated, one sequence a line) or .npy."),
    out: Path = typer.Argument(..., help="MIDI file to write."),
    line: int = typer.Option(1, help="Which sequence (1-based); 0 = all, one after another."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Decode ids of this dataset's encoding (nvd, ...: its tokenizer and vocabulary); default AMT ids."),
) -> None:
    """Event ids -> MIDI. Invalid ids and malformed triples are skipped and counted."""
    from amtrain.midi.decode import ids_to_midi, write_midi

    if dataset is not None:
        notes = _dataset_notes(dataset, _load_ids(tokens, line))
        write_midi(notes, out)
        typer.echo(f"{out}: {len(notes)} notes")
        return
    rep = ids_to_midi(_load_ids(tokens, line), out)
    typer.echo(f"{out}: {rep.summary()}")


def _dataset_notes(dataset: Path, ids):
    """Ids -> notes through the dataset's modality (`Modality.notes`: any symbolic encoding)."""
    from amtrain.errors import UserError
    from amtrain.registry import modality_of
    from amtrain.store import Dataset
    from amtrain.tokens import get_tokenizer

    manifest = Dataset(dataset).manifest
    tok = get_tokenizer(manifest.tokenizer, **manifest.tokenizer_params)
    notes = modality_of(manifest.tokenizer).notes(tok, ids)
    if notes is None:
        raise UserError(f"{dataset}: a {manifest.tokenizer} dataset is not symbolic music; give a MIDI dataset")
    return notes


def plot_midi(
    source: Path = typer.Argument(..., help="A .mid/.midi file, or token ids (.txt/.npy)."),
    out: Path = typer.Argument(..., help="PNG to write."),
    line: int = typer.Option(1, help="For token files: which sequence (1-based); 0 = all."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Token ids of this dataset's encoding (nvd, ...); default AMT ids."),
) -> None:
    """Piano roll PNG of a MIDI file or a token sequence (controls outlined)."""
    from amtrain.errors import UserError
    from amtrain.midi.events import MidiReadError
    from amtrain.midi.pianoroll import plot_ids
    from amtrain.midi.pianoroll import plot_midi as plot_file

    if source.suffix.lower() in (".mid", ".midi"):
        try:
            plot_file(source, out)
        except MidiReadError as e:
            raise UserError(f"{source}: {e}") from None
        typer.echo(f"{out}: piano roll of {source}")
        return
    if dataset is not None:
        from amtrain.midi.pianoroll import plot_notes

        notes = _dataset_notes(dataset, _load_ids(source, line))
        plot_notes(notes, out, title=f"{source.name} ({dataset.name})")
        typer.echo(f"{out}: piano roll of {len(notes)} notes")
        return
    _, rep = plot_ids(_load_ids(source, line), out, title=f"{source.name}, " + (f"line {line}" if line else "all lines"))
    typer.echo(f"{out}: {rep.summary()}")


def vocab(name: str = typer.Argument(..., help="Tokenizer: midi | gpt2 | ascii | audio | nvd (with --dataset)."),
          dataset: Path | None = typer.Option(None, "--dataset", help="A dataset whose vocabulary is its corpus's (nvd): read it from its manifest.")) -> None:
    """Print a vocabulary's layout: every block's offset and size, and the special ids."""
    from rich.table import Table

    from amtrain.errors import UserError
    from amtrain.tokens import get_tokenizer

    params = {}
    if dataset is not None:
        from amtrain.store import Dataset

        manifest = Dataset(dataset).manifest
        if manifest.tokenizer != name:
            raise UserError(f"{dataset}: a {manifest.tokenizer} dataset, not {name}; run `amtrain vocab {manifest.tokenizer} --dataset {dataset}`")
        params = manifest.tokenizer_params
    try:
        tok = get_tokenizer(name, **params)
    except TypeError:
        raise UserError(f"the {name} vocabulary is built from a corpus: add --dataset DIR (a dataset prepped with it)") from None
    con = console()
    con.print(f"[bold]{tok.name}[/]: vocab size {tok.vocab_size:,}; eot {tok.eot_id}; specials {tok.special_ids}",
              highlight=False, soft_wrap=True)
    layout = getattr(tok, "layout", None)  # tokenizers with blocks describe them
    if callable(layout):
        table = Table("block", "offset", "size", "last id", "meaning")
        for block, offset, size, meaning in layout():
            table.add_row(block, str(offset), str(size), str(offset + size - 1), meaning)
        con.print(table)
