"""Shared fixtures: the bundled corpus prepped once per test session, and repo paths."""

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
    from data_prep.text import prep_text

    out = tmp_path_factory.mktemp("kjv_gpt2")
    prep_text([str(KJV)], out, tokenizer="gpt2", show_progress=False)
    return out


@pytest.fixture(scope="session")
def kjv_ascii(tmp_path_factory) -> Path:
    from data_prep.text import prep_text

    out = tmp_path_factory.mktemp("kjv_ascii")
    prep_text([str(KJV)], out, tokenizer="ascii", show_progress=False)
    return out
