"""Faults a training run meets, each reproduced and met with one line or a correct recovery
(the [hardening] issue, training side; docs/reliability.md, "Training runs", lists what each test proves):

* a run killed between checkpoints and resumed: one metrics.jsonl row per step, TensorBoard
  agrees; a second run into the same out_dir refuses while the first holds it;
* damaged shards (a flipped byte, an id in [vocab, padded vocab), an id past the padded vocab)
  stop training at start with one line naming the shard (and the offset), for both loaders;
* DeepSpeed / run config mistakes are one line each; a missing or empty val split is said;
* a taken master port: one rank moves to a free one, several ranks stop at once in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from amtrain.config import parse_args
from amtrain.errors import ShardError, UserError
from amtrain.store import Dataset, write_shard
from amtrain.store.format import HEADER_BYTES
from amtrain.train import checkpoint
from amtrain.train.engine import check_master_port
from amtrain.train.loop import train
from amtrain.train.metrics import MetricsLog
from tests.train_helpers import LAUNCHER, REPO, argv, env, from_args, metrics, run, tiny

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


# ---------------------------------------------------------------- metrics after a kill; the run lock


def test_killed_between_checkpoints_then_resumed_has_one_row_per_step(kjv_gpt2, tmp_path):
    out = tmp_path / "run"
    args = tiny(kjv_gpt2, out, **{"train.max_steps": 12, "train.checkpoint_every": 4})
    first = _launch(args)
    try:  # SIGKILL once step 6 (or 10) is logged: two steps past a checkpoint, far from the next
        _wait_for(lambda: any(r["step"] > 4 and r["step"] % 4 == 2 for r in _rows(out)), first)
    finally:
        first.kill()
        first.communicate()
    at = max(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*")
             if (p / checkpoint.STATE_FILE).is_file())  # the newest complete checkpoint: resume starts there
    killed_rows = [r["step"] for r in _rows(out) if r["kind"] == "train"]
    assert max(killed_rows) > at  # the fault: rows past the checkpoint, which the resumed run logs again
    assert max(_tb_scalars(out, "train/loss")) > at  # TensorBoard holds some too (flushed with each row)

    resumed = train(from_args(args))  # the killed run's lock died with it

    assert sorted(resumed.losses) == list(range(at + 1, 13))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["loss"] == resumed.losses[r["step"]] for r in rows if r["step"] > at)
    assert [r["step"] for r in metrics(out, "val")] == [12]
    tb = _tb_scalars(out, "train/loss")
    assert sorted(tb) == list(range(1, 13))
    assert all(tb[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in rows)


def test_resumed_metrics_drop_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, 7)] + [{"kind": "val", "step": 4, "val_loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # killed mid-write
    log = MetricsLog(tmp_path, start_step=4)
    assert [(r["kind"], r["step"]) for r in _rows(tmp_path)] == [("train", s) for s in range(1, 5)] + [("val", 4)]
    log.write("val", 4, {"val_loss": 2.0})  # written again at the checkpoint's step: replaces the old one
    log.write("train", 5, {"loss": 5.5})
    log.close()
    assert [(r["kind"], r["step"]) for r in _rows(tmp_path)] == [("train", s) for s in range(1, 5)] + [("val", 4), ("train", 5)]
    assert [r["val_loss"] for r in _rows(tmp_path) if r["kind"] == "val"] == [2.0]


def test_a_second_run_into_the_same_out_dir_refuses_in_one_line(kjv_gpt2, tmp_path):
    out = tmp_path / "run"
    first = _launch(tiny(kjv_gpt2, out, **{"train.max_steps": 10_000}))
    try:
        _wait_for(lambda: len(_rows(out)) >= 1, first)
        info = (out / "run_info.json").read_text()
        second = subprocess.run([sys.executable, LAUNCHER, *argv(tiny(kjv_gpt2, out))], cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 1
        [line] = _error_lines(second.stderr)
        assert f"{out}: another training run is writing to this train.out_dir (pid {first.pid} " in line
        assert "choose another train.out_dir" in line and "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, alone
        assert (out / "run_info.json").read_text() == info
        steps = [r["step"] for r in _rows(out)]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        first.kill()
        first.communicate()


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


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimisation": {"stage": 2}}, "unknown DeepSpeed key 'zero_optimisation' (DeepSpeed would ignore it); "
                                          "did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage = 7 is not a ZeRO stage; use one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage = 'two' is not a ZeRO stage"),
    ({"steps_per_print": "x"}, "steps_per_print = 'x' is not an int"),
    ({"zero_optimization": {"stage": 2, "overlap_com": False}},
     "unknown key zero_optimization.overlap_com; did you mean 'overlap_comm'?"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device = 'gpu': Input should be 'none', 'cpu' or 'nvme'"),
    ({"gradient_clipping": "high"}, "gradient_clipping = 'high' is not a float"),
])
def test_deepspeed_config_mistakes_are_one_line(ds, message, kjv_gpt2, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(UserError) as e:
        train(from_args(tiny(kjv_gpt2, tmp_path / "run", ds_config=str(path))))
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_every_shipped_deepspeed_config_passes_the_check(repo_root):
    from amtrain.train.engine import load_ds_config

    for path in sorted((repo_root / "ds_configs").glob("*.json")):
        load_ds_config(path)


def test_a_misspelled_deepspeed_key_is_one_line_from_the_launcher(kjv_gpt2, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    p = subprocess.run([sys.executable, LAUNCHER, *argv(tiny(kjv_gpt2, tmp_path / "run", ds_config=str(path)))],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert _error_lines(p.stderr) == [f"error: {path}: unknown DeepSpeed key 'zero_optimisation' (DeepSpeed would "
                                      f"ignore it); did you mean 'zero_optimization'?"]


@pytest.mark.parametrize("text, kind", [("- model\n- train\n", "list"), ("7\n", "int")])
def test_a_yaml_that_is_not_a_mapping_is_one_line(text, kind, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{path}: a run config is a mapping of sections .*this YAML is a {kind}$"):
        parse_args(["--config", str(path), "--train.max_steps", "3"])


def _without_val(src: Path, dst: Path, empty: bool) -> None:
    """A copy of the dataset with no val split, or (empty) one whose only shard holds no tokens."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    manifest["shards"].remove(val)
    if empty:
        header = write_shard(dst / val["file"], np.zeros(0, np.uint16), manifest["vocab_size"])
        np.save(dst / val["file"].replace(".bin", ".idx.npy"), np.zeros(0, np.uint64))
        manifest["shards"].append({**val, "num_tokens": 0, "num_docs": 0, "crc32": header.crc32})
    (dst / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_a_missing_or_empty_val_split_is_said_at_start(empty, kjv_gpt2, tmp_path, capfd):
    _without_val(kjv_gpt2, tmp_path / "ds", empty)
    res = train(from_args(tiny(tmp_path / "ds", tmp_path / "run", **{"train.max_steps": 1})))
    why = f"{tmp_path / 'ds'}'s 'val' split holds no tokens" if empty else f"{tmp_path / 'ds'} has no 'val' split (it has: train)"
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning: no validation")]
    assert warnings == [f"warning: no validation: {why}; prep the data with a validation share, or set "
                        f"data.val_split '' to train without one"]
    assert res.val_loss is None and not metrics(tmp_path / "run", "val")
    train(from_args(tiny(tmp_path / "ds", tmp_path / "quiet", **{"train.max_steps": 1, "data.val_split": '""'})))
    assert "no validation" not in capfd.readouterr().err  # said only when validation was asked for


# ---------------------------------------------------------------- a taken master port


def _held_port() -> socket.socket:
    """A listening socket on a free port: another job holding the master port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_master_port_check_moves_one_rank_and_stops_several(monkeypatch):
    with _held_port() as s:
        port = str(s.getsockname()[1])
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_PORT", port)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(UserError, match=rf"^master port {port} \(MASTER_PORT\) is taken by another process.*--master_port N"):
            check_master_port()
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's agent holds it for us
        check_master_port()
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
        monkeypatch.setenv("WORLD_SIZE", "1")
        check_master_port()
        moved = int(os.environ["MASTER_PORT"])
        assert moved != int(port)
        with socket.socket() as free:
            free.bind(("", moved))  # the port it moved to is free


@pytest.mark.slow
def test_single_rank_run_trains_with_the_master_port_taken(kjv_gpt2, tmp_path):
    """The quickstart's launcher with its master port held by another job (29500 by default)."""
    with _held_port() as s:
        run(["deepspeed", "--num_accelerators", "1", "--master_port", str(s.getsockname()[1]), LAUNCHER,
             *argv(tiny(kjv_gpt2, tmp_path / "run", **{"train.max_steps": 2}))])
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_multi_rank_run_with_the_master_port_taken_fails_at_once_in_one_line(kjv_gpt2, tmp_path):
    with _held_port() as s:
        port = s.getsockname()[1]
        t0 = time.time()
        p = subprocess.run(["deepspeed", "--num_accelerators", "2", "--master_port", str(port), LAUNCHER,
                            *argv(tiny(kjv_gpt2, tmp_path / "run", **{"train.dist_timeout_s": 300}))],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
        seconds = time.time() - t0
    assert p.returncode != 0 and seconds < 120  # not the 300 s rendezvous timeout
    assert _error_lines(p.stderr) == [f"error: master port {port} (MASTER_PORT) is taken by another process, maybe "
                                      f"another training run; pass a free one: deepspeed --master_port N ... "
                                      f"(torchrun --master_port N ...)"]
    assert "Traceback" not in p.stderr + p.stdout and "EADDRINUSE" not in p.stderr + p.stdout
