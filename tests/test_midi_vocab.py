"""The MIDI vocabulary: AMT's layout constants pinned, tokenizer protocol, `amtrain vocab`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from amtrain.tokens import get_tokenizer
from amtrain.tokens import midi as V
from tests import reference_amt as ref


def test_layout_constants_pinned():
    # the numbers AMT's vocab.py prints (arrival-time vocabulary)
    assert (V.TIME_OFFSET, V.DUR_OFFSET, V.NOTE_OFFSET, V.REST) == (0, 10000, 11000, 27512)
    assert (V.CONTROL_OFFSET, V.ATIME_OFFSET, V.ADUR_OFFSET, V.ANOTE_OFFSET) == (27513, 27513, 37513, 38513)
    assert (V.SPECIAL_OFFSET, V.SEPARATOR, V.AUTOREGRESS, V.ANTICIPATE) == (55025, 55025, 55026, 55027)
    assert V.VOCAB_SIZE == 55028
    assert (V.CONTEXT_SIZE, V.EVENT_SIZE, V.M, V.DELTA) == (1024, 3, 341, 5)
    assert V.CONTEXT_SIZE == 1 + V.EVENT_SIZE * V.M
    assert (V.MAX_TIME, V.MAX_DUR, V.MAX_NOTE, V.TIME_RESOLUTION) == (10000, 1000, 16512, 100)
    assert (V.MAX_TRACK_INSTR, V.MIN_TRACK_EVENTS, V.MIN_TRACK_TIME_IN_SECONDS, V.MAX_TRACK_TIME_IN_SECONDS) == (16, 100, 10, 3600)


def test_constants_agree_with_reference_port():
    for name in ("TIME_OFFSET", "DUR_OFFSET", "NOTE_OFFSET", "REST", "CONTROL_OFFSET", "ATIME_OFFSET",
                 "ADUR_OFFSET", "ANOTE_OFFSET", "SEPARATOR", "AUTOREGRESS", "ANTICIPATE", "VOCAB_SIZE",
                 "M", "DELTA", "MAX_TIME", "MAX_DUR"):
        assert getattr(V, name) == getattr(ref, name), name


def test_layout_blocks_tile_the_vocabulary():
    blocks = V.layout()
    assert blocks[0][1] == 0
    for (_, off, size, _), (_, nxt, _, _) in zip(blocks, blocks[1:], strict=False):
        assert off + size == nxt
    assert blocks[-1][1] + blocks[-1][2] == V.VOCAB_SIZE


def test_tokenizer_registry_and_protocol():
    tok = get_tokenizer("midi")
    assert tok.name == "midi" and tok.vocab_size == 55028 and tok.eot_id == V.SEPARATOR
    assert tok.special_ids["AUTOREGRESS"] == 55026 and tok.params() == {}
    assert tok.encode("55026 0 10050 11060") == [55026, 0, 10050, 11060]
    with pytest.raises(Exception, match="outside the MIDI vocabulary"):
        tok.encode("1 55028")


def test_decode_is_readable():
    tok = get_tokenizer("midi")
    ids = [V.ANTICIPATE, V.SEPARATOR, V.SEPARATOR, V.SEPARATOR,
           150, V.DUR_OFFSET + 50, V.NOTE_OFFSET + 128 * 40 + 60,
           V.ATIME_OFFSET + 700, V.ADUR_OFFSET + 10, V.ANOTE_OFFSET + 128 * 128 + 36,
           200, V.DUR_OFFSET, V.REST, 7]
    text = tok.decode(np.array(ids))
    assert text == "ANTICIPATE | SEP | 1.50s+0.50s i40:p60 | A7.00s+0.10s drums:p36 | rest@2.00s | +7"


def test_vocab_command_prints_every_block(repo_root):
    out = subprocess.run([sys.executable, "-m", "amtrain", "vocab", "midi"], cwd=repo_root,
                         capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for name, offset, size, _ in V.layout():
        assert name in out and str(offset) in out and str(size) in out
    assert "55,028" in out
