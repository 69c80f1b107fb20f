"""Curriculum: schedule ramps, adaptive moves on scripted losses, resume gives identical decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from amtrain.data.curriculum import Curriculum, CurriculumConfig, TaskRange, losses_by_task
from amtrain.data.span_corruption import (
    TASKS,
    Denoiser,
    DenoisingBatcher,
    T5Vocab,
    required_targets_length,
)


def test_schedule_ramps_difficulty_and_mixture():
    cur = Curriculum(CurriculumConfig(mode="schedule", schedule_start=100, schedule_steps=400))
    first, mid, last = cur.decide(0), cur.decide(300), cur.decide(10_000)
    assert first.levels == {t: 0.0 for t in TASKS} and last.levels == {t: 1.0 for t in TASKS}
    assert mid.levels["R"] == 0.5
    assert first.denoisers == [Denoiser("R", 0.15, 3.0), Denoiser("X", 0.3, 8.0), Denoiser("S", 0.15)]
    assert last.denoisers == [Denoiser("R", 0.15, 8.0), Denoiser("X", 0.5, 32.0), Denoiser("S", 0.5)]
    assert first.weights == [0.8, 0.1, 0.1] and last.weights == [0.4, 0.4, 0.2]
    assert mid.denoisers[1].mean_span_length == pytest.approx(16.0)  # geometric in span length
    log = mid.as_dict()
    assert log["step"] == 300 and log["share/X"] == pytest.approx(0.25)
    assert log["X/noise_density"] == pytest.approx(0.4) and log["R/event"] == ""
    json.dumps(log)  # loggable as is


NOISE = np.random.default_rng(0).standard_normal(2000)


def scripted(step: int, level: float, climb_from: int | None = None) -> float:
    """A loss that falls to a floor set by the difficulty, with fixed noise per step; optionally
    climbing from `climb_from` on."""
    loss = 1.0 + level + 3.0 * math.exp(-step / 40) + 0.01 * NOISE[step]
    if climb_from is not None and step >= climb_from:
        loss += 0.02 * (step - climb_from)
    return loss


def run(cur: Curriculum, steps: range, climb_from=None) -> list[dict]:
    decisions = []
    for step in steps:
        d = cur.decide(step)
        decisions.append(d.as_dict())
        cur.observe(step, {"R": scripted(step, d.levels["R"], climb_from)})
    return decisions


def test_raises_difficulty_when_loss_plateaus_below_threshold():
    cfg = CurriculumConfig(window=40, loss_threshold={"R": 1.4}, plateau_tol=0.01)
    cur = Curriculum(cfg)
    decisions = run(cur, range(600))
    raises = [d["step"] for d in decisions if d["R/event"] == "raise"]
    # The loss reaches its floor 1.0 + level after ~200 steps: no raise while it still falls.
    assert raises and raises[0] > 150
    # floors: 1.0 at level 0 and 1.25 at 0.25 are below 1.4 -> raised; 1.5 at level 0.5 is not
    assert [d["step"] for d in decisions if d["R/event"]] == raises and len(raises) == 2
    assert decisions[-1]["R/level"] == 0.5
    assert decisions[-1]["R/mean_span_length"] > 3.0 and decisions[-1]["share/X"] > 0.1
    assert all(d[f"{t}/level"] == 0.0 for d in decisions for t in ("X", "S"))  # no loss, no move


def test_plateau_above_threshold_does_not_raise():
    cur = Curriculum(CurriculumConfig(window=40, loss_threshold={"R": 0.9}))
    decisions = run(cur, range(600))
    assert all(d["R/level"] == 0.0 and d["R/event"] == "" for d in decisions)


def test_eases_when_loss_climbs():
    cur = Curriculum(CurriculumConfig(window=20, initial_level=0.75, climb_tol=0.05))
    decisions = run(cur, range(400), climb_from=250)
    levels = [d["R/level"] for d in decisions]
    eases = [d["step"] for d in decisions if d["R/event"] == "ease"]
    assert eases and min(eases) > 250
    assert levels[-1] < max(levels[:250])


def test_state_round_trip_mid_run_gives_identical_decisions():
    cfg = CurriculumConfig(window=30, loss_threshold={"R": 2.0})
    whole = run(Curriculum(cfg), range(0, 500), climb_from=420)

    first = Curriculum(cfg)
    head = run(first, range(0, 230), climb_from=420)  # cut mid-window
    assert len(first.windows["R"]) not in (0, cfg.window)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = Curriculum(cfg)
    resumed.load_state_dict(state)
    tail = run(resumed, range(230, 500), climb_from=420)
    assert head + tail == whole
    assert any(d["R/event"] for d in whole[230:])  # the tail holds decisions that moved


def test_targets_length_covers_every_curriculum_decision():
    """targets_length sized by all_denoisers() takes every batch a scheduled run asks for."""
    cfg = CurriculumConfig(mode="schedule", schedule_steps=100)
    assert len(cfg.all_denoisers()) == 3 * 101
    targets_length = required_targets_length(64, cfg.all_denoisers())
    batcher = DenoisingBatcher([np.arange(20_000) % 1000], T5Vocab(1000), 64, targets_length)
    cur = Curriculum(cfg)
    for step in range(0, 101, 5):
        d = cur.decide(step)
        batch = batcher.batch(6, d.denoisers, d.weights)
        assert batch.labels.shape == (6, targets_length)
    assert max(batcher.raw_length(d) for d in cfg.all_denoisers()) > 64 * 1.9  # X at 0.5 density


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="curriculum.mode"):
        CurriculumConfig(mode="random")
    with pytest.raises(ValueError, match="curriculum.window"):
        CurriculumConfig(window=7)
    with pytest.raises(ValueError, match="share for R"):
        CurriculumConfig(x_share=(0.5, 0.9), s_share=(0.1, 0.2))
    with pytest.raises(ValueError, match="curriculum.ranges"):
        CurriculumConfig(ranges={"R": TaskRange(0.15, 0.15)})


def test_config_from_plain_yaml_values():
    import yaml

    text = """
mode: schedule
schedule_steps: 200
x_share: [0.2, 0.5]
ranges:
  R: {easy_density: 0.15, hard_density: 0.25, easy_span: 3, hard_span: 6}
  X: {easy_density: 0.3, hard_density: 0.5, easy_span: 8, hard_span: 64}
  S: {easy_density: 0.2, hard_density: 0.4}
"""
    cfg = CurriculumConfig(**yaml.safe_load(text))
    last = Curriculum(cfg).decide(200)
    assert last.denoisers == [Denoiser("R", 0.25, 6.0), Denoiser("X", 0.5, 64.0), Denoiser("S", 0.4)]
    assert last.weights == [0.3, 0.5, 0.2]


def test_losses_by_task():
    per_example = np.array([1.0, 2.0, 4.0, 3.0])
    assert losses_by_task(per_example, np.array([0, 2, 0, 2])) == {"R": 2.5, "S": 2.5}
