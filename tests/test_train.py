"""Training in this process (one rank, gloo, fp32, the debug decoder on the bundled corpus):
exact resume, what a run records, retention, interrupted checkpoints, export/sample, NaN steps,
bad configuration."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from amtrain.errors import UserError
from amtrain.train import checkpoint
from amtrain.train.loop import train
from tests.train_helpers import from_args, metrics, tiny


@pytest.fixture(scope="module")
def full_run(kjv_gpt2, tmp_path_factory):
    """8 steps uninterrupted, checkpoints every 2 steps, all kept."""
    out = tmp_path_factory.mktemp("full")
    res = train(from_args(tiny(kjv_gpt2, out, **{"train.checkpoint_every": 2, "train.eval_every": 4})))
    return res


def test_resume_equals_uninterrupted(full_run, kjv_gpt2, tmp_path):
    step4 = full_run.run_dir / "checkpoints" / "step_00000004"
    resumed = train(from_args(tiny(kjv_gpt2, tmp_path, **{"train.resume": str(step4)})))
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed.losses[step] == pytest.approx(full_run.losses[step], rel=1e-6, abs=0), step
    assert resumed.state.tokens_seen == full_run.state.tokens_seen == 8 * 512
    assert resumed.state.loader == full_run.state.loader
    # the run's clock continues from the checkpoint: step 5's elapsed time includes steps 1-4
    at4 = next(r["elapsed_s"] for r in metrics(full_run.run_dir) if r["step"] == 4)
    after = metrics(tmp_path)
    assert after[0]["step"] == 5 and after[0]["elapsed_s"] > at4 > 0
    assert resumed.state.elapsed_s == after[-1]["elapsed_s"]
    a = checkpoint.consolidated_state_dict(full_run.checkpoint)
    b = checkpoint.consolidated_state_dict(resumed.checkpoint)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_loss_falls_and_run_records_itself(full_run):
    run = full_run.run_dir
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # 10.8 -> ~8 on real text
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "tokens_seen"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert 0 < rows[-1]["mfu"] < 1
    val = metrics(run, "val")
    assert [r["step"] for r in val] == [4, 8]
    assert val[-1]["val_bpt"] == pytest.approx(val[-1]["val_loss"] / math.log(2))
    ds = json.loads((run / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 2)
    info = json.loads((run / "run_info.json").read_text())
    assert len(info["git_revision"]) >= 40 and info["packages"]["deepspeed"] == "0.19.8" and info["peak_flops"] > 0
    assert "size: debug" in (run / "config.yaml").read_text()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # retention keep_last 0 = all; the lr schedule is the configured one
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    cfg = from_args(tiny(run, run))
    assert rows[0]["lr"] == pytest.approx(cfg.optim.lr_at(1, 8))  # logged after the update of step 1


def test_retention_and_interrupted_checkpoint_is_never_latest(kjv_gpt2, tmp_path, monkeypatch):
    res = train(from_args(tiny(kjv_gpt2, tmp_path, **{"train.max_steps": 6, "train.checkpoint_every": 2,
                                                        "train.keep_last": 2})))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert checkpoint.latest_checkpoint(ckpts) == ckpts / "step_00000006" == res.checkpoint

    real_write = checkpoint.write_json_atomic

    def crash_on_state(path, obj):  # the process dies after DeepSpeed wrote its shards
        if path.name == checkpoint.STATE_FILE:
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(checkpoint, "write_json_atomic", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        train(from_args(tiny(kjv_gpt2, tmp_path, **{"train.max_steps": 8, "train.checkpoint_every": 2})))
    monkeypatch.undo()
    assert (ckpts / ".tmp-step_00000008").is_dir()  # half-written, under its temporary name
    assert checkpoint.latest_checkpoint(ckpts) == ckpts / "step_00000006"
    again = train(from_args(tiny(kjv_gpt2, tmp_path, **{"train.max_steps": 8})))
    assert sorted(again.losses) == [7, 8] and again.checkpoint == ckpts / "step_00000008"
    assert not list(ckpts.glob(".tmp-*"))


def test_export_loads_without_deepspeed_and_sample(full_run, tmp_path):
    from amtrain.cli import app
    from amtrain.models.io import load_pretrained

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(full_run.run_dir), str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    model, meta = load_pretrained(tmp_path / "exp")
    assert meta["tokenizer"] == "gpt2" and meta["step"] == 8
    state = checkpoint.consolidated_state_dict(full_run.checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    from amtrain.data.loader import val_batches
    from amtrain.store import Dataset

    batches = val_batches(Dataset(meta["data"]), "val", 64, 4, 2, 0, 1)  # the run's validation set
    with torch.no_grad():
        exported = sum(float(model(x, y)[1]) for x, y in batches) / len(batches)
    assert exported == pytest.approx(metrics(full_run.run_dir, "val")[-1]["val_loss"], rel=1e-5)
    outs = []
    for src in (tmp_path / "exp", full_run.run_dir):
        r = runner.invoke(app, ["sample", str(src), "--prompt", "In the beginning", "-n", "12", "--seed", "3",
                                "--top-k", "40", "--top-p", "0.95", "--temperature", "0.9"])
        assert r.exit_code == 0, r.output
        outs.append(r.output.strip())
    # the same text from the export and from the run folder (whose output also has DeepSpeed's notes)
    assert outs[0].startswith("In the beginning") and len(outs[0]) > 30 and outs[1].endswith(outs[0])


class _NaNAt:
    """Wrap a model: the loss is NaN on the given (0-based) forward calls."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def __call__(self, model):
        orig = model.forward

        def forward(idx, targets=None, cache=None):
            logits, loss = orig(idx, targets, cache)
            if targets is not None and model.training:
                if self.calls in self.bad_calls:
                    loss = loss * float("nan")
                self.calls += 1
            return logits, loss

        model.forward = forward
        return model


def test_nan_steps_are_skipped_and_counted_then_stop(kjv_gpt2, tmp_path, monkeypatch):
    from amtrain.train import trainer

    real_build = trainer.build_model
    nan = _NaNAt({4, 5})  # step 3 (micro-steps 4, 5 with accumulation 2)
    monkeypatch.setattr(trainer, "build_model", lambda cfg, ds: nan(real_build(cfg, ds)))
    snapshots = {}
    real_step = trainer.Trainer.train_step

    def spy(self):
        out = real_step(self)
        snapshots[len(snapshots) + 1] = self.engine.module.embed.weight.detach().clone()
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", spy)
    res = train(from_args(tiny(kjv_gpt2, tmp_path / "a", **{"train.max_steps": 5})))
    assert math.isnan(res.losses[3]) and all(math.isfinite(res.losses[s]) for s in (1, 2, 4, 5))
    assert torch.equal(snapshots[2], snapshots[3]) and not torch.equal(snapshots[3], snapshots[4])
    assert res.state.num_bad_steps == 1 and metrics(tmp_path / "a")[-1]["bad_steps"] == 1

    monkeypatch.setattr(trainer, "build_model", lambda cfg, ds: _NaNAt(range(4, 100))(real_build(cfg, ds)))
    with pytest.raises(UserError, match="3 steps in a row had a NaN/inf loss"):
        train(from_args(tiny(kjv_gpt2, tmp_path / "b", **{"train.max_steps": 8, "train.max_bad_steps": 3})))


def test_bad_configuration_is_one_clear_error(kjv_gpt2, tmp_path):
    zero2 = tmp_path / "z.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(UserError, match=r"z\.json train_micro_batch_size_per_gpu = 16 contradicts the run config's batch\.micro_batch = 4"):
        train(from_args(tiny(kjv_gpt2, tmp_path / "a", ds_config=str(zero2))))
    with pytest.raises(UserError, match=r"exceeds the model's \(model\.vocab_size = 512\)"):
        train(from_args(tiny(kjv_gpt2, tmp_path / "b", **{"model.vocab_size": 512})))
    with pytest.raises(UserError, match="no such folder"):
        train(from_args(tiny(tmp_path / "missing", tmp_path / "c")))


@pytest.mark.parametrize("ds_name", ["zero0", "zero1", "zero3", "zero2_offload"])
def test_each_ds_config_trains_and_exports(ds_name, kjv_gpt2, tmp_path, repo_root):
    """zero2 is covered above; the other checked-in engine configs: 2 steps, export, reload."""
    from amtrain.models.io import load_pretrained
    from amtrain.train.export import export_checkpoint

    res = train(from_args(tiny(kjv_gpt2, tmp_path / "run", ds_config=str(repo_root / "ds_configs" / f"{ds_name}.json"),
                               **{"train.max_steps": 2})))
    assert all(math.isfinite(v) for v in res.losses.values())
    model, meta = load_pretrained(export_checkpoint(res.run_dir, tmp_path / "exp"))
    assert meta["step"] == 2 and model.num_params() == 3_317_952
    assert json.loads((res.run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == int(ds_name[4])


def test_resume_with_another_model_is_refused(full_run, kjv_gpt2, tmp_path):
    step4 = full_run.run_dir / "checkpoints" / "step_00000004"
    with pytest.raises(UserError, match=r"the checkpoint's model differs from this run config's \(.*d_model 64 -> 128"):
        train(from_args(tiny(kjv_gpt2, tmp_path, **{"train.resume": str(step4), "model.size": "tiny"})))


def test_adamw8bit_needs_bitsandbytes():
    import importlib.util

    from amtrain.config import OptimConfig
    from amtrain.train.engine import build_optimizer

    model = torch.nn.Linear(4, 4)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match=r"pip install 'amtrain\[bnb\]'"):
            build_optimizer(model, OptimConfig(optimizer="adamw8bit"))
    else:
        assert "AdamW8bit" in type(build_optimizer(model, OptimConfig(optimizer="adamw8bit"))).__name__
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]  # matrix decays, bias does not


def test_time_based_checkpoints_and_seq_len_warmup(kjv_gpt2, tmp_path):
    over = {"train.max_steps": 4, "train.checkpoint_minutes": 1e-6, "data.seq_len_warmup_steps": 3,
            "data.seq_len_warmup_start": 16}
    res = train(from_args(tiny(kjv_gpt2, tmp_path, **over)))
    rows = metrics(tmp_path)
    assert [r["seq_len"] for r in rows] == [16, 32, 48, 64]
    assert res.state.tokens_seen == rows[-1]["tokens_seen"] == 8 * (16 + 32 + 48 + 64)
    # a time-based checkpoint follows the first step that STARTED >= checkpoint_minutes after the
    # last one (decided at its start, agreed in its all-reduce): the 60 us deadline has not passed
    # when step 1 starts, nor right after a save, and has when steps 2 and 4 start (4 is also final)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (2, 4)]



# The quickstart's first logged losses, recorded on this machine (one thread, fp32) at the commit
# before the trainer was split into Trainer / objectives, with plain windows (data.fim_rate 0; the
# default then): a change to a batch, the initial weights, the optimizer or the schedule moves them
# by far more than the tolerance.
QUICKSTART_LOSSES = {10: 10.249161720275879, 20: 8.420877456665039}
# The same run with the default data.fim_rate 0.5, re-recorded when fill-in-the-middle became the
# default, with the measurement that justifies it (docs/training.md "Fill-in-the-middle",
# docs/benchmarks.md, fill-in-the-middle).
QUICKSTART_FIM_LOSSES = {10: 10.250239372253418, 20: 8.401307106018066}


@pytest.mark.parametrize("extra, pinned", [([], QUICKSTART_FIM_LOSSES), (["--data.fim_rate", "0"], QUICKSTART_LOSSES)],
                         ids=["default", "fim_rate_0"])
def test_default_config_pins_the_first_losses(kjv_gpt2, tmp_path, extra, pinned):
    """The default run config (debug decoder, 8 windows of 128 tokens per step) on the bundled
    corpus prepped with gpt2, as the quickstart runs it, for 20 steps: the logged losses; with
    data.fim_rate 0 the losses of the plain-window loader are unchanged."""
    from amtrain.config import parse_args

    res = train(parse_args(["--data", str(kjv_gpt2), "--train.out_dir", str(tmp_path), "--train.max_steps", "20",
                            "--train.progress", "false", *extra]))
    logged = {r["step"]: r["loss"] for r in metrics(tmp_path)}
    assert sorted(logged) == [10, 20]
    for step, loss in pinned.items():
        assert logged[step] == res.losses[step] == pytest.approx(loss, rel=1e-5, abs=0), step


def test_every_family_objective_implements_the_protocol(kjv_gpt2, tmp_path):
    """Each registered family's objective, built as the trainer builds it, is an `Objective`;
    its batch plan is at its example length and its first micro-batches are the plan's."""
    from amtrain.registry import family, family_names
    from amtrain.store import Dataset
    from amtrain.train.objective import Objective

    dataset = Dataset(kjv_gpt2)
    for name in family_names():
        cfg = from_args(tiny(kjv_gpt2, tmp_path, **{"model.arch": name, "denoise.inputs_length": 32}))
        objective = family(name).objective_cls().build(cfg, dataset, 0, 1)
        assert isinstance(objective, Objective), name
        assert objective.plan.seq_len == objective.seq_len_at(0) and objective.plan.tokens_per_step == 512, name
        assert len(objective.micro_batches(0)) == objective.plan.grad_accum, name
