"""Denoising curriculum: which UL2 tasks to mix and how hard each one is, decided every step.

Each task (R, X, S) has a difficulty level in [0, 1] that interpolates its denoiser between an
easy and a hard end (noise density linearly, mean span length geometrically). The mixture
follows the mean level: the shares of X and S grow from their `*_share` lows to highs, R takes
the rest. Levels move either

  - on a schedule: all levels ramp linearly from 0 at `schedule_start` to 1 after
    `schedule_steps` more steps; or
  - adaptively from the live loss of each task (`observe`): once a task has `window` fresh
    losses, compare the mean of the older and the newer half of the window.
      plateau: newer mean < `loss_threshold` and improved by less than `plateau_tol` (relative)
               -> raise the level by `level_step`;
      climb:   newer mean > older mean x (1 + `climb_tol`) -> lower it by `level_step`.
    After a move the task's window restarts (losses at the old difficulty no longer count).

Decisions are a pure function of the step and the losses observed, so `state_dict` /
`load_state_dict` (levels, windows, last decision) make a resumed run decide exactly as an
uninterrupted one. Each decision is a flat dict of numbers and strings, ready for a metrics log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from amtrain.data.span_corruption import TASKS, Denoiser

LEVEL_GRID = 100
"""Levels are multiples of 1/LEVEL_GRID: a bounded set of denoisers (cached raw lengths)."""


def on_grid(level: float) -> float:
    return round(min(max(level, 0.0), 1.0) * LEVEL_GRID) / LEVEL_GRID


@dataclass(frozen=True)
class TaskRange:
    """A task's denoiser at level 0 (easy) and level 1 (hard)."""

    easy_density: float
    hard_density: float
    easy_span: float = 3.0
    hard_span: float = 3.0

    def at(self, task: str, level: float) -> Denoiser:
        density = self.easy_density + level * (self.hard_density - self.easy_density)
        span = self.easy_span * (self.hard_span / self.easy_span) ** level
        return Denoiser(task, round(density, 6), round(span, 6))


def default_ranges() -> dict[str, TaskRange]:
    """UL2's denoisers (Tay et al. 2022, §3.1.2) as ends: R from (0.15, 3) to (0.15, 8); X from
    (0.3, 8) to (0.5, 32); S from predicting the last 15% to the last 50%."""
    return {"R": TaskRange(0.15, 0.15, 3.0, 8.0),
            "X": TaskRange(0.3, 0.5, 8.0, 32.0),
            "S": TaskRange(0.15, 0.5)}


@dataclass
class CurriculumConfig:
    mode: str = "adaptive"
    """"adaptive" (levels follow the per-task loss) or "schedule" (levels ramp with the step)."""
    ranges: dict[str, TaskRange] = field(default_factory=default_ranges)
    """Easy and hard denoiser of each task."""
    x_share: tuple[float, float] = (0.1, 0.4)
    """Share of X examples at mean level 0 and at mean level 1."""
    s_share: tuple[float, float] = (0.1, 0.2)
    """Share of S examples at mean level 0 and at mean level 1."""
    initial_level: float = 0.0
    schedule_start: int = 0
    schedule_steps: int = 10_000
    window: int = 50
    """Adaptive: losses per task needed before a decision (older half vs newer half)."""
    loss_threshold: dict[str, float] = field(
        default_factory=lambda: {task: math.inf for task in TASKS})
    """Adaptive: a task is raised only when its loss is below this (inf = any plateau)."""
    plateau_tol: float = 0.01
    """Adaptive: relative improvement between the window halves below which the loss has plateaued."""
    climb_tol: float = 0.05
    """Adaptive: relative rise between the window halves that eases the task."""
    level_step: float = 0.25

    def __post_init__(self):
        # YAML gives plain dicts and lists: accept them
        self.ranges = {t: r if isinstance(r, TaskRange) else TaskRange(**r)
                       for t, r in self.ranges.items()}
        self.x_share, self.s_share = tuple(self.x_share), tuple(self.s_share)
        if self.mode not in ("adaptive", "schedule"):
            raise ValueError(f"curriculum.mode must be 'adaptive' or 'schedule', got {self.mode!r}")
        if set(self.ranges) != set(TASKS):
            raise ValueError(f"curriculum.ranges must give each of {TASKS}, got {sorted(self.ranges)}")
        for name in ("x_share", "s_share"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= 1.0 or not 0.0 <= high <= 1.0:
                raise ValueError(f"curriculum.{name} must be two shares in [0, 1], got {low, high}")
        if self.x_share[1] + self.s_share[1] > 1.0 or self.x_share[0] + self.s_share[0] > 1.0:
            raise ValueError("curriculum.x_share + curriculum.s_share must leave a share for R")
        if self.window < 2 or self.window % 2:
            raise ValueError(f"curriculum.window must be an even number >= 2, got {self.window}")
        if not 1.0 / LEVEL_GRID <= self.level_step <= 1.0 or not 0.0 <= self.initial_level <= 1.0:
            raise ValueError(f"curriculum.level_step must be in [{1 / LEVEL_GRID}, 1] and "
                             "initial_level in [0, 1]")
        if self.schedule_steps <= 0:
            raise ValueError(f"curriculum.schedule_steps must be positive, got {self.schedule_steps}")
        self.loss_threshold = {task: math.inf for task in TASKS} | dict(self.loss_threshold)

    def all_denoisers(self) -> list[Denoiser]:
        """Every denoiser the curriculum can choose (levels live on a grid of 1/LEVEL_GRID), e.g.
        to size targets_length for a whole run with `required_targets_length`."""
        return [r.at(task, i / LEVEL_GRID) for task, r in self.ranges.items()
                for i in range(LEVEL_GRID + 1)]


@dataclass
class Decision:
    step: int
    denoisers: list[Denoiser]
    """One per task, in TASKS order."""
    weights: list[float]
    """Mixture share of each task, in TASKS order."""
    levels: dict[str, float]
    events: dict[str, str]
    """Per task: "raise", "ease" or "" (what changed since the last decision)."""

    def as_dict(self) -> dict:
        """Flat, loggable: step, share/R, R/level, R/noise_density, R/mean_span_length, R/event..."""
        out: dict = {"step": self.step}
        for d, w in zip(self.denoisers, self.weights, strict=True):
            out[f"share/{d.task}"] = w
            out[f"{d.task}/level"] = self.levels[d.task]
            out[f"{d.task}/noise_density"] = d.noise_density
            out[f"{d.task}/mean_span_length"] = d.mean_span_length
            out[f"{d.task}/event"] = self.events[d.task]
        return out


class Curriculum:
    """`decide(step)` before building a step's batch; `observe(step, {task: loss})` after it."""

    def __init__(self, cfg: CurriculumConfig):
        self.cfg = cfg
        self.levels = {task: on_grid(cfg.initial_level) for task in TASKS}
        self.windows: dict[str, list[float]] = {task: [] for task in TASKS}
        self.pending: dict[str, str] = {task: "" for task in TASKS}

    def _lerp(self, ends: tuple[float, float], level: float) -> float:
        return ends[0] + level * (ends[1] - ends[0])

    def _schedule_level(self, step: int) -> float:
        return on_grid((step - self.cfg.schedule_start) / self.cfg.schedule_steps)

    def decide(self, step: int) -> Decision:
        if self.cfg.mode == "schedule":
            self.levels = {task: self._schedule_level(step) for task in TASKS}
        mean_level = sum(self.levels.values()) / len(TASKS)
        x = self._lerp(self.cfg.x_share, mean_level)
        s = self._lerp(self.cfg.s_share, mean_level)
        weights = [round(1.0 - x - s, 6), round(x, 6), round(s, 6)]  # R, X, S
        denoisers = [self.cfg.ranges[t].at(t, self.levels[t]) for t in TASKS]
        events, self.pending = self.pending, {task: "" for task in TASKS}
        return Decision(step, denoisers, weights, dict(self.levels), events)

    def observe(self, step: int, losses: dict[str, float]) -> None:
        """Per-task mean loss of the batch built for `step` (tasks absent from it are left out)."""
        if self.cfg.mode != "adaptive":
            return
        for task, loss in losses.items():
            window = self.windows[task]
            window.append(float(loss))
            if len(window) == self.cfg.window:
                self._judge(task)

    def _judge(self, task: str) -> None:
        window, half = self.windows[task], self.cfg.window // 2
        older, newer = sum(window[:half]) / half, sum(window[half:]) / half
        level = self.levels[task]
        if newer > older * (1 + self.cfg.climb_tol) and level > 0.0:
            self._move(task, level - self.cfg.level_step, "ease")
        elif (newer < self.cfg.loss_threshold[task] and older - newer < self.cfg.plateau_tol * older
              and level < 1.0):
            self._move(task, level + self.cfg.level_step, "raise")
        else:
            window.pop(0)  # slide

    def _move(self, task: str, level: float, event: str) -> None:
        self.levels[task] = on_grid(level)
        self.windows[task] = []
        self.pending[task] = event

    def state_dict(self) -> dict:
        return {"levels": dict(self.levels), "windows": {t: list(w) for t, w in self.windows.items()},
                "pending": dict(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.levels = {t: float(v) for t, v in state["levels"].items()}
        self.windows = {t: [float(x) for x in w] for t, w in state["windows"].items()}
        self.pending = dict(state["pending"])


def losses_by_task(per_example: np.ndarray, task_ids: np.ndarray) -> dict[str, float]:
    """{task: mean of its examples' losses} for the tasks present in a batch: what `observe`
    takes. `per_example` (B,) e.g. `per_example_loss(...)`, `task_ids` (B,) = `batch.task_ids`."""
    return {TASKS[t]: float(per_example[task_ids == t].mean()) for t in np.unique(task_ids)}
