"""Faults a training run meets, each reproduced and met with one line or a correct recovery
(the [hardening] issue, training side; docs/reliability_train.md lists what each test proves):

* damaged shards (a flipped byte, an id in [vocab, padded vocab), an id past the padded vocab)
  stop training at start with one line naming the shard (and the offset), for both loaders;
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from amtrain.errors import ShardError
from amtrain.store import Dataset, write_shard
from amtrain.store.format import HEADER_BYTES
from amtrain.train.loop import train
from tests.train_helpers import LAUNCHER, REPO, argv, env, from_args, tiny

PADDED_GPT2 = 50304  # the decoder pads gpt2's 50257 ids to a multiple of 64


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run that may be writing (or was killed mid-line): whole rows only."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar as TensorBoard shows it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), [e.step for e in events]  # one point per step
    return {e.step: e.value for e in events}


def _launch(args: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, LAUNCHER, *argv(args)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------- damaged shards


def _damage(src: Path, dst: Path, fault: str) -> tuple[Path, int]:
    """A copy of the dataset whose first train shard has `fault` at token 1000. -> (shard, id there)."""
    shutil.copytree(src, dst)
    record = Dataset(dst).shards("train")[0]
    shard = dst / record.file
    raw = bytearray(shard.read_bytes())
    at = HEADER_BYTES + 2 * 1000  # uint16 ids
    if fault == "flipped byte":
        assert int.from_bytes(raw[at:at + 2], "little") < 50000  # the flip keeps the id in range
        raw[at] ^= 0x01
    else:  # ids from another vocabulary, written with a consistent checksum
        raw[at:at + 2] = {"id in padding": 50260, "id past padding": 60000}[fault].to_bytes(2, "little")
        crc = zlib.crc32(raw[HEADER_BYTES:])
        raw[32:36] = struct.pack("<I", crc)
        manifest = json.loads((dst / "manifest.json").read_text())
        next(s for s in manifest["shards"] if s["file"] == record.file)["crc32"] = crc
        (dst / "manifest.json").write_text(json.dumps(manifest))
    shard.write_bytes(raw)
    return shard, int.from_bytes(raw[at:at + 2], "little")


@pytest.mark.parametrize("fault", ["flipped byte", "id in padding", "id past padding"])
@pytest.mark.parametrize("arch", ["decoder", "t5"])
def test_a_damaged_shard_stops_training_at_start_naming_it(fault, arch, kjv_gpt2, tmp_path):
    shard, value = _damage(kjv_gpt2, tmp_path / "ds", fault)
    over = {"model.arch": "t5", "denoise.inputs_length": 64, "batch.global_tokens": "null"} if arch == "t5" else {}
    with pytest.raises(ShardError) as e:
        train(from_args(tiny(tmp_path / "ds", tmp_path / "run", **over)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{shard}: ") and "re-run prep" in msg
    if fault == "flipped byte":
        assert "checksum mismatch" in msg
    else:
        assert value >= 50257 and (value < PADDED_GPT2) == (fault == "id in padding")
        assert f"token 1,000 (byte offset {HEADER_BYTES + 2000:,}) is id {value}, outside the vocabulary of 50257 ids" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # at start: not one step trained


def test_a_replaced_shard_is_named(kjv_gpt2, tmp_path):
    """A sound shard that is not the one the manifest recorded (its checksum differs)."""
    shutil.copytree(kjv_gpt2, tmp_path / "ds")
    record = Dataset(tmp_path / "ds").shards("val")[0]
    write_shard(tmp_path / "ds" / record.file, np.arange(record.num_tokens) % 50257, 50257)
    with pytest.raises(ShardError, match=r"val/.*\.bin: checksum 0x[0-9a-f]{8} differs from manifest\.json's"):
        train(from_args(tiny(tmp_path / "ds", tmp_path / "run")))
