"""The `amtrain` commands, one module per group; each defines `register(app)`.

`console()` is the one way commands print: on a terminal rich wraps to its width; into a pipe,
a log file or a SLURM log nothing is wrapped (tables get 160 columns), so lines stay whole and
greppable."""

from __future__ import annotations

import sys


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=160)
