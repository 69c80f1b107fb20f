"""A tiny end-to-end scaling study: 3 sizes x 2 architectures through the real launcher, killed
midway and resumed without redoing finished runs; then the fit and the plots."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from amtrain.scaling.results import read_results
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SIZES = "debug,tiny,small"


def _study(data, out):
    return [sys.executable, "-m", "amtrain", "scaling", "run", "--data", str(data), "--out", str(out),
            "--sizes", SIZES, "--arch", "transformer,lstm", "--tokens", "6144", "--seq-len", "128",
            "--micro-batch", "8", "--lr", "0.003"]


def _rows(path):
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(1 for _ in csv.DictReader(f))


def test_study_killed_midway_resumes_then_fits_and_plots(kjv_ascii, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "study"
    results = out / "results.csv"
    proc = subprocess.Popen(_study(kjv_ascii, out), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _rows(results) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its running training process
    proc.wait()
    first = read_results(results)
    assert 2 <= len(first) < 6
    stamps = {r["run_dir"]: os.stat(out / r["run_dir"] / "metrics.jsonl").st_mtime_ns for r in first}

    r = subprocess.run(_study(kjv_ascii, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("finished earlier, skipped") == len(first)
    rows = read_results(results)
    assert len(rows) == 6 and rows[: len(first)] == first
    for run_dir, stamp in stamps.items():  # finished runs were not trained again
        assert os.stat(out / run_dir / "metrics.jsonl").st_mtime_ns == stamp
    for row in rows:
        assert row["tokens"] == 6144 and row["val_loss"] > 0 and row["tokens_per_s"] > 0
        assert row["active_params"] == row["params"]  # dense: every parameter is active
        last = [json.loads(ln) for ln in (out / row["run_dir"] / "metrics.jsonl").read_text().splitlines()
                if json.loads(ln)["kind"] == "train"][-1]
        assert row["wall_s"] == round(last["elapsed_s"], 2) > 0  # the run's clock, over all its launches
    for arch in ("transformer", "lstm"):
        n = [x["non_embedding_params"] for x in rows if x["arch"] == arch]
        assert n == sorted(n) and len(set(n)) == 3

    fit = subprocess.run([sys.executable, "-m", "amtrain", "scaling", "fit", str(results), "--num-boot", "20"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr
    assert "transformer" in fit.stdout and "lstm" in fit.stdout
    plot = subprocess.run([sys.executable, "-m", "amtrain", "scaling", "plot", str(results), "--out", str(tmp_path / "png"),
                           "--num-boot", "20"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr
    for name in ("loss_vs_params.png", "training_curves.png"):
        png = (tmp_path / "png" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
