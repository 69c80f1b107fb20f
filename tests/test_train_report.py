"""What a run tells its user, and what it leaves behind for them (CPU, gloo, debug models):

* the command printed after a run works for the run's modality (a MIDI run's is run here; an
  audio run's names the codec and is run too); `amtrain sample` refuses a MIDI run in one line;
* audio rollouts during training are WAV when `train.codec_path` names the data's codec;
* parameters and FLOPs come from the model's shapes: a 2-rank ZeRO-3 run reports the
  one-process count, and MFU is below 100% for every model family (T5: padded target slots
  are no work);
* CPU runs neither build nor load DeepSpeed's shared-memory comm op;
* the banner names the dataset (empty data.path: the bundled KJV corpus); resuming with another
  train.max_steps says the LR schedule changed;
* lines are not wrapped into a pipe; Ctrl-C is one line and exit 130; exports are mode 0644
  under umask 022.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import sys

import pytest

from amtrain.errors import UserError
from amtrain.train.loop import train
from tests.train_helpers import LAUNCHER, REPO, argv, env, free_port, from_args, metrics, run, tiny

pytestmark = [pytest.mark.slow]


def _captured_train(args: dict):
    """train() in this process; -> (RunResult, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = train(from_args(args))
    return res, out.getvalue()


def _sample_command(printed: str) -> list[str]:
    line = next(ln for ln in printed.splitlines() if ln.startswith("sample from it: "))
    return shlex.split(line.removeprefix("sample from it: "))


# ---------------------------------------------------------------- the command after a run


def test_midi_run_prints_a_rollout_command_that_runs(tmp_path):
    from amtrain.prep.midi import prep_midi

    data = tmp_path / "midi"
    prep_midi([str(REPO / "data" / "midi")], data, show_progress=False)
    run_dir = tmp_path / "run"
    _, printed = _captured_train(tiny(data, run_dir, **{"data.seq_len": 96, "batch.global_tokens": 768,
                                                         "train.max_steps": 2}))
    cmd = _sample_command(printed)
    assert cmd[:4] == ["python", "-m", "amtrain", "rollout"] and str(run_dir) in cmd
    p = run([sys.executable, *cmd[1:], "--length", "30"])
    assert (run_dir / "samples" / "sample_0.mid").is_file() and "sample_0: " in p.stdout
    # `amtrain sample` is for text: one line, exit 1
    s = subprocess.run([sys.executable, "-m", "amtrain", "sample", str(run_dir), "--prompt", "In the beginning"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert s.returncode == 1 and "Traceback" not in s.stderr
    assert s.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir}: a midi model; `amtrain sample` continues text")


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    """(debug codec folder, a prep-audio dataset made with it)."""
    from amtrain.prep.audio import AudioPrepConfig, prep_audio
    from tests.rollout_helpers import codec_folder

    codec = codec_folder(tmp_path_factory.mktemp("codec"))
    data = tmp_path_factory.mktemp("audio")
    prep_audio([str(REPO / "data" / "audio")], data, AudioPrepConfig(codec_path=str(codec), bandwidth=1.5,
                                                                    chunk_seconds=2.0), show_progress=False)
    return codec, data


def test_audio_rollouts_are_wav_with_the_codec_and_the_command_runs(audio_data, tmp_path):
    import soundfile as sf

    codec, data = audio_data
    prompt = sorted((data / "codes").glob("*.npz"))[0]
    run_dir = tmp_path / "run"
    args = tiny(data, run_dir, **{"data.seq_len": 96, "batch.global_tokens": 768, "train.max_steps": 2,
                                  "data.val_split": "train", "train.rollout_every": 2,
                                  "train.rollout_prompts": [str(prompt)], "train.rollout_length": 16,
                                  "train.codec_path": str(codec)})
    _, printed = _captured_train(args)
    files = metrics(run_dir, "rollout")[0]["files"]
    wav = run_dir / "rollouts" / "step_2" / "prompt_0.wav"
    assert str(wav) in files and sf.info(str(wav)).samplerate == 24000 and sf.info(str(wav)).frames > 0
    cmd = _sample_command(printed)
    assert cmd[:4] == ["python", "-m", "amtrain", "rollout"]
    assert cmd[cmd.index("--codec-path") + 1] == str(codec) and cmd[cmd.index("--prompt-from-priority") + 1] == str(data)
    run([sys.executable, *cmd[1:], "--length", "16"])
    assert (run_dir / "samples" / "sample_0.wav").is_file()


def test_a_codec_that_is_not_the_datas_is_refused(audio_data, tmp_path):
    from amtrain.store import Dataset
    from amtrain.train.builders import build_codec
    from tests.audio_helpers import random_model, save_codec

    _, data = audio_data
    other = save_codec(random_model("24khz", "debug", seed=1, init_seconds=2.0), tmp_path / "other")
    with pytest.raises(UserError, match=r"train\.codec_path .* but .* was prepped with encodec_24khz@"):
        build_codec(from_args(tiny(data, tmp_path, **{"train.codec_path": str(other)})), Dataset(data))
    with pytest.raises(UserError, match=r"^train\.codec_path: no EnCodec 24khz weights"):
        build_codec(from_args(tiny(data, tmp_path, **{"train.codec_path": str(tmp_path / "none")})), Dataset(data))


# ---------------------------------------------------------------- parameters and FLOPs


def test_zero3_two_ranks_count_the_one_process_params_and_mfu(kjv_gpt2, tmp_path):
    from amtrain.store import Dataset
    from amtrain.train.builders import build_model

    out = tmp_path / "z3"
    args = tiny(kjv_gpt2, out, ds_config=str(REPO / "ds_configs" / "zero3.json"), **{"train.max_steps": 3})
    port = free_port()
    p = run(["deepspeed", "--num_accelerators", "2", "--master_port", str(port), LAUNCHER, *argv(args)])
    # DeepSpeed's CPU shm comm op (not loaded: amtrain.train.engine.cpu_comm_op) would leave a
    # /dev/shm buffer of ~66 MB per rank behind after every multi-rank run
    assert not list(pathlib.Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    model = build_model(from_args(args), Dataset(kjv_gpt2))  # one process, nothing partitioned
    assert model.num_params() == 3_317_952
    assert f"debug decoder, {model.num_params():,} params;" in p.stdout
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_params"] == model.num_params()
    for r in metrics(out):  # per device: tokens/s / 2 ranks x 6N + 12LDT / peak
        assert 0 < r["mfu"] < 1
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] / 2 * model.flops_per_token(64) / info["peak_flops"], rel=1e-6)


@pytest.mark.parametrize("arch", ["decoder", "lstm", "t5"])
def test_mfu_is_below_one_on_every_family(arch, kjv_gpt2, tmp_path):
    res = train(from_args(tiny(kjv_gpt2, tmp_path, **{"model.arch": arch, "denoise.inputs_length": 32,
                                                      "train.max_steps": 4})))
    rows = metrics(res.run_dir)
    assert len(rows) == 4 and all(0 < r["mfu"] < 1 for r in rows), [r["mfu"] for r in rows]


def test_t5_counts_real_inputs_and_labelled_targets(kjv_gpt2, tmp_path):
    """T5's FLOPs per token slot: each example's real inputs and labelled targets, not the
    padded lengths the batch plan counts."""
    import numpy as np
    import torch

    from amtrain.registry import family
    from amtrain.store import Dataset
    from amtrain.tokens import IGNORE_INDEX
    from amtrain.train.builders import build_model, build_shape

    cfg = from_args(tiny(kjv_gpt2, tmp_path, **{"model.arch": "t5", "denoise.inputs_length": 32}))
    dataset = Dataset(kjv_gpt2)
    objective = family("t5").objective_cls().build(cfg, dataset, 0, 1)
    shape = build_shape(build_model(cfg, dataset))
    micro = objective.micro_batches(0)

    def engine(input_ids, attention_mask, labels, **kw):
        return None, torch.zeros(labels.shape, requires_grad=True)

    for m in micro:
        objective.loss(engine, m, torch.device("cpu"))
    S = np.concatenate([m.attention_mask.sum(1) for m in micro])
    T = np.concatenate([(m.labels != IGNORE_INDEX).sum(1) for m in micro])
    slots = objective.plan.seq_len
    expected = sum(shape.flops_per_example(int(s), int(t)) for s, t in zip(S, T, strict=True)) / (len(S) * slots)
    got = objective.flops_per_token(shape, slots)
    assert got == pytest.approx(expected, rel=1e-12)
    assert T.max() < objective.targets_length and got < shape.flops_per_token(objective.inputs_length,
                                                                               objective.targets_length)


def test_cpu_runs_neither_build_nor_load_the_shm_comm_op(tmp_path, monkeypatch, capsys):
    """No JIT build (minutes on a fresh machine) and no build lock a killed rank could leave behind
    for every later run to wait on: on CPU, at any world size, DeepSpeed's TorchBackend gets no
    shm op (it then all-reduces through the process group); on CUDA nothing is touched."""
    import importlib

    from amtrain.train.engine import cpu_comm_op

    ds_comm = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    real = ds_comm.build_shm_op
    capsys.readouterr()  # DeepSpeed's import-time accelerator note
    with cpu_comm_op(False):
        assert ds_comm.build_shm_op() is None  # what DeepSpeed's TorchBackend would build
    assert ds_comm.build_shm_op is real and not capsys.readouterr().out
    with cpu_comm_op(True):
        assert ds_comm.build_shm_op is real
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- banner, resume, exports


@pytest.fixture(scope="module")
def bundled_run(kjv_gpt2, tmp_path_factory):
    """4 steps with data.path empty, the bundled corpus's folder pointed at the session's
    prepped KJV (so nothing is prepped into the checkout); -> (RunResult, what it printed)."""
    out = tmp_path_factory.mktemp("bundled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("amtrain.config.DEFAULT_DATA", kjv_gpt2)
        mp.setattr("amtrain.train.builders.DEFAULT_DATA", kjv_gpt2)
        return _captured_train(tiny(kjv_gpt2, out, **{"data.path": '""', "train.max_steps": 4}))


def test_banner_names_the_dataset_and_the_bundled_corpus(bundled_run):
    _, printed = bundled_run
    banner = next(ln for ln in printed.splitlines() if ln.startswith("amtrain: "))
    assert "data the bundled KJV corpus (data.path is empty) in " in banner and "(gpt2)" in banner
    assert "note: train.max_steps" not in printed


def test_resume_with_another_max_steps_says_so(bundled_run, kjv_gpt2, tmp_path):
    res, _ = bundled_run
    ckpt = res.run_dir / "checkpoints" / "step_00000004"
    _, printed = _captured_train(tiny(kjv_gpt2, tmp_path / "a", **{"train.resume": str(ckpt), "train.max_steps": 6}))
    cfg = from_args(tiny(kjv_gpt2, tmp_path))
    assert (f"note: train.max_steps is 6, the checkpoint's run had 4: the LR schedule now ends at step 6, so the LR at "
            f"step 5 is {cfg.optim.lr_at(4, 6):.2e} instead of {cfg.optim.lr_at(4, 4):.2e}") in printed
    _, same = _captured_train(tiny(kjv_gpt2, tmp_path / "b", **{"train.resume": str(ckpt), "train.max_steps": 4}))
    assert "note: train.max_steps" not in same


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exports_are_readable_as_the_umask_allows(bundled_run, tmp_path, mask, mode):
    from typer.testing import CliRunner

    from amtrain.cli import app

    old = os.umask(mask)
    try:
        r = CliRunner().invoke(app, ["export", str(bundled_run[0].run_dir), str(tmp_path / "exp")])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "config.json"):  # safetensors itself writes 0600
        assert stat.S_IMODE((tmp_path / "exp" / name).stat().st_mode) == mode, name


# ---------------------------------------------------------------- console


def test_lines_are_whole_in_a_pipe_and_ctrl_c_is_one_line(kjv_gpt2, tmp_path):
    """The launcher with its default progress bar into a pipe: the banner (> 80 columns) is one
    line; the first step's line arrives; Ctrl-C then ends the run with one line and exit 130.
    One rank: DeepSpeed's CPU comm op is not built (an empty extensions folder stays empty)."""
    args = tiny(kjv_gpt2, tmp_path / "run", **{"train.max_steps": 1000, "train.progress": True})
    ext = tmp_path / "ext"
    p = subprocess.Popen([sys.executable, LAUNCHER, *argv(args)], cwd=REPO, env=env(TORCH_EXTENSIONS_DIR=str(ext)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("step "):
                break
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        p.kill()
    banner = next(ln for ln in lines if ln.startswith("amtrain: "))
    assert len(banner) > 80 and banner.endswith("starting fresh"), lines
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == [
        "interrupted; the same command resumes from the latest checkpoint, if any (train.resume auto)"]
    assert not ext.exists() or not any(ext.iterdir())


def test_large_metrics_print_in_e_notation():
    from amtrain.train.trainer import format_value

    assert format_value(29572289882.0293) == "2.957e+10"
    assert format_value(5.04281) == "5.0428" and format_value(-0.5) == "-0.5000"
