"""The commands a new user types, verbatim, in a clean clone: the README's main job (prep the
bundled corpus, the default DeepSpeed run, a sample) and the design card's
`amtrain prep-audio song.wav` and `amtrain rollout --mode infill`. The README's test command is
what CI runs (`.ci/run`). The install steps of the README's line (venv + pip) are the one part
not repeated here: the clone runs on this environment's installed dependencies, its own code
first on PYTHONPATH."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.train_helpers import REPO, env

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()


def _readme_main_job() -> list[str]:
    """The README's first command, split at `&&`, without its setup (venv, pip)."""
    block = re.search(r"```bash\n(python3 -m venv[^\n]*)\n```", README).group(1)
    steps = [s.strip() for s in block.split("&&")]
    return [s for s in steps if not s.startswith(("python3 -m venv", ". .venv", "pip install"))]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A clean clone of the committed tree (what CI and a new user get)."""
    out = tmp_path_factory.mktemp("walk") / "amtrain"
    subprocess.run(["git", "clone", "-q", str(REPO), str(out)], check=True, capture_output=True)
    return out


def _run(cmd: str, cwd: Path, timeout: float = 900, **extra) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, shell=True, cwd=cwd, env=env(PYTHONPATH=str(cwd), **extra), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return p


def test_readme_main_job_then_the_design_card_commands_verbatim(clone):
    steps = _readme_main_job()
    assert steps[0].startswith("amtrain prep-text") and steps[1].startswith("deepspeed launchers/train.py")
    out = {}
    for step in steps:
        out[step] = _run(step, clone)
    train = out[steps[1]].stdout
    assert "done: step 150" in train and "checkpoint: runs/default/checkpoints/step_00000150" in train
    assert 'sample from it: python -m amtrain sample runs/default --prompt "In the beginning"' in train
    sample = out[steps[2]].stdout
    assert sample.strip() and "Traceback" not in out[steps[2]].stderr

    # the design card: `amtrain rollout --mode infill`, exactly, right after the main job
    r = _run("amtrain rollout --mode infill", clone)
    assert r.stdout.startswith("checkpoint: runs/default/checkpoints/step_00000150 (the newest run under runs/")
    assert "out: runs/default/rollouts/infill_0" in r.stdout and "sample_0: " in r.stdout, r.stdout
    assert (clone / "runs" / "default" / "rollouts" / "infill_0" / "sample_0.txt").is_file()

    # the design card: `amtrain prep-audio song.wav`, exactly, with weights on the documented
    # search path (a stand-in made by `amtrain codec init`, as docs/audio.md says)
    codec = clone / "codec"
    _run(f"amtrain codec init {codec} --size debug --seconds 5", clone)
    shutil.copy(REPO / "data" / "audio" / "music21_test_audio.wav", clone / "song.wav")
    r = _run("amtrain prep-audio song.wav", clone, AMTRAIN_CODEC_DIR=str(codec))
    assert "no --out given: writing the dataset to runs/data/song" in r.stdout
    assert (clone / "runs" / "data" / "song" / "manifest.json").is_file()
