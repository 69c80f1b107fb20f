"""Run config: YAML/CLI round trips, validation naming the key, the batch arithmetic, the
DeepSpeed-config contradictions, the LR schedule, and every checked-in config file."""

from __future__ import annotations

import math

import pytest

from amtrain.config import (
    BatchConfig,
    OptimConfig,
    RunConfig,
    apply_batch_plan,
    batch_plan,
    from_dict,
    load_yaml,
    parse_args,
    to_yaml,
)
from amtrain.errors import UserError
from amtrain.train.engine import load_ds_config, resolve_ds_config


def test_yaml_states_only_differences_and_round_trips():
    cfg = parse_args(["--model.size", "small", "--train.max_steps", "200", "--data", "/x/y",
                      "--optim.betas", "[0.8,0.9]", "--optim.lr", "3e-4", "--model.overrides", "{block: serial}", "--local_rank=1"])
    assert cfg.model.size == "small" and cfg.train.max_steps == 200 and cfg.data.path == "/x/y"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 3e-4 and cfg.model.overrides == {"block": "serial"}
    diff = cfg.diff_from_defaults()
    assert diff == {"model": {"size": "small", "overrides": {"block": "serial"}}, "data": {"path": "/x/y"},
                    "optim": {"betas": [0.8, 0.9], "lr": 3e-4}, "train": {"max_steps": 200}}
    assert from_dict(diff) == cfg
    import yaml

    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg  # the full resolved YAML loads back too
    assert RunConfig().diff_from_defaults() == {}


def test_yaml_file_then_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {size: tiny}\ntrain: {max_steps: 7, seed: 3}\noptim: {min_lr: 1e-5}\n")
    cfg = parse_args(["--config", str(path), "--train.max_steps", "9", "--ds_config", "ds_configs/zero1.json"])
    assert (cfg.model.size, cfg.train.max_steps, cfg.train.seed, cfg.optim.min_lr) == ("tiny", 9, 3, 1e-5)
    assert cfg.ds_config == "ds_configs/zero1.json"


@pytest.mark.parametrize("args, key", [
    (["--train.max_stepz", "3"], "train.max_stepz"),
    (["--train.max_steps", "abc"], "train.max_steps"),
    (["--train.max_steps", "0"], "train.max_steps"),
    (["--optim.min_lr", "1.0"], "optim.min_lr"),
    (["--optim.optimizer", "sgd"], "optim.optimizer"),
    (["--data.seq_len", "1"], "data.seq_len"),
    (["--train.precision", "fp8"], "train.precision"),
    (["--batch.micro_batch", "0"], "batch.micro_batch"),
])
def test_bad_values_name_the_key(args, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        parse_args(args)


def test_missing_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run config not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_tokens_fix_the_global_batch_at_any_world_size(world):
    plan = batch_plan(BatchConfig(micro_batch=2, global_tokens=8 * 64), seq_len=64, world_size=world)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.global_batch == 8
    assert plan.tokens_per_step == 8 * 64
    ds = apply_batch_plan({"zero_optimization": {"stage": 2}}, plan)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 // world


def test_batch_arithmetic_errors():
    with pytest.raises(UserError, match="batch.global_tokens"):
        batch_plan(BatchConfig(micro_batch=3, global_tokens=1000), 64, 2)
    with pytest.raises(UserError, match=r"batch\.grad_accum = 3 contradicts batch\.global_tokens"):
        batch_plan(BatchConfig(micro_batch=2, grad_accum=3, global_tokens=512), 64, 2)
    assert batch_plan(BatchConfig(micro_batch=2, grad_accum=3), 64, 2).global_batch == 12


def test_ds_config_contradicting_run_config_names_both_keys():
    cfg = RunConfig()
    plan = batch_plan(cfg.batch, cfg.data.seq_len, 1)
    with pytest.raises(UserError, match=r"z\.json train_micro_batch_size_per_gpu = 3 contradicts .*batch\.micro_batch = 8"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 3}, cfg, plan, "fp32", "z.json")
    with pytest.raises(UserError, match=r"z\.json train_batch_size = 64 contradicts"):
        resolve_ds_config({"train_batch_size": 64}, cfg, plan, "fp32", "z.json")
    clipped = from_dict({"optim": {"grad_clip": 0.5}})
    with pytest.raises(UserError, match=r"z\.json gradient_clipping = 1\.0 contradicts .*optim\.grad_clip = 0\.5"):
        resolve_ds_config({"gradient_clipping": 1.0}, clipped, plan, "fp32", "z.json")
    with pytest.raises(UserError, match=r"z\.json bf16\.enabled = true contradicts .*train\.precision"):
        resolve_ds_config({"bf16": {"enabled": True}}, cfg, plan, "fp32", "z.json")
    ok = resolve_ds_config({"train_batch_size": 8, "gradient_clipping": 0.5}, clipped, plan, "bf16", "z.json")
    assert ok["gradient_clipping"] == 0.5 and ok["bf16"] == {"enabled": True} and ok["train_batch_size"] == 8


def test_lr_schedule_warmup_then_cosine_to_min():
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [o.lr_at(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert o.lr_at(100, 100) == pytest.approx(1e-4)
    assert o.lr_at(55, 100) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)


def test_seq_len_warmup_grows_to_seq_len():
    d = from_dict({"data": {"seq_len": 128, "seq_len_warmup_steps": 10, "seq_len_warmup_start": 32}}).data
    lens = [d.seq_len_at(s) for s in range(12)]
    assert lens[0] == 32 and lens[-1] == 128 and lens == sorted(lens)


def test_every_checked_in_config_loads_and_resolves(repo_root):
    ds_files = sorted((repo_root / "ds_configs").glob("*.json"))
    assert {p.stem for p in ds_files} >= {"zero0", "zero1", "zero2", "zero3", "zero2_offload"}
    stages = {}
    for path in ds_files:
        cfg = from_dict({"ds_config": str(path)})
        ds = resolve_ds_config(load_ds_config(path), cfg, batch_plan(cfg.batch, 64, 2), "fp32", path.name)
        stages[path.stem] = ds.get("zero_optimization", {}).get("stage", 0)
        assert ds["train_batch_size"] == 16
    assert stages["zero0"] == 0 and stages["zero1"] == 1 and stages["zero2"] == 2 and stages["zero3"] == 3
    yamls = sorted((repo_root / "ds_configs").glob("*.yaml"))
    assert any(p.name == "default.yaml" for p in yamls)
    for path in yamls:
        cfg = from_dict(load_yaml(path), where=str(path))
        assert cfg.resolved_ds_config().is_file() or not cfg.ds_config


def test_launcher_help_and_one_line_errors(repo_root):
    import subprocess
    import sys

    from amtrain.config import help_text

    assert "--train.max_steps" in help_text() and "--ds_config" in help_text()
    launcher = str(repo_root / "launchers" / "train.py")
    p = subprocess.run([sys.executable, launcher, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--batch.global_tokens" in p.stdout
    p = subprocess.run([sys.executable, launcher, "--train.max_steps", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == "error: config train.max_steps: must be >= 1"


def test_unknown_keys_suggest_the_dotted_key():
    with pytest.raises(UserError, match=r"unknown key max_steps; did you mean --train.max_steps\?"):
        parse_args(["--max_steps", "3"])
    with pytest.raises(UserError, match=r"unknown key train.max_step; did you mean --train.max_steps\?"):
        parse_args(["--train.max_step", "3"])


def test_a_bad_value_is_blamed_where_it_was_written(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train: {max_steps: 5}\n")
    with pytest.raises(UserError, match=r"^command line: train.max_steps = 'x' is not an int$"):
        parse_args(["--config", str(good), "--train.max_steps", "x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: x}\n")
    with pytest.raises(UserError, match=rf"^{bad}: train.max_steps = 'x' is not an int$"):
        parse_args(["--config", str(bad), "--train.seed", "3"])


def test_help_lists_every_key_with_its_doc():
    from amtrain.config import all_keys, help_text

    text = help_text()
    for key in all_keys():
        assert f"--{key} " in text, key
    assert "Optimizer steps to train for (the cosine schedule ends here)." in text
    assert "e.g. {block: serial, dropout: 0.1}." in text  # "e.g." does not end the first sentence


def test_midi_recipes_read_the_folder_the_docs_prep_to(repo_root):
    """docs/midi.md preps the bundled MIDI into runs/data/midi; every MIDI recipe reads it."""
    import yaml

    assert "amtrain prep-midi data/midi --out runs/data/midi" in (repo_root / "docs" / "midi.md").read_text()
    for name in ("amt_gpt2.yaml", "t5_midi.yaml", "nanogpt_v3.yaml"):
        d = yaml.safe_load((repo_root / "ds_configs" / name).read_text())
        assert d["data"]["path"] == "runs/data/midi", name
