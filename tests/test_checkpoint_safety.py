"""Checkpoints can be trusted (one rank, gloo, fp32, the debug decoder on the bundled corpus):

1. loading runs no code: a `__reduce__` payload in the model states, the optimizer states or an
   RNG file is refused by resume, `amtrain export`, `sample` and `rollout` with one line naming
   the file, and the marker it would write never appears; DeepSpeed's own readers (engine,
   zero_to_fp32, ds_to_universal, the universal-checkpoint loaders) load with weights_only;
2. resume finds the newest complete checkpoint by scanning when `latest` is lost, stale or names
   a step without amtrain_state.json, continues bit-exactly, and retention never deletes a
   checkpoint newer than the one it keeps;
3. every file's size and sha256 is recorded at save and checked before use: flipped bytes,
   truncation or a missing file are one error naming the file and the newest intact checkpoint;
   a resume under another ZeRO stage works (universal checkpoint) or is refused in one line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from amtrain.errors import UserError
from amtrain.fileio import file_sha256
from amtrain.train import checkpoint
from amtrain.train import safe_load as safe_load_module
from amtrain.train.loop import train
from amtrain.train.safe_load import forced_weights_only, safe_load
from tests.train_helpers import (
    LAUNCHER,
    REPO,
    argv,
    assert_same_losses,
    env,
    free_port,
    from_args,
    losses,
    tiny,
)

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rng/rank_00000.pt"


def _step(n: int) -> str:
    return checkpoint.tag_for(n)


@pytest.fixture(scope="module")
def base(kjv_gpt2, tmp_path_factory):
    """8 steps uninterrupted under ZeRO-2, a checkpoint every 2 steps, all kept: the reference."""
    return train(from_args(tiny(kjv_gpt2, tmp_path_factory.mktemp("base"), **{"train.checkpoint_every": 2})))


def _copy_run(base, run, steps):
    """A run folder holding copies of the base run's checkpoints at `steps`, `latest` on the last."""
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    for s in steps:
        shutil.copytree(base.run_dir / "checkpoints" / _step(s), ckpts / _step(s))
    (ckpts / "latest").write_text(_step(steps[-1]))
    return ckpts


class Payload:
    """Unpickling it runs code (writes `marker`): what a crafted checkpoint file carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _plant(path, marker):
    """Add the payload to a checkpoint file (a dict), keeping everything else it holds."""
    d = torch.load(path, weights_only=False)  # our own, unaltered file
    d["planted"] = Payload(marker)
    torch.save(d, path)


def _rerecord(folder, name):
    """Rewrite the file's size and sha256 in amtrain_state.json, as an attacker who can write
    the checkpoint would, so that only the weights_only barrier stands between file and code."""
    meta_file = folder / checkpoint.STATE_FILE
    meta = json.loads(meta_file.read_text())
    meta["files"][name] = {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    meta_file.write_text(json.dumps(meta))


def _one_line_naming(err, path):
    msg = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def _cli(*args):
    from amtrain.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _commands(run, tmp_path):
    """export, sample and rollout of `run`: each must fail with a UserError; -> the errors."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("In the beginning")
    results = [_cli("export", run, tmp_path / "exp"),
               _cli("sample", run, "--prompt", "In the beginning", "-n", "4"),
               _cli("rollout", run, "--prompt", prompt, "--out", tmp_path / "roll", "--length", "4")]
    for r in results:
        assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output
    assert not (tmp_path / "exp").exists() and not (tmp_path / "roll").exists()
    return [r.exception for r in results]


# ---------------------------------------------------------------- 1. no code runs on load

def test_the_payload_runs_under_an_unrestricted_load(tmp_path):
    """The fault: torch.load(weights_only=False), what amtrain and DeepSpeed used, runs it."""
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "planted": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    with pytest.raises(UserError, match=r"x\.pt: refused to load: unpickling it needs exec, which is not a tensor"):
        safe_load(tmp_path / "x.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
def test_payload_is_refused_by_resume_export_sample_and_rollout(name, base, kjv_gpt2, tmp_path):
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [2, 4])
    marker = tmp_path / "marker"
    planted = ckpts / _step(4) / name
    _plant(planted, marker)
    # as a swapped file: its size and sha256 no longer match the record
    with pytest.raises(UserError) as err:
        train(from_args(tiny(kjv_gpt2, run)))
    assert re.search(r"\.pt: \d+ bytes, \d+ at save; the file is truncated or damaged", _one_line_naming(err, planted))
    # with amtrain_state.json rewritten to match it: refused for what it would run
    _rerecord(ckpts / _step(4), name)
    with pytest.raises(UserError) as err:
        train(from_args(tiny(kjv_gpt2, run)))
    msg = _one_line_naming(err, planted)
    assert "refused to load: unpickling it needs builtins.exec" in msg
    assert msg.endswith(f"use the newest intact checkpoint instead: {ckpts / _step(2)}")
    for e in _commands(run, tmp_path):
        assert "needs builtins.exec" in _one_line_naming(e, planted)
    assert not marker.exists()


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
def test_deepspeeds_readers_load_with_weights_only(name, base, kjv_gpt2, tmp_path, monkeypatch):
    """With the up-front check switched off, the loads themselves refuse the payload: the
    engine's checkpoint engine (model, optimizer states), the RNG load, zero_to_fp32 (export) and
    ds_to_universal (resume at another world size)."""
    monkeypatch.setattr(checkpoint, "verify", lambda folder, collective=False: None)
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [4])
    marker = tmp_path / "marker"
    planted = ckpts / _step(4) / name
    _plant(planted, marker)
    with pytest.raises(UserError, match="refused to load: unpickling it needs exec") as err:
        train(from_args(tiny(kjv_gpt2, run)))
    _one_line_naming(err, planted)
    if name != RNG:  # export reads the model and optimizer states, not the RNG
        with pytest.raises(UserError, match="needs exec") as err:
            checkpoint.consolidated_state_dict(ckpts / _step(4))
        _one_line_naming(err, planted)
    if name == OPTIM:  # saved at "another world size": converted by ds_to_universal first
        meta = json.loads((ckpts / _step(4) / checkpoint.STATE_FILE).read_text())
        (ckpts / _step(4) / checkpoint.STATE_FILE).write_text(json.dumps({**meta, "world_size": 2}))
        with pytest.raises(UserError, match="needs exec") as err:
            train(from_args(tiny(kjv_gpt2, run)))
        _one_line_naming(err, planted)
        assert not (ckpts / _step(4) / checkpoint.UNIVERSAL).exists()
    assert not marker.exists()
    assert torch.load is safe_load_module._TORCH_LOAD  # the patch is undone after a refusal


def test_forced_weights_only_is_narrow(tmp_path):
    real = torch.load
    with forced_weights_only():
        assert torch.load is not real
        torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
        assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=False)["w"], torch.ones(2))
    assert torch.load is real


# ---------------------------------------------------------------- 2. resume selection, retention

@pytest.mark.parametrize("fault", ["latest deleted", "latest names a missing step", "newest lacks its state"])
def test_lost_latest_resumes_from_the_newest_complete_checkpoint(fault, base, kjv_gpt2, tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [2, 4, 6])
    if fault == "latest deleted":
        (ckpts / "latest").unlink()
    elif fault == "latest names a missing step":
        (ckpts / "latest").write_text(_step(10))
    else:  # step 6 lost its amtrain_state.json: not a complete checkpoint
        (ckpts / _step(6) / checkpoint.STATE_FILE).unlink()
    newest = 4 if fault == "newest lacks its state" else 6
    with pytest.raises(UserError, match="holds checkpoints but train.resume = never"):
        train(from_args(tiny(kjv_gpt2, run, **{"train.resume": "never"})))
    capsys.readouterr()
    res = train(from_args(tiny(kjv_gpt2, run, **{"train.checkpoint_every": 2, "train.keep_last": 2})))
    assert f"; resuming from {ckpts / _step(newest)} (the complete checkpoint with the highest step)" in capsys.readouterr().err
    assert sorted(res.losses) == list(range(newest + 1, 9))  # not "starting fresh"
    for s in res.losses:
        assert res.losses[s] == pytest.approx(base.losses[s], rel=1e-6, abs=0), s
    assert res.state.tokens_seen == base.state.tokens_seen
    # retention: the two newest kept, step 6 re-saved complete where it had lost its state
    assert sorted(p.name for p in ckpts.glob("step_*")) == [_step(6), _step(8)]
    assert checkpoint.latest_checkpoint(ckpts) == ckpts / _step(8) == res.checkpoint
    assert (ckpts / "latest").read_text() == _step(8)


def test_retention_never_deletes_a_newer_checkpoint(base, kjv_gpt2, tmp_path):
    """A run resumed from step 2 in a folder holding steps 2-8, keep_last 1: its save at step 4
    replaces the old step 4 and deletes step 2, never the newer 6 and 8 (sorted by name or by
    step, those were what the old retention kept, deleting the save just made)."""
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [2, 4, 6, 8])
    old_time = json.loads((ckpts / _step(4) / checkpoint.STATE_FILE).read_text())["time"]
    res = train(from_args(tiny(kjv_gpt2, run, **{"train.resume": str(ckpts / _step(2)), "train.max_steps": 4,
                                                  "train.checkpoint_every": 2, "train.keep_last": 1})))
    assert sorted(res.losses) == [3, 4] and res.losses[3] == pytest.approx(base.losses[3], rel=1e-6, abs=0)
    assert sorted(p.name for p in ckpts.glob("step_*")) == [_step(4), _step(6), _step(8)]
    assert json.loads((ckpts / _step(4) / checkpoint.STATE_FILE).read_text())["time"] > old_time
    assert not list(ckpts.glob(".tmp-*"))


def test_steps_are_compared_as_numbers(tmp_path):
    for s in (99_999_999, 100_000_000, 7):  # 9 digits sort before 8 by name
        (tmp_path / _step(s)).mkdir()
        (tmp_path / _step(s) / checkpoint.STATE_FILE).write_text("{}")
    (tmp_path / "step_00000200.bak").mkdir()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [_step(7), _step(99_999_999), _step(100_000_000)]
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / _step(100_000_000)
    checkpoint._retain(tmp_path, 2, tmp_path / _step(100_000_000))
    assert {p.name for p in tmp_path.iterdir()} == {_step(99_999_999), _step(100_000_000), "step_00000200.bak"}


# ---------------------------------------------------------------- 3. integrity, ZeRO stage

def test_every_file_is_recorded_at_save(base):
    folder = base.run_dir / "checkpoints" / _step(8)
    files = json.loads((folder / checkpoint.STATE_FILE).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {checkpoint.STATE_FILE}
    assert set(files) == on_disk == {MODEL, OPTIM, RNG}
    for name, rec in files.items():
        assert rec == {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}, name


def _flip(path):
    """Invert 8 bytes in the middle of the file (inside a tensor's data): the size is unchanged."""
    n = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(n // 2)
        b = f.read(8)
        f.seek(n // 2)
        f.write(bytes(x ^ 0xFF for x in b))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "stray"])
def test_damaged_file_is_one_error_naming_it_and_the_newest_intact(damage, base, kjv_gpt2, tmp_path):
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [2, 4, 6])
    target = ckpts / _step(6) / {"flipped": OPTIM, "truncated": MODEL, "missing": RNG,
                                 "stray": "zero_pp_rank_1_mp_rank_00_optim_states.pt"}[damage]
    if damage == "flipped":
        before = safe_load(target)
        _flip(target)
        # the fault: the damaged optimizer state loads without a word
        after = safe_load(target)
        moments = [k for k, v in before["optimizer_state_dict"]["base_optimizer_state"]["state"][0].items()
                   if not torch.equal(v, after["optimizer_state_dict"]["base_optimizer_state"]["state"][0][k])]
        assert moments
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "missing":
        target.unlink()
    else:  # a shard that is no part of it: DeepSpeed's converters glob *_optim_states.pt
        shutil.copy(ckpts / _step(6) / OPTIM, target)
    why = {"flipped": "altered since it was saved", "truncated": "bytes, ", "missing": "missing",
           "stray": "not part of this checkpoint (not recorded in amtrain_state.json at save); remove it"}[damage]
    with pytest.raises(UserError) as err:
        train(from_args(tiny(kjv_gpt2, run)))
    msg = _one_line_naming(err, target)
    assert why in msg and msg.endswith(f"use the newest intact checkpoint instead: {ckpts / _step(4)}")
    for e in _commands(run, tmp_path):
        assert str(e) == msg
    if damage == "missing":  # and with step 4 damaged too, step 2 is the one to use
        _flip(ckpts / _step(4) / OPTIM)
        with pytest.raises(UserError, match=f"instead: {ckpts / _step(2)}$"):
            train(from_args(tiny(kjv_gpt2, run)))


def test_checkpoint_without_a_file_record_is_checked_for_pickles_only(base, tmp_path, capsys):
    """Saved before amtrain recorded `files`: exported with a warning, a payload still refused."""
    ckpts = _copy_run(base, tmp_path / "run", [4])
    meta_file = ckpts / _step(4) / checkpoint.STATE_FILE
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    sd = checkpoint.consolidated_state_dict(ckpts / _step(4))
    assert all(torch.equal(v, w) for v, w in zip(sd.values(), checkpoint.consolidated_state_dict(
        base.run_dir / "checkpoints" / _step(4)).values(), strict=True))
    assert "saved without file hashes (by an older amtrain)" in capsys.readouterr().err
    marker = tmp_path / "marker"
    _plant(ckpts / _step(4) / RNG, marker)
    with pytest.raises(UserError, match="needs builtins.exec") as err:
        checkpoint.consolidated_state_dict(ckpts / _step(4))
    _one_line_naming(err, ckpts / _step(4) / RNG)
    assert not marker.exists()


def test_cli_prints_the_error_as_one_line(base, tmp_path):
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [2, 4])
    _flip(ckpts / _step(4) / MODEL)
    p = subprocess.run([sys.executable, "-m", "amtrain", "export", str(run), str(tmp_path / "exp")], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert errors == [f"error: {ckpts / _step(4) / MODEL}: altered since it was saved (its sha256 differs from the one "
                      f"in amtrain_state.json); use the newest intact checkpoint instead: {ckpts / _step(2)}"]


def _zero(name):
    return str(REPO / "ds_configs" / f"{name}.json")


def test_resume_between_zero1_and_zero2_is_direct_and_exact(base, kjv_gpt2, tmp_path):
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [4])
    res = train(from_args(tiny(kjv_gpt2, run, ds_config=_zero("zero1"))))
    assert not (ckpts / _step(4) / checkpoint.UNIVERSAL).exists()
    assert sorted(res.losses) == [5, 6, 7, 8]
    for s in res.losses:
        assert res.losses[s] == pytest.approx(base.losses[s], rel=1e-6, abs=0), s


def test_resume_across_zero3_or_zero0_is_refused_in_one_line(base, kjv_gpt2, tmp_path):
    """Before: an AssertionError (2 <-> 3), an AttributeError (2 -> 0), a FileNotFoundError (0 -> 2)."""
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [4])
    for stage in (3, 0):
        with pytest.raises(UserError, match=rf"saved with ZeRO stage 2, this run uses stage {stage}; .* resume with "
                                            r"a ZeRO-2 DeepSpeed config \(e\.g\. ds_configs/zero2\.json\)$") as err:
            train(from_args(tiny(kjv_gpt2, run, ds_config=_zero(f"zero{stage}"))))
        _one_line_naming(err, ckpts / _step(4))
    for stage in (3, 0):
        saved = train(from_args(tiny(kjv_gpt2, tmp_path / f"z{stage}", ds_config=_zero(f"zero{stage}"),
                                     **{"train.max_steps": 2})))
        with pytest.raises(UserError, match=f"saved with ZeRO stage {stage}, this run uses stage 2") as err:
            train(from_args(tiny(kjv_gpt2, tmp_path / f"z{stage}", **{"train.max_steps": 4})))
        _one_line_naming(err, saved.checkpoint)
    assert sorted(p.name for p in ckpts.glob("step_*")) == [_step(4)] and not (ckpts / _step(4) / "universal").exists()


def test_universal_checkpoint_readers_load_with_weights_only(base, kjv_gpt2, tmp_path):
    """The universal path (what a world-size change takes; here the checkpoint's recorded world
    size is changed to send a one-rank resume down it) continues the run, and a payload in the
    converted files is refused by DeepSpeed's universal readers, which call torch.load directly."""
    run = tmp_path / "run"
    ckpts = _copy_run(base, run, [4])
    meta_file = ckpts / _step(4) / checkpoint.STATE_FILE
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "world_size": 2}))
    res = train(from_args(tiny(kjv_gpt2, run)))
    assert (ckpts / _step(4) / checkpoint.UNIVERSAL).is_dir() and sorted(res.losses) == [5, 6, 7, 8]
    assert_same_losses(res.losses, base.losses, range(5, 9))
    marker = tmp_path / "marker"
    exp_avg = ckpts / _step(4) / checkpoint.UNIVERSAL / "zero" / "embed.weight" / "exp_avg.pt"
    _plant(exp_avg, marker)
    (ckpts / _step(8)).rename(tmp_path / "moved")  # resume from step 4 (and its universal/) again
    with pytest.raises(UserError, match="refused to load: unpickling it needs exec") as err:
        train(from_args(tiny(kjv_gpt2, run)))
    _one_line_naming(err, exp_avg)
    assert not marker.exists()


@pytest.mark.slow
def test_two_ranks_record_verify_and_resume_together(kjv_gpt2, tmp_path):
    """Two ranks hash a share of the files each at save and at resume: a damaged shard of rank 1
    stops both ranks with the same line (no rank left waiting); repaired, with the newest
    checkpoint and `latest` gone, both resume from step 6 and repeat steps 7-8 exactly."""
    out = tmp_path / "run"

    def launch():
        cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), LAUNCHER,
               *argv(tiny(kjv_gpt2, out, **{"train.checkpoint_every": 2}))]
        return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)

    first = launch()
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = losses(out)
    ckpts = out / "checkpoints"
    files = json.loads((ckpts / _step(6) / checkpoint.STATE_FILE).read_text())["files"]
    assert {"rng/rank_00001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)
    shutil.rmtree(ckpts / _step(8))
    (ckpts / "latest").unlink()
    shard = ckpts / _step(6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    intact = shard.read_bytes()
    _flip(shard)
    refused = launch()
    line = (f"error: {shard}: altered since it was saved (its sha256 differs from the one in amtrain_state.json); "
            f"use the newest intact checkpoint instead: {ckpts / _step(4)}")
    assert refused.returncode != 0 and refused.stderr.count(line) == 2, refused.stderr[-3000:]
    shard.write_bytes(intact)
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpts / _step(6)} at step 6" in resumed.stdout
    after = losses(out)
    for s in (7, 8):
        assert after[s] == pytest.approx(uninterrupted[s], rel=1e-6, abs=0), s
