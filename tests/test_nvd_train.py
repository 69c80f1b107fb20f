"""nvd trains under the same loop with the decoder, the LSTM and T5 (bits per second of music in
validation), rolls out from a .mid prompt, and runs through `amtrain scaling run` with the
seeds' size table."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from amtrain.train.loop import train
from tests.midi_helpers import MIDI_DIR, SMALL_FILES
from tests.train_helpers import REPO, env, from_args, metrics, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nvd_data(tmp_path_factory):
    from amtrain.prep.encodings import prep_encoding

    out = tmp_path_factory.mktemp("nvd")
    prep_encoding("nvd", [str(MIDI_DIR)], out, {"split": "ratio", "val_fraction": 0.2, "test_fraction": 0.0,
                                                 "max_length": 257}, workers=1, show_progress=False)
    return out


T5 = {"model.arch": "t5", "denoise.inputs_length": 64, "batch.global_tokens": "null", "batch.grad_accum": 1,
      "denoise.curriculum": {"mode": "adaptive", "window": 2, "plateau_tol": 1.0, "climb_tol": 10.0, "level_step": 0.25}}


@pytest.mark.parametrize("arch", ["decoder", "lstm", "t5"])
def test_nvd_trains_with_every_family(nvd_data, tmp_path, arch):
    from amtrain.modalities.music import val_tokens_per_second
    from amtrain.registry import modality
    from amtrain.store import Dataset

    over = T5 if arch == "t5" else {"model.arch": arch}
    res = train(from_args(tiny(nvd_data, tmp_path / "run", **{"train.max_steps": 10, "train.eval_every": 10, **over})))
    rows = metrics(res.run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    val = metrics(res.run_dir, "val")[-1]
    assert math.isfinite(val["val_loss"])
    if arch != "t5":  # a left-to-right model's held-out likelihood, per second of music
        rate = val_tokens_per_second(Dataset(nvd_data), "val", 64, 2 * 4, modality("nvd"))
        assert rate is not None and 5 < rate < 200
        assert val["bits_per_second"] == pytest.approx(val["val_loss"] / math.log(2) * rate, rel=1e-9)
        assert val["bits_per_note"] == pytest.approx(4 * val["val_loss"] / math.log(2), rel=1e-9)
    if arch == "decoder":
        out = tmp_path / "samples"
        r = subprocess.run([sys.executable, "-m", "amtrain", "rollout", str(res.run_dir), "--prompt", str(SMALL_FILES[1]),
                            "--out", str(out), "--length", "40"], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "+10 notes" in r.stdout  # 40 tokens = 10 whole events, each a note (the grammar)
        for suffix in (".mid", ".png", ".txt", ".npy"):
            assert (out / f"sample_0{suffix}").is_file()
        assert (out / "sample_0.txt").read_text().startswith("START sep0 n")
        # fill in the middle (data.fim_rate defaults to 0.5, cut at events): whole events under the grammar
        r = subprocess.run([sys.executable, "-m", "amtrain", "rollout", str(res.run_dir), "--mode", "infill",
                            "--out", str(tmp_path / "fill"), "--length", "20"], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        words = (tmp_path / "fill" / "sample_0.txt").read_text().split()
        assert len(words) % 4 == 0 and all(w.startswith(k) for i, w in enumerate(words)
                                           for k in [("sep", "n", "v", "d")[i % 4]])


def test_nvd_scaling_study_with_the_seed_size_table(nvd_data, tmp_path):
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, "-m", "amtrain", "scaling", "run", "--data", str(nvd_data), "--out", str(out),
                        "--size-table", "seeds", "--sizes", "tiny", "--arch", "transformer,lstm", "--tokens", "1024",
                        "--seq-len", "64", "--micro-batch", "8"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["arch"], x["size"]) for x in rows] == [("transformer", "seed-tiny"), ("lstm", "seed-tiny")]
    n = [int(x["non_embedding_params"]) for x in rows]
    assert n[0] == 393_600 and n[1] == pytest.approx(n[0], rel=0.005)
    assert all(float(x["bits_per_second"]) > 0 for x in rows)  # symbolic music: bits per second of music
