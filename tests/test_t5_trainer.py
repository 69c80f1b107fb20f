"""T5 under the amtrain trainer (CPU, fp32, gloo, the debug T5, a few steps):

* `deepspeed --num_accelerators 2 launchers/train.py` ZeRO-2 on the bundled text: the loss
  falls; the curriculum logs one decision per step and moves; validation writes the loss per
  task (R/X/S) and the exact match of reconstructed spans; the rollout hook fires every N steps.
* ZeRO-3, 2 ranks: exact-match decodes and rank 0's rollouts run without hanging.
* one process: a run resumed from its step-4 checkpoint makes the same curriculum decisions and
  has the same losses as the uninterrupted run; the checkpoint holds the curriculum's state;
  `amtrain export` / `sample` / `rollout` work on the T5 run dir.
* one process on the bundled MIDI (prep-midi): the loss falls; spans cover whole events.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from amtrain.train.loop import train
from tests.train_helpers import LAUNCHER, REPO, argv, free_port, from_args, losses, metrics, run

pytestmark = [pytest.mark.slow]

STEPS = 8
CURRICULUM = {"mode": "adaptive", "window": 2, "plateau_tol": 1.0, "climb_tol": 10.0, "level_step": 0.25}


def t5_args(data, out, **over) -> dict[str, object]:
    """Dotted keys of a few-step debug T5 run: 8 examples of 64 input tokens per step."""
    args = {"data.path": str(data), "train.out_dir": str(out), "model.arch": "t5", "model.size": "debug",
            "denoise.inputs_length": 64, "denoise.curriculum": CURRICULUM,
            "batch.micro_batch": 4, "batch.grad_accum": 1, "optim.lr": 3e-3, "optim.warmup_steps": 2,
            "optim.min_lr": 3e-4, "train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": 4,
            "train.eval_batches": 1, "train.checkpoint_every": 4, "train.keep_last": 0, "train.progress": False,
            "train.dist_timeout_s": 60, "ds_config": str(REPO / "ds_configs" / "zero2.json")}
    args.update(over)
    return args


@pytest.fixture(scope="module")
def two_ranks(kjv_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5x2")
    args = t5_args(kjv_gpt2, out, **{"train.rollout_every": 4,
                                     "train.rollout_prompts": ["In the beginning", "And God said"],
                                     "train.rollout_length": 8})
    run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), LAUNCHER, *argv(args)])
    return out


def test_two_ranks_zero2_loss_falls_curriculum_val_and_rollouts(two_ranks):
    run_losses = losses(two_ranks)
    assert sorted(run_losses) == list(range(1, STEPS + 1))
    assert run_losses[STEPS] < run_losses[1] - 0.8, run_losses  # ~11.2 -> ~9.5 in 8 steps
    info = json.loads((two_ranks / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["tokens_per_step"] == 8 * (64 + info_targets(two_ranks))
    decisions = metrics(two_ranks, "curriculum")
    assert [r["step"] for r in decisions] == list(range(1, STEPS + 1))
    assert all(abs(r["share/R"] + r["share/X"] + r["share/S"] - 1) < 1e-6 for r in decisions)
    assert decisions[-1]["R/level"] > decisions[0]["R/level"]  # the plateau rule raised R
    assert any(r["R/event"] == "raise" for r in decisions)
    assert all("R/loss" in r for r in decisions)  # R is in every step's batch (share >= 0.4)
    val = metrics(two_ranks, "val")
    assert [r["step"] for r in val] == [4, 8]
    for r in val:
        for task in "RXS":
            assert 0 < r[f"val_loss/{task}"] < 12
        assert 0 <= r["exact_match"] <= 1 and r["num_spans"] > 0
    assert val[1]["val_loss"] < val[0]["val_loss"]
    rollouts = metrics(two_ranks, "rollout")
    assert [r["step"] for r in rollouts] == [4, 8]
    assert all(len(r["texts"]) == 2 and all(isinstance(t, str) and t for t in r["texts"]) for r in rollouts)
    assert any(p.name.startswith("events") for p in (two_ranks / "tb").iterdir())


def test_two_rank_checkpoint_resumes_on_one_process(two_ranks, kjv_gpt2, tmp_path):
    """World size 2 -> 1 through the universal checkpoint: the trained weights, the step count and
    the curriculum's state come back (the data differ: each rank draws its own examples)."""
    from amtrain.train import checkpoint

    step4 = two_ranks / "checkpoints" / "step_00000004"
    saved = json.loads((step4 / "amtrain_state.json").read_text())["run_state"]["objective"]["curriculum"]
    out = tmp_path / "resumed"
    resumed = train(from_args(t5_args(kjv_gpt2, out, **{"train.resume": str(step4), "train.max_steps": 6,
                                                        "train.eval_every": 0})))
    assert (step4 / "universal").is_dir() and sorted(resumed.losses) == [5, 6]
    before = losses(two_ranks)
    assert resumed.losses[5] < before[1] - 0.8  # trained weights, not a fresh model (~11.5)
    assert abs(resumed.losses[5] - before[5]) < 0.5  # other examples, the same model
    first = metrics(out, "curriculum")[0]
    assert first["step"] == 5
    for task, level in saved["levels"].items():  # one decision on from the saved levels
        assert abs(first[f"{task}/level"] - level) <= CURRICULUM["level_step"] + 1e-9, task
    a = checkpoint.consolidated_state_dict(step4)
    b = checkpoint.consolidated_state_dict(resumed.checkpoint)
    assert a.keys() == b.keys() and resumed.state.step == 6
    # 4 steps x 8 examples on two ranks, then 2 steps x 4 on one
    assert resumed.state.tokens_seen == (4 * 8 + 2 * 4) * (64 + info_targets(two_ranks))


def test_two_ranks_zero3_generate_and_rollout_on_rank_0(kjv_gpt2, tmp_path):
    """ZeRO-3: greedy decodes for exact match (ranks stop at different lengths) and rank 0's
    rollouts run on gathered parameters with the ZeRO-3 hooks off: no collective hangs."""
    args = t5_args(kjv_gpt2, tmp_path, **{"train.max_steps": 2, "train.eval_every": 1, "train.rollout_every": 1,
                                         "train.rollout_prompts": ["In the beginning"], "train.rollout_length": 8,
                                         "train.checkpoint_every": 0,
                                         "ds_config": str(REPO / "ds_configs" / "zero3.json")})
    run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), LAUNCHER, *argv(args)])
    assert [r["step"] for r in metrics(tmp_path, "rollout")] == [1, 2]
    assert [r["step"] for r in metrics(tmp_path, "val")] == [1, 2]
    assert all(np.isfinite(v) for v in losses(tmp_path).values())


def info_targets(run_dir) -> int:
    meta = json.loads((run_dir / "checkpoints" / "step_00000008" / "amtrain_state.json").read_text())
    return meta["denoise"]["targets_length"]


@pytest.fixture(scope="module")
def one_rank(kjv_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5x1")
    return train(from_args(t5_args(kjv_gpt2, out)))


def test_curriculum_survives_resume(one_rank, kjv_gpt2, tmp_path):
    step4 = one_rank.run_dir / "checkpoints" / "step_00000004"
    saved = json.loads((step4 / "amtrain_state.json").read_text())["run_state"]["objective"]["curriculum"]
    assert saved["levels"]["R"] > 0  # the state moved before the checkpoint
    resumed = train(from_args(t5_args(kjv_gpt2, tmp_path / "resumed", **{"train.resume": str(step4)})))
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(5, STEPS + 1):
        assert resumed.losses[step] == pytest.approx(one_rank.losses[step], rel=1e-6, abs=0), step
    full = {r["step"]: r for r in metrics(one_rank.run_dir, "curriculum")}
    again = {r["step"]: r for r in metrics(tmp_path / "resumed", "curriculum")}
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert {k: v for k, v in again[step].items() if not k.endswith("/loss")} == \
               {k: v for k, v in full[step].items() if not k.endswith("/loss")}, step
        for k in full[step]:
            if k.endswith("/loss"):
                assert again[step][k] == pytest.approx(full[step][k], rel=1e-6), (step, k)
    assert resumed.state.objective == one_rank.state.objective
    val_full, val_again = metrics(one_rank.run_dir, "val")[-1], metrics(tmp_path / "resumed", "val")[-1]
    assert val_again["val_loss/X"] == pytest.approx(val_full["val_loss/X"], rel=1e-6)
    assert val_again["exact_match"] == val_full["exact_match"]


def test_export_sample_and_rollout_on_a_t5_run(one_rank, tmp_path):
    import torch
    from typer.testing import CliRunner

    from amtrain.cli import app
    from amtrain.models.io import load_pretrained
    from amtrain.models.t5 import T5
    from amtrain.train.export import load_checkpoint_model

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(one_rank.run_dir), str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    exported, meta = load_pretrained(tmp_path / "exp")
    direct, _ = load_checkpoint_model(one_rank.run_dir)
    assert isinstance(exported, T5) and meta["step"] == STEPS and meta["denoise"]["inputs_length"] == 64
    x = torch.randint(0, 1000, (2, 16))
    y = torch.randint(0, 1000, (2, 8))
    assert torch.equal(exported(x, labels=y)[0], direct(x, labels=y)[0])
    for source in (one_rank.run_dir, tmp_path / "exp"):
        r = runner.invoke(app, ["sample", str(source), "-p", "In the beginning", "-n", "6", "--seed", "3"])
        assert r.exit_code == 0, r.output
        assert "In the beginning" in r.output.strip().splitlines()[-1]  # (after the consolidation's progress)
    (tmp_path / "p.txt").write_text("In the beginning God<gap> the earth.")
    r = runner.invoke(app, ["rollout", str(one_rank.run_dir), "--mode", "infill", "--prompt", str(tmp_path / "p.txt"),
                            "--out", str(tmp_path / "ro"), "--length", "4"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "ro" / "sample_0.txt").read_text()
    assert text.startswith("In the beginning God") and text.rstrip().endswith("the earth.")


@pytest.fixture(scope="module")
def midi_data(tmp_path_factory):
    from amtrain.prep.midi import prep_midi

    out = tmp_path_factory.mktemp("midi")
    prep_midi([str(REPO / "data" / "midi")], out, show_progress=False)
    return out


def test_bad_t5_settings_are_one_clear_error(kjv_gpt2, tmp_path):
    from amtrain.errors import UserError

    with pytest.raises(UserError, match=r"denoise\.curriculum: .*windw"):
        from_args(t5_args(kjv_gpt2, tmp_path, **{"denoise.curriculum": {"windw": 4}}))
    with pytest.raises(UserError, match=r"denoise\.inputs_length"):
        from_args(t5_args(kjv_gpt2, tmp_path, **{"denoise.inputs_length": 4}))
    with pytest.raises(UserError, match=r"model\.vocab_size"):
        train(from_args(t5_args(kjv_gpt2, tmp_path, **{"model.vocab_size": 60000})))
    with pytest.raises(UserError, match=r"denoise\.priority: .* gpt2 dataset"):
        train(from_args(t5_args(kjv_gpt2, tmp_path, **{"denoise.priority": True})))


def test_loss_falls_on_real_midi(midi_data, tmp_path):
    from amtrain.store import Dataset
    from amtrain.train.objective import DenoiseObjective

    prompt = str(REPO / "data" / "midi" / "music21_test06_type0.mid")
    args = t5_args(midi_data, tmp_path / "m", **{"data.val_split": '""', "denoise.inputs_length": 96,
                                                 "batch.micro_batch": 8, "train.max_steps": 20,
                                                 "train.checkpoint_every": 0, "train.rollout_every": 10,
                                                 "train.rollout_prompts": [prompt], "train.rollout_length": 9})
    result = train(from_args(args))
    first, last = result.losses[1], np.mean([result.losses[s] for s in range(16, 21)])
    assert last < first - 1.5, result.losses  # ~11.1 -> ~8.5
    rollouts = metrics(tmp_path / "m", "rollout")
    assert [r["step"] for r in rollouts] == [10, 20]
    for r in rollouts:  # the hook wrote a MIDI file that parses, and its tokens
        mid = next(f for f in r["files"] if f.endswith(".mid"))
        assert f"rollouts/step_{r['step']}/" in mid
        import symusic

        assert symusic.Score(mid).end() >= 0
    cfg = from_args(args)
    dataset = Dataset(midi_data)
    objective = DenoiseObjective.build(cfg, dataset, 0, 1)
    assert (objective.unit, objective.unit_offset) == (3, 1)
    batch = objective.micro_batches(0)[0]
    vocab = objective.vocab
    for inputs in batch.input_ids:  # sentinels sit between whole events: kept runs are triples
        body = inputs[1:np.flatnonzero(inputs == vocab.eos_id)[0]]
        runs = np.split(body, np.flatnonzero(vocab.is_sentinel(body)))
        assert all((len(r) - (1 if len(r) and vocab.is_sentinel(r[:1])[0] else 0)) % 3 == 0 for r in runs)


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    from amtrain.prep.audio import AudioPrepConfig, prep_audio
    from tests.audio_helpers import AUDIO, random_model, save_codec

    codec = save_codec(random_model("24khz"), tmp_path_factory.mktemp("codec"), "hf")
    out = tmp_path_factory.mktemp("audio")
    prep_audio([str(AUDIO)], out, AudioPrepConfig(codec_path=str(codec), chunk_seconds=2.0), show_progress=False)
    return out


def test_audio_priority_sampling_and_frames(audio_data, tmp_path):
    from amtrain.data.priority import chunk_priorities, chunk_probabilities
    from amtrain.store import Dataset
    from amtrain.train.objective import DenoiseObjective

    args = t5_args(audio_data, tmp_path / "a", **{"data.val_split": '""', "denoise.inputs_length": 96,
                                                  "denoise.priority": True, "denoise.priority_temperature": 0.1,
                                                  "train.max_steps": 3,
                                                  "train.checkpoint_every": 0})
    result = train(from_args(args))  # trains end to end on priority-drawn audio chunks
    assert sorted(result.losses) == [1, 2, 3] and all(np.isfinite(list(result.losses.values())))
    dataset = Dataset(audio_data)
    objective = DenoiseObjective.build(from_args(args), dataset, 0, 1)
    assert (objective.unit, objective.unit_offset) == (8, 1)  # K=8 codebooks per frame, after <eot>
    batcher = objective.loader.batcher  # the batcher training draws from, its priority sampler
    num_windows = batcher.num_windows(batcher.raw_length(objective.curriculum.decide(0).denoisers[0]))
    num_draws = 6000
    draws = np.bincount([batcher.document_sampler.choose(batcher.rng, num_windows) for _ in range(num_draws)],
                        minlength=batcher.document_sampler.num_documents)
    want = chunk_probabilities(chunk_priorities(audio_data, "train"), 0.1)  # every 2 s chunk is long enough
    assert want.max() > 5 * want.min()  # far from uniform at this temperature: the check can fail
    sigma = np.sqrt(want * (1 - want) / num_draws)
    assert np.all(np.abs(draws / num_draws - want) < 5 * sigma), (draws / num_draws, want)
    for inputs in objective.micro_batches(0)[0].input_ids:  # spans cover whole frames
        body = inputs[1:np.flatnonzero(inputs == objective.vocab.eos_id)[0]]
        runs = np.split(body, np.flatnonzero(objective.vocab.is_sentinel(body)))
        assert all((len(r) - (1 if len(r) and objective.vocab.is_sentinel(r[:1])[0] else 0)) % 8 == 0 for r in runs)
