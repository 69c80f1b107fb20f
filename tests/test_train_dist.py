"""Multi-process training on CPU (gloo, fp32, the debug decoder, 8 steps of 512 tokens on the
bundled corpus). Launches are few and each carries several checks:

* deepspeed --num_accelerators 2, ZeRO-2: the loss falls; it equals one process at the same
  global batch step by step; a one-process run resumed from its step-4 checkpoint (world size
  2 -> 1, amtrain's universal-checkpoint conversion) continues with the same losses.
* deepspeed --num_accelerators 2, ZeRO-3: the same losses, with rollouts every 4 steps whose
  statistics (amtrain.evaluate) land in metrics.jsonl; `amtrain export` gathers the ZeRO-3
  shards into a model that loads without DeepSpeed.
* two torchrun launches with --nnodes 2 --node_rank 0/1 on 127.0.0.1 (simulated two nodes),
  ZeRO-1: the same losses.
* a rank killed mid-run: the other exits with a clear error within the timeout.
* the default command `deepspeed launchers/train.py --ds_config ds_configs/zero2.json` (capped
  to a few steps) prints the checkpoint and a sample command that works.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from amtrain.train.loop import train
from tests.train_helpers import (
    LAUNCHER,
    REPO,
    argv,
    assert_same_losses,
    env,
    free_port,
    from_args,
    losses,
    metrics,
    run,
    tiny,
)

pytestmark = [pytest.mark.slow]

STEPS = 8


def _deepspeed(args: dict, num: int = 2) -> list[str]:
    return ["deepspeed", "--num_accelerators", str(num), "--master_port", str(free_port()), LAUNCHER, *argv(args)]


def _assert_falls(run_losses: dict[int, float]):
    assert sorted(run_losses) == list(range(1, STEPS + 1))
    assert run_losses[STEPS] < run_losses[1] - 0.8, run_losses  # 10.8 -> ~9.8 in 8 steps on KJV text


@pytest.fixture(scope="module")
def two_rank_zero2(kjv_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2x2")
    run(_deepspeed(tiny(kjv_gpt2, out, **{"train.checkpoint_every": 4})))
    return out


def test_two_ranks_zero2_match_one_process_and_resume_on_one(two_rank_zero2, one_process, kjv_gpt2, tmp_path):
    two = losses(two_rank_zero2)
    _assert_falls(two)
    info = metrics(two_rank_zero2)[-1]
    assert info["tokens_seen"] == STEPS * 512
    assert one_process.state.tokens_seen == STEPS * 512
    assert_same_losses(one_process.losses, two, range(1, STEPS + 1))
    step4 = two_rank_zero2 / "checkpoints" / "step_00000004"
    resumed = train(from_args(tiny(kjv_gpt2, tmp_path / "resumed", **{"train.resume": str(step4)})))
    assert (step4 / "universal" / "zero").is_dir()  # converted by amtrain
    assert sorted(resumed.losses) == [5, 6, 7, 8] and resumed.state.tokens_seen == STEPS * 512
    assert_same_losses(resumed.losses, two, range(5, STEPS + 1))


def test_two_ranks_zero3_and_export(two_rank_zero2, kjv_gpt2, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app
    from amtrain.models.io import load_pretrained

    rollouts = {"train.rollout_every": 4, "train.rollout_prompts": ["In the beginning"], "train.rollout_length": 16}
    run(_deepspeed(tiny(kjv_gpt2, tmp_path / "z3", ds_config=str(REPO / "ds_configs" / "zero3.json"), **rollouts)))
    z3 = losses(tmp_path / "z3")
    _assert_falls(z3)
    assert_same_losses(z3, losses(two_rank_zero2), range(1, STEPS + 1))  # rollouts leave training alone
    recs = metrics(tmp_path / "z3", "rollout")  # rank 0's rollout statistics (amtrain.evaluate)
    assert [r["step"] for r in recs] == [4, 8]
    for r in recs:
        assert r["tokens"] == 16 and 0 <= r["rep_4"] <= 1 and 0 < r["distinct_1"] <= 1 and r["invalid_share"] == 0
        assert 0 <= r["units"] <= 16  # words of the 16 new tokens (the prompt not counted)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "z3" / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("rollout/rep_4")] == [4, 8]
    r = CliRunner().invoke(app, ["export", str(tmp_path / "z3"), str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    model, meta = load_pretrained(tmp_path / "exp")
    assert meta["step"] == STEPS and model.num_params() == 3_317_952


@pytest.mark.multinode
def test_simulated_two_nodes_zero1(two_rank_zero2, kjv_gpt2, tmp_path):
    port = free_port()
    args = argv(tiny(kjv_gpt2, tmp_path / "nodes", ds_config=str(REPO / "ds_configs" / "zero1.json")))
    procs = [subprocess.Popen(["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), LAUNCHER, *args],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "2 rank(s) on cpu" in outs[0]
    nodes = losses(tmp_path / "nodes")
    _assert_falls(nodes)
    assert_same_losses(nodes, losses(two_rank_zero2), range(1, STEPS + 1))


def test_dead_rank_ends_the_others_with_a_clear_error(kjv_gpt2, tmp_path):
    out = tmp_path / "dead"
    args = argv(tiny(kjv_gpt2, out, **{"train.max_steps": 10_000, "train.dist_timeout_s": 30}))
    base = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_RANK="0")
    procs = [subprocess.Popen([sys.executable, LAUNCHER, *args], cwd=REPO, env={**base, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
            assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=60)
        assert time.time() - t0 < 45
        assert procs[0].returncode == 1
        assert "error: rank 0: lost contact with another rank" in err and "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_default_command_smoke(tmp_path):
    """The quickstart command, capped at 3 steps; prints where the checkpoint is and how to sample."""
    out = tmp_path / "default"
    p = run(["deepspeed", "--master_port", str(free_port()), LAUNCHER, "--ds_config", "ds_configs/zero2.json",
             "--train.max_steps", "3", "--train.out_dir", str(out)])
    assert f"checkpoint: {out}/checkpoints/step_00000003" in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("sample from it: "))
    cmd = shlex.split(line.removeprefix("sample from it: ")) + ["-n", "8", "--seed", "0"]
    assert cmd[:4] == ["python", "-m", "amtrain", "sample"]
    s = run([sys.executable, *cmd[1:]])
    assert s.stdout.strip().splitlines()[-1].startswith("In the beginning")
    assert os.path.isfile(out / "checkpoints" / "latest")


def test_launcher_destroys_the_process_group_on_every_exit(kjv_gpt2, tmp_path):
    """torch asks every program that made a process group to destroy it: the launcher does, after a
    finished run and after a user error raised once the group exists (a missing data folder).
    (Run as a script it then leaves through `exit_process`, skipping the interpreter teardown in
    which gloo's worker threads can abort a finished run; every launch in this suite goes that way.)"""
    code = ("import importlib.util, sys, torch.distributed as dist\n"
            f"spec = importlib.util.spec_from_file_location('launch', {LAUNCHER!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "rc = m.main(sys.argv[1:])\n"
            "print('rc', rc, 'group alive', dist.is_initialized())\n")
    ok = run([sys.executable, "-c", code, *argv(tiny(kjv_gpt2, tmp_path / "ok", **{"train.max_steps": 2}))])
    assert ok.stdout.strip().splitlines()[-1] == "rc 0 group alive False"
    bad = run([sys.executable, "-c", code, *argv(tiny(tmp_path / "missing", tmp_path / "bad"))])
    assert bad.stdout.strip().splitlines()[-1] == "rc 1 group alive False"
    assert "error: " in bad.stderr and str(tmp_path / "missing") in bad.stderr


@pytest.mark.parametrize("body, rc, out, err", [
    ("print('done: step 8'); return 0", 0, "done: step 8", ""),  # buffered stdout (a pipe) still arrives
    ("print('error: bad', file=sys.stderr); return 1", 1, "", "error: bad"),
    ("raise RuntimeError('boom')", 1, "", "RuntimeError: boom"),  # a crash: traceback, exit 1
    ("raise SystemExit(3)", 3, "", ""),
])
def test_launcher_script_exit_codes_and_flushed_output(body, rc, out, err):
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('launch', {LAUNCHER!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"def fake(argv):\n    {body}\n"
            "m.main = fake\n"
            "m._run_as_script()\n"
            "print('not reached')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == rc, p.stderr
    assert p.stdout.strip() == out and "not reached" not in p.stdout
    assert err in p.stderr and ("Traceback" in p.stderr) == ("boom" in err)
