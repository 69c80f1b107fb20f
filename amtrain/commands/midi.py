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
    from_tokens: list[Path] = typer.Option([], "--from-tokens", help="Import AMT pre-tokenized .txt files unchanged instead (one sequence of ids a line)."),
    token_split: str = typer.Option("train", help="Split the --from-tokens sequences go to."),
    augment: int = typer.Option(1, help="AMT augmentation factor for train (1 = none; AMT trains on 10)."),
    split: str = typer.Option("md5", help="md5 (AMT: first MD5 hex digit e = val, f = test) | ratio."),
    val_fraction: float = typer.Option(0.0625, help="With --split ratio: share of files in val."),
    test_fraction: float = typer.Option(0.0625, help="With --split ratio: share of files in test."),
    transpose: str = typer.Option("0", help="Semitone shifts, comma-separated; each makes a train variant (drums untouched)."),
    stretch: str = typer.Option("1.0", help="Tempo factors (time multipliers), comma-separated; each makes a train variant."),
    seed: int = typer.Option(0, help="Augmentation RNG seed per split (AMT: 0)."),
    workers: int = typer.Option(0, help="Parser processes (0 = all cores)."),
    append: bool = typer.Option(False, "--append", help="Add these inputs to the dataset already in --out (same settings); without it a folder holding other inputs is refused."),
) -> None:
    """MIDI -> AMT event sequences (1024 ids) in token shards; or --from-tokens passthrough."""
    from amtrain.errors import UserError
    from amtrain.prep.common import default_workers
    from amtrain.prep.midi import MidiPrepConfig, import_token_files
    from amtrain.prep.midi import prep_midi as run

    con = console()
    if from_tokens:
        if inputs:
            raise UserError("give MIDI inputs or --from-tokens files, not both")
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
    cfg = MidiPrepConfig(augment=augment, split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                         transpose=_ints(transpose, "--transpose"), stretch=_floats(stretch, "--stretch"), seed=seed)
    s = run(inputs, out, cfg, workers=workers or default_workers(), append=append)
    drops = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in s.dropped.items() if n) or "none"
    con.print(
        f"[bold]{out}[/]: {s.num_files} files ({s.num_resumed} already parsed, {s.num_corrupt} corrupt skipped); "
        f"pieces kept train/val/test {s.num_pieces['train']}/{s.num_pieces['val']}/{s.num_pieces['test']}; "
        f"dropped by filters: {drops}", highlight=False, soft_wrap=True)
    con.print(
        f"sequences train/val/test {s.num_sequences['train']:,}/{s.num_sequences['val']:,}/{s.num_sequences['test']:,} "
        f"(1024 ids each); {s.num_rests:,} REST events, {s.num_truncated:,} durations capped, "
        f"{s.num_dropped_overflow} sequences dropped (time >= 100 s), {s.num_out_of_range} notes transposed "
        f"out of range dropped; parse {s.files_per_s:.1f} files/s, "
        f"{s.events_per_s:,.0f} events/s; total {s.seconds_total:.2f} s", highlight=False, soft_wrap=True)
    if s.num_corrupt:
        console(stderr=True).print(f"[red]{s.num_corrupt} file(s) skipped as unreadable/corrupt[/]; the rest is written")
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
) -> None:
    """Event ids -> MIDI. Invalid ids and malformed triples are skipped and counted."""
    from amtrain.midi.decode import ids_to_midi

    rep = ids_to_midi(_load_ids(tokens, line), out)
    typer.echo(f"{out}: {rep.summary()}")


def plot_midi(
    source: Path = typer.Argument(..., help="A .mid/.midi file, or token ids (.txt/.npy)."),
    out: Path = typer.Argument(..., help="PNG to write."),
    line: int = typer.Option(1, help="For token files: which sequence (1-based); 0 = all."),
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
    _, rep = plot_ids(_load_ids(source, line), out, title=f"{source.name}, " + (f"line {line}" if line else "all lines"))
    typer.echo(f"{out}: {rep.summary()}")


def vocab(name: str = typer.Argument(..., help="Tokenizer: midi | gpt2 | ascii | audio.")) -> None:
    """Print a vocabulary's layout: every block's offset and size, and the special ids."""
    from rich.table import Table

    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer(name)
    con = console()
    con.print(f"[bold]{tok.name}[/]: vocab size {tok.vocab_size:,}; eot {tok.eot_id}; specials {tok.special_ids}",
              highlight=False, soft_wrap=True)
    layout = getattr(tok, "layout", None)  # tokenizers with blocks describe them
    if callable(layout):
        table = Table("block", "offset", "size", "last id", "meaning")
        for block, offset, size, meaning in layout():
            table.add_row(block, str(offset), str(size), str(offset + size - 1), meaning)
        con.print(table)
