"""Shared fixtures: the bundled corpus prepped once per test session, repo paths, and the
one-process reference run the multi-process tests compare with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KJV = REPO / "data" / "kjv" / "kjv_pentateuch.txt"

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def kjv_gpt2(tmp_path_factory) -> Path:
    """The bundled KJV corpus as a gpt2 dataset (read-only for tests: copy before changing)."""
    from amtrain.prep.text import prep_text

    out = tmp_path_factory.mktemp("kjv_gpt2")
    prep_text([str(KJV)], out, tokenizer="gpt2", show_progress=False)
    return out


@pytest.fixture(scope="session")
def kjv_ascii(tmp_path_factory) -> Path:
    from amtrain.prep.text import prep_text

    out = tmp_path_factory.mktemp("kjv_ascii")
    prep_text([str(KJV)], out, tokenizer="ascii", show_progress=False)
    return out


@pytest.fixture(scope="session")
def one_process(kjv_gpt2, tmp_path_factory):
    """The `tests.train_helpers.tiny` run in this process (one rank): the reference every
    multi-rank launch of the same config must match step by step. A RunResult."""
    from amtrain.train.loop import train
    from tests.train_helpers import from_args, tiny

    return train(from_args(tiny(kjv_gpt2, tmp_path_factory.mktemp("one_process"))))
