"""The `amtrain` command. Each command lives in a module of `amtrain.commands` that defines
`register(app)`; heavy imports stay inside the command bodies so `amtrain --help` is instant.

User errors (`amtrain.errors.UserError`) print one line `error: ...` and exit 1; the traceback
is shown only under `--debug`. Ctrl-C prints `interrupted` and exits 130.
"""

from __future__ import annotations

import importlib
import sys

import typer

from amtrain import __version__
from amtrain.errors import UserError

app = typer.Typer(
    name="amtrain",
    help="Train sequence models over text, MIDI and neural-audio codes under DeepSpeed ZeRO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = [
    "amtrain.commands.text",
    "amtrain.commands.midi",
    "amtrain.commands.audio",
    "amtrain.commands.codec",
    "amtrain.commands.model",
    "amtrain.commands.rollout",
    "amtrain.commands.scaling",
    "amtrain.commands.serve",
    "amtrain.commands.hf",
    "amtrain.commands.evaluate",
]

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"amtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=True)
    except UserError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except SystemExit as e:  # typer ends a command interrupted by Ctrl-C with a silent exit 130
        if e.code != 130:
            raise
        typer.echo("interrupted", err=True)
        sys.exit(130)
