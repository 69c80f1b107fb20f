"""`amtrain prep-midi --encoding NAME`: which pipeline turns MIDI files into a symbolic encoding's
dataset, found by name in the modality registry (no list of encodings here).

An encoding is a registered `amtrain.modalities.Modality` with three attributes:

    encoding = "nvd"                              # the --encoding value
    prep = "amtrain.prep.nvd:prep_nvd"            # "module:function", imported on use
    prep_options = ("split", "min_freq", ...)     # the prep-midi options it takes (PREP_OPTIONS)

The function has the `EncodingPrep` signature: `options` holds only the options the user gave
(python names, parsed values), so each pipeline keeps its own defaults in its config dataclass;
an option the encoding does not list is refused before it runs. It returns a `PrepReport`: the
lines the command prints and the number of files skipped as corrupt (exit status 1 when any).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from amtrain.errors import UserError
from amtrain.registry import encoding, load_attr

PREP_OPTIONS: dict[str, str] = {
    "augment": "--augment",
    "split": "--split",
    "val_fraction": "--val-fraction",
    "test_fraction": "--test-fraction",
    "transpose": "--transpose",
    "stretch": "--stretch",
    "velocity_shift": "--velocity-shift",
    "augmented_share": "--augmented-share",
    "min_freq": "--min-freq",
    "min_length": "--min-length",
    "max_length": "--max-length",
    "grid_ms": "--grid-ms",
    "seed": "--seed",
}
"""python name -> the `amtrain prep-midi` flag: every option an encoding may take."""


@dataclass
class PrepReport:
    """What a MIDI prep returns to the command."""

    out: Path
    lines: list[str]
    """Printed by `amtrain prep-midi`, one per line (what was written, what was skipped and why)."""
    num_corrupt: int = 0
    """Files skipped as unreadable or corrupt (named on stderr as they were met); the command
    exits 1 when non-zero, after the rest is written."""
    summary: Any = None
    """The pipeline's own summary object (tests, benchmarks)."""
    skipped: list[dict] = field(default_factory=list)


class EncodingPrep(Protocol):
    def __call__(self, inputs: list[str], out: str | Path, options: dict[str, Any], *, workers: int = 1,
                 append: bool = False, show_progress: bool = True) -> PrepReport: ...


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the encoding does not take, by flag."""
    modality = encoding(name)
    unknown = [k for k in options if k not in PREP_OPTIONS]
    assert not unknown, f"prep option(s) {unknown} missing from PREP_OPTIONS"
    extra = [PREP_OPTIONS[k] for k in options if k not in modality.prep_options]
    if extra:
        takes = ", ".join(PREP_OPTIONS[k] for k in modality.prep_options) or "no options"
        raise UserError(f"{', '.join(extra)}: not an option of --encoding {name} (it takes {takes})")


def prep_encoding(name: str, inputs: list[str], out: str | Path, options: dict[str, Any] | None = None, *,
                  workers: int = 1, append: bool = False, show_progress: bool = True) -> PrepReport:
    """Run encoding `name`'s prep on MIDI inputs into the dataset folder `out`."""
    options = dict(options or {})
    check_options(name, options)
    modality = encoding(name)
    assert modality.prep, f"encoding {name} registers no prep"
    fn: EncodingPrep = load_attr(modality.prep)
    return fn(inputs, out, options, workers=workers, append=append, show_progress=show_progress)
