"""A checkpoint save on a full disk (a real size-limited tmpfs, where mounting is allowed): one
line naming the folder, the cause and the newest intact checkpoint; nothing half-written left."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fault_helpers import mounted_tmpfs
from tests.train_helpers import LAUNCHER, argv, env, tiny

pytestmark = pytest.mark.slow


@pytest.fixture
def tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", "64m") as mnt:
        yield mnt


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(kjv_ascii, tmpfs):
    from amtrain.train.checkpoint import latest_checkpoint, verify

    out = tmpfs / "run"
    args = tiny(kjv_ascii, out, **{"train.max_steps": 4, "train.checkpoint_every": 4})
    first = subprocess.run([sys.executable, LAUNCHER, *argv(args)], env=env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    step4 = out / "checkpoints" / "step_00000004"
    assert latest_checkpoint(out / "checkpoints") == step4
    free = __import__("shutil").disk_usage(tmpfs).free
    with open(tmpfs / "filler", "wb") as f:  # leave ~200 kB: metrics still fit, a checkpoint does not
        f.write(b"\0" * (free - 200_000))
    args |= {"train.max_steps": 8}
    second = subprocess.run([sys.executable, LAUNCHER, *argv(args)], env=env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "checkpoint save:" in errors[0] and "no space left on the device" in errors[0]
    assert f"the newest complete checkpoint {step4} is intact" in errors[0]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in left if n.startswith(".tmp")], left
    verify(step4)  # still complete and intact
