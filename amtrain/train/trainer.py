"""`Trainer`: one training run, built once from the config, with one method per cadence.

    trainer = Trainer(cfg, dist)     # a page of build_* calls (amtrain.train.builders)
    result = trainer.fit()           # every step `train_step`; on their cadences `log`,
                                     # `evaluate`, `rollout`, `save`; a last evaluate and save

One optimizer step (`train_step`) = grad_accum micro-batches per rank, forward + `engine.backward`
each, then one all-reduce of [loss sum, non-finite count, checkpoint-due flag, objective extras]
so every rank agrees on the logged loss, on skipping a NaN/inf step (no update;
`train.max_bad_steps` in a row stop the run), on time-based checkpoints and on what the
objective decides from the extras; then `engine.step()` (clipping, optimizer, LR schedule).

The trainer knows no model family: what an example, a micro-batch and its loss are, what
validation measures and what else a checkpoint must hold belong to the family's objective
(`amtrain.train.objective`). Runtime state is `RunState` (step, tokens seen, data position,
objective state, bad steps, elapsed time), checkpointed with the engine (`amtrain.train.checkpoint`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from amtrain.config import RunConfig
from amtrain.errors import UserError
from amtrain.registry import modality_of
from amtrain.train import checkpoint
from amtrain.train.builders import (
    build_codec,
    build_dataset,
    build_ds_config,
    build_meta,
    build_model,
    build_objective,
    build_resume,
    build_rollout_prompts,
    build_shape,
)
from amtrain.train.checkpoint import RunState
from amtrain.train.engine import DistInfo, build_engine, gathered, resolve_precision
from amtrain.train.experts import apply_expert_parallel, expert_balance, expert_param_counts
from amtrain.train.metrics import MetricsLog, Progress, measure_peak_flops, memory_gb, record_run


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    state: RunState
    losses: dict[int, float] = field(default_factory=dict)
    """Global mean training loss of every step run in this segment, by step number (1-based)."""
    val_loss: float | None = None


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Global mean loss of the step (NaN when skipped)."""
    seq_len: int
    """Tokens per example in the step."""
    checkpoint_due: bool
    """train.checkpoint_minutes have passed since the last save when the step started (all ranks agree)."""


class Throughput:
    """Training tokens and wall time since the last train record. Cadences that are not
    training (validation, rollouts, checkpoints) restart it."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.since, self.tokens = time.perf_counter(), 0

    def lap(self) -> tuple[float, float]:
        """(seconds, tokens/s) since the last restart."""
        seconds = time.perf_counter() - self.since
        return seconds, self.tokens / max(seconds, 1e-9)


class Trainer:
    """One run on this rank: `__init__` builds every piece from the config (the only place it is
    read here, besides the cadences' `train.*` numbers), `fit` trains; one method per cadence."""

    def __init__(self, cfg: RunConfig, d: DistInfo):
        self.cfg, self.d = cfg, d
        self.ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and world size
        self.dataset = build_dataset(cfg, d)
        self.model = build_model(cfg, self.dataset)
        self.shape = build_shape(self.model)  # counts parameters and FLOPs (ZeRO-3 empties self.model's tensors)
        self.objective = build_objective(cfg, self.dataset, d)
        self.plan = self.objective.plan
        self.resume = build_resume(cfg, d, self.model)
        self.precision = resolve_precision(cfg.train.precision, d.device)
        self.ds_config = build_ds_config(cfg, self.plan, self.precision, self.resume)
        apply_expert_parallel(self.model, cfg.train.ep_size, d.world_size, self.ds_config)  # MoE: experts on their owner ranks
        self.engine, self.optimizer = build_engine(self.model, cfg, self.ds_config)
        if cfg.model.compile:
            self.engine.compile()
        self.state = self.load(self.resume) if self.resume is not None else RunState()
        self.peak_flops = cfg.train.peak_flops or measure_peak_flops(
            d.device, torch.bfloat16 if self.precision == "bf16" else torch.float32)
        self.meta = build_meta(cfg, self.model, self.dataset, self.ds_config, self.objective)
        if d.is_main:
            self.record()
        self.metrics = MetricsLog(Path(cfg.train.out_dir), self.state.step) if d.is_main else None
        self.bar = Progress(cfg.train.progress and d.is_main, cfg.train.max_steps, self.state.step)
        if cfg.train.rollout_every:
            self.tokenizer, self.rollout_prompts = build_rollout_prompts(cfg, self.dataset)
            self.codec = build_codec(cfg, self.dataset)
        self.saved_at = self.state.step if self.resume is not None else -1
        self.last_save = time.perf_counter()
        self.throughput = Throughput()

    def record(self) -> None:
        """The run directory's config, engine JSON and run_info.json (rank 0)."""
        run_dir = Path(self.cfg.train.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_run(run_dir, self.cfg, self.ds_config, {
            "world_size": self.d.world_size, "backend": self.d.backend, "device": str(self.d.device),
            "precision": self.precision, "peak_flops": self.peak_flops, "num_params": self.shape.num_params(),
            "num_params_active": self.shape.num_active_params(),
            "tokens_per_step": self.plan.tokens_per_step, **(expert_param_counts(self.engine.module) or {}),
            "resumed_from": str(self.resume.folder) if self.resume else None})

    # ---------------------------------------------------------------- the loop

    def fit(self) -> RunResult:
        t = self.cfg.train
        if self.d.is_main:
            self.bar.print(describe_start(self))
            if self.resume is not None and (note := describe_schedule_change(self)):
                self.bar.print(note)
        result = RunResult(Path(t.out_dir), self.resume.folder if self.resume else self.ckpt_dir, self.state)
        self.last_save = time.perf_counter()  # the clocks start with the loop
        self.throughput.restart()
        while self.state.step < t.max_steps:
            step = self.train_step()
            n = self.state.step
            result.losses[n] = step.loss
            if n % t.log_every == 0 or n == t.max_steps:
                self.log(step)
            self.bar.update(n, f"loss {step.loss:.3f}")
            if self.objective.has_val() and t.eval_every and n % t.eval_every == 0 and n < t.max_steps:
                result.val_loss = self.evaluate()
            if t.rollout_every and n % t.rollout_every == 0:
                self.rollout()
            if (t.checkpoint_every and n % t.checkpoint_every == 0) or step.checkpoint_due:
                result.checkpoint = self.save()
        if self.objective.has_val():
            result.val_loss = self.evaluate()
        if self.saved_at != self.state.step:
            result.checkpoint = self.save()
        self.close(result)
        return result

    # ---------------------------------------------------------------- cadences

    def train_step(self) -> StepResult:
        """One optimizer step on every rank together; advances and returns the run state's step."""
        step, d = self.state.step, self.d
        seq_len = self.objective.seq_len_at(step)
        minutes = self.cfg.train.checkpoint_minutes
        due_by_time = minutes > 0 and time.perf_counter() - self.last_save >= 60 * minutes
        loss_sum, num_micro, extra = self.forward_backward(self.objective.micro_batches(step))
        finite = torch.isfinite(loss_sum)
        stats = torch.stack([torch.where(finite, loss_sum, 0.0), (~finite).float(),
                             torch.tensor(float(due_by_time))]).to(d.device)
        stats = torch.cat([stats, extra.to(stats.device)])
        dist.all_reduce(stats)
        bad = bool(stats[1] > 0)
        self.optimizer.skip = bad  # every rank skips the update together
        self.engine.step()
        self.optimizer.skip = False
        loss = float(stats[0]) / (num_micro * d.world_size) if not bad else math.nan
        records = self.objective.after_step(step, stats[3:] if self.objective.extra_size else None, bad)
        if (moe := expert_balance(self.engine.module, bad)) is not None:  # MoE: biases + load (all ranks)
            records["moe"] = moe
        self.advance(seq_len, bad)
        if d.is_main:
            for kind, values in records.items():
                self.log_out.write(kind, self.state.step, values)
        if self.state.bad_streak >= self.cfg.train.max_bad_steps:
            raise UserError(f"{self.state.bad_streak} steps in a row had a NaN/inf loss (last at step {self.state.step}); "
                            f"stopping. Lower optim.lr, check the data, or resume from {self.ckpt_dir}")
        return StepResult(loss, seq_len, bool(stats[2] > 0))

    def forward_backward(self, micro_batches: list) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Forward + backward of each micro-batch. -> (loss sum, micro-batches, extras summed)."""
        losses, extra = [], torch.zeros(self.objective.extra_size, device=self.d.device)
        for i, micro in enumerate(micro_batches):
            loss, more = self.objective.loss(self.engine, micro, self.d.device)
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            if more is not None:
                extra += more
            if i + 1 < len(micro_batches):
                self.engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-step
        return torch.stack(losses).sum(), len(losses), extra

    def advance(self, seq_len: int, bad: bool) -> None:
        """The run state after a step: counts, and the data position and objective state to
        checkpoint."""
        s = self.state
        s.step += 1
        s.tokens_seen += self.plan.global_batch * seq_len
        self.throughput.tokens += self.plan.global_batch * seq_len
        s.loader = self.objective.loader.state_dict()
        s.objective = self.objective.state_dict()
        s.num_bad_steps += bad
        s.bad_streak = s.bad_streak + 1 if bad else 0

    @property
    def log_out(self) -> MetricsLog:
        """The run's metrics log: rank 0 writes it (every call site is under `d.is_main`)."""
        assert self.metrics is not None, "only rank 0 writes metrics"
        return self.metrics

    def log(self, step: StepResult) -> None:
        """The train record: metrics.jsonl and TensorBoard, and a console line (rank 0)."""
        seconds, tok_s = self.throughput.lap()
        self.state.elapsed_s += seconds
        mfu = tok_s / self.d.world_size * self.objective.flops_per_token(self.shape, step.seq_len) / self.peak_flops
        values = {"loss": step.loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm(self.engine),
                  "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": memory_gb(self.d.device),
                  "tokens_seen": self.state.tokens_seen, "seq_len": step.seq_len,
                  "bad_steps": self.state.num_bad_steps, "elapsed_s": self.state.elapsed_s}
        if self.d.is_main:
            self.log_out.write("train", self.state.step, values)
            self.bar.print(f"step {self.state.step:>6}  loss {step.loss:.4f}  lr {values['lr']:.2e}  "
                           f"tok/s {tok_s:,.0f}  mfu {mfu:.1%}")
        self.throughput.restart()

    def evaluate(self) -> float:
        """The objective's validation (all ranks); the val record on rank 0. -> val loss."""
        values = self.objective.evaluate(self.engine, self.d.device)
        if self.d.is_main:
            self.log_out.write("val", self.state.step, values)
            self.bar.print(f"step {self.state.step:>6}  " + "  ".join(f"{k} {format_value(v)}" for k, v in values.items()))
        self.throughput.restart()
        return values["val_loss"]

    def rollout(self) -> None:
        """Rank 0 rolls out train.rollout_prompts through `amtrain.train.rollouts.rollout_hook` (ZeRO-3:
        every rank gathers the parameters around it): continuations into metrics.jsonl (kind
        "rollout") and TensorBoard, or files under out_dir/rollouts/step_N/ (the hook writes them)."""
        from amtrain.train.rollouts import rollout_hook

        t, step = self.cfg.train, self.state.step
        with gathered(self.engine):
            if self.d.is_main:
                out = rollout_hook(self.engine.module, self.rollout_prompts, tokenizer=self.tokenizer, step=step,
                                   run_dir=t.out_dir, length=t.rollout_length, seed=t.seed, codec=self.codec)
                values = {"prompts": [str(p) if not hasattr(p, "tolist") else "<tokens>" for p in self.rollout_prompts]}
                values |= {k: v for k, v in out.items() if k != "step"}
                self.log_out.write("rollout", step, values)
                for i, text in enumerate(out.get("texts", [])):
                    self.log_out.tb.add_text(f"rollout/prompt_{i}", text, step)
                self.bar.print(f"step {step:>6}  rollout: " + "; ".join(out.get("texts", out.get("files", [])))[:300])
        self.throughput.restart()

    def save(self) -> Path:
        """A checkpoint of the engine and the run state (collective). -> its folder."""
        folder = checkpoint.save(self.engine, self.ckpt_dir, self.state, self.meta, self.cfg.train.keep_last)
        self.saved_at, self.last_save = self.state.step, time.perf_counter()
        self.throughput.restart()
        return folder

    def load(self, resume: checkpoint.ResumePoint) -> RunState:
        """Engine, RNG and run state from a checkpoint; the data position and the objective's
        state go back into the objective."""
        state = checkpoint.load(self.engine, resume)
        self.objective.loader.load_state_dict(state.loader)
        self.objective.load_state_dict(state.objective)
        return state

    def close(self, result: RunResult) -> None:
        self.bar.close()
        if self.d.is_main:
            self.log_out.close()
            t = self.cfg.train
            modality = modality_of(self.dataset.manifest.tokenizer)
            command = modality.sample_command(t.out_dir, self.dataset, self.cfg.data.split, t.codec_path)
            print(describe_end(result, command), flush=True)
        result.state = self.state


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan


def describe_start(tr: Trainer) -> str:
    cfg, d, plan, resume = tr.cfg, tr.d, tr.plan, tr.resume
    where = "starting fresh"
    if resume is not None:
        where = f"resuming from {resume.folder} at step {tr.state.step}" + (
            " (universal: world size changed)" if resume.universal else "")
    data = f"{tr.dataset.folder} ({tr.dataset.manifest.tokenizer})"
    if not cfg.data.path:
        data = f"the bundled KJV corpus (data.path is empty) in {data}"
    total, active = tr.shape.num_params(), tr.shape.num_active_params()
    params = f"{total:,} params" + (f" ({active:,} active per token)" if active != total else "")
    return (f"amtrain: {cfg.model.size} {cfg.model.arch}, {params}; data {data}; "
            f"{d.world_size} rank(s) on "
            f"{d.device} ({d.backend}); batch {plan.micro_batch} x {plan.grad_accum} accum x {plan.world_size} ranks x "
            f"{plan.seq_len} tokens = {plan.tokens_per_step:,} tokens/step; {cfg.train.max_steps} steps; "
            f"run dir {cfg.train.out_dir}; {where}")


def format_value(v: float) -> str:
    """A metric for the console: 4 decimals, or 4 significant digits in e-notation when large
    (AMT's event perplexity of an untrained model is 2.96e+10, not 29572289882.0293)."""
    return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.4f}"


def describe_schedule_change(tr: Trainer) -> str | None:
    """A notice when a resumed run's train.max_steps differs from the checkpoint's run: the LR
    schedule (warm-up, cosine to optim.min_lr at train.max_steps) is recomputed for the new end."""
    assert tr.resume is not None
    saved = tr.resume.meta.get("config", {}).get("train", {}).get("max_steps")
    now, step, optim = tr.cfg.train.max_steps, tr.state.step, tr.cfg.optim
    if saved is None or saved == now:
        return None
    return (f"note: train.max_steps is {now}, the checkpoint's run had {saved}: the LR schedule now ends at step "
            f"{now}, so the LR at step {step + 1} is {optim.lr_at(step, now):.2e} instead of {optim.lr_at(step, saved):.2e}")


def describe_end(result: RunResult, sample_command: str) -> str:
    """The last lines of a run: where it ended, its checkpoint, and the modality's command to
    sample from it (`Modality.sample_command`)."""
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    return (f"done: step {result.state.step}, {result.state.tokens_seen:,} tokens{val}\n"
            f"checkpoint: {result.checkpoint}\n"
            f"sample from it: {sample_command}")
