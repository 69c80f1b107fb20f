"""`train(cfg)`: the training entry point, a page of `build_*` calls and one loop.

One optimizer step = `grad_accum` micro-batches per rank, forward + `engine.backward` each,
then one all-reduce of [loss sum, non-finite count, checkpoint-due flag, objective extras] so
every rank agrees on the logged loss, on skipping a NaN/inf step (no update; `max_bad_steps` in
a row stop the run), on time-based checkpoints and (T5) on the curriculum's next decision; then
`engine.step()` (clipping, optimizer, LR schedule).

What a micro-batch is and what its loss is belongs to the objective (`amtrain.train.objective`):
windows + causal LM loss for the decoder and the LSTM, denoising batches + curriculum for T5.
Every `train.rollout_every` steps rank 0 rolls out `train.rollout_prompts` (`rollout_hook`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from amtrain.config import DEFAULT_DATA, DEFAULT_TEXT, BatchPlan, RunConfig, batch_plan
from amtrain.data.loader import TrainLoader, val_batches
from amtrain.errors import UserError
from amtrain.registry import family, modality_of
from amtrain.store import Dataset
from amtrain.train import checkpoint
from amtrain.train.checkpoint import ResumePoint, RunState
from amtrain.train.engine import (
    DistInfo,
    build_engine,
    init_distributed,
    load_ds_config,
    resolve_ds_config,
    resolve_precision,
    zero_stage,
)
from amtrain.train.metrics import MetricsLog, Progress, measure_peak_flops, memory_gb, record_run
from amtrain.train.objective import DenoiseObjective, LMObjective, gathered


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    state: RunState
    losses: dict[int, float] = field(default_factory=dict)
    """Global mean training loss of every step run in this segment, by step number (1-based)."""
    val_loss: float | None = None


def train(cfg: RunConfig) -> RunResult:
    d = init_distributed(cfg.train.dist_timeout_s)
    try:
        return _train(cfg, d)
    except RuntimeError as e:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        if not _raised_in_collective(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"rank {d.rank}: lost contact with another rank ({first}); a rank died or hung "
                        f"(collectives time out after train.dist_timeout_s = {cfg.train.dist_timeout_s:g} s), "
                        f"see the other ranks' output") from None


def _raised_in_collective(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"torch{os.sep}distributed" in tb.tb_frame.f_code.co_filename


def _train(cfg: RunConfig, d: DistInfo) -> RunResult:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and world size
    run_dir = Path(cfg.train.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    dataset = build_dataset(cfg, d)
    model = build_model(cfg, dataset)
    t5 = cfg.model.arch == "t5"
    objective = None
    if t5:  # its example length (inputs + targets) is the batch plan's
        objective = DenoiseObjective(cfg, dataset, DenoiseObjective.vocab(cfg, dataset), d.rank, d.world_size)
    plan = batch_plan(cfg.batch, objective.seq_len if t5 else cfg.data.seq_len, d.world_size)
    if t5:
        objective.grad_accum = plan.grad_accum
    resume = checkpoint.find_resume(cfg.train.resume, ckpt_dir, d.world_size)
    if resume is not None:
        check_same_model(resume, asdict(model.cfg))
    precision = resolve_precision(cfg.train.precision, d.device)
    ds_config = build_ds_config(cfg, plan, precision, resume)
    engine, optimizer = build_engine(model, cfg, ds_config)
    if cfg.model.compile:
        engine.compile()
    if not t5:
        loader = TrainLoader(dataset, cfg.data.split, cfg.data.seq_len, plan.micro_batch, plan.grad_accum,
                             d.rank, d.world_size, cfg.train.seed)
        objective = LMObjective(loader, build_val(cfg, dataset, plan, d), dataset.manifest.tokenizer)
    state = RunState()
    if resume is not None:
        state = checkpoint.load(engine, resume)
        objective.load_loader_state(state.loader)
        objective.load_state_dict(state.objective)
    peak = cfg.train.peak_flops or measure_peak_flops(d.device, torch.bfloat16 if precision == "bf16" else torch.float32)
    meta = {"zero_stage": zero_stage(ds_config), "model": asdict(model.cfg), "data": str(dataset.folder),
            "tokenizer": dataset.manifest.tokenizer, "tokenizer_params": dataset.manifest.tokenizer_params,
            "config": cfg.to_dict()}
    if t5:
        meta["denoise"] = {"inputs_length": objective.inputs_length, "targets_length": objective.targets_length,
                           "unit": objective.unit, "unit_offset": objective.unit_offset,
                           "num_sentinels": cfg.denoise.num_sentinels}
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record_run(run_dir, cfg, ds_config, {"world_size": d.world_size, "backend": d.backend,
                                             "device": str(d.device), "precision": precision, "peak_flops": peak,
                                             "num_params": model.num_params(), "tokens_per_step": plan.tokens_per_step,
                                             "resumed_from": str(resume.folder) if resume else None})
    return run_loop(cfg, d, engine, optimizer, model, objective, plan, state, peak, meta, resume)


def run_loop(cfg: RunConfig, d: DistInfo, engine, optimizer, model, objective, plan: BatchPlan,
             state: RunState, peak: float, meta: dict, resume: ResumePoint | None) -> RunResult:
    t = cfg.train
    ckpt_dir = Path(t.out_dir) / "checkpoints"
    log = MetricsLog(Path(t.out_dir)) if d.is_main else None
    bar = Progress(t.progress and d.is_main, t.max_steps, state.step)
    if d.is_main:
        bar.print(describe_start(cfg, d, plan, model, resume, state))
    result = RunResult(Path(t.out_dir), resume.folder if resume else ckpt_dir, state)
    last_ckpt_time = tick = time.perf_counter()
    tokens_since, saved_at = 0, state.step if resume else -1
    rollouts = Rollouts(cfg, meta, d) if t.rollout_every else None
    while state.step < t.max_steps:
        seq_len = plan.seq_len if cfg.model.arch == "t5" else cfg.data.seq_len_at(state.step)
        due_by_time = t.checkpoint_minutes > 0 and time.perf_counter() - last_ckpt_time >= 60 * t.checkpoint_minutes
        micro = objective.next_step(state.step)
        loss, bad, time_due, extra = train_step(engine, optimizer, micro, seq_len, d, due_by_time, objective)
        record = objective.after_step(state.step, extra, bad)
        state.step += 1
        state.tokens_seen += plan.global_batch * seq_len
        tokens_since += plan.global_batch * seq_len
        state.loader = objective.loader_state()
        state.objective = objective.state_dict()
        if record is not None and d.is_main:
            log.write("curriculum", state.step, record)
        state.num_bad_steps += bad
        state.bad_streak = state.bad_streak + 1 if bad else 0
        result.losses[state.step] = loss
        if state.bad_streak >= t.max_bad_steps:
            raise UserError(f"{state.bad_streak} steps in a row had a NaN/inf loss (last at step {state.step}); "
                            f"stopping. Lower optim.lr, check the data, or resume from {ckpt_dir}")
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            now = time.perf_counter()
            state.elapsed_s += now - tick
            tok_s = tokens_since / max(now - tick, 1e-9)
            values = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm(engine),
                      "tokens_per_s": tok_s, "mfu": tok_s / d.world_size * objective.flops_per_token(model, seq_len) / peak,
                      "mem_gb": memory_gb(d.device), "tokens_seen": state.tokens_seen, "seq_len": seq_len,
                      "bad_steps": state.num_bad_steps, "elapsed_s": state.elapsed_s}
            if d.is_main:
                log.write("train", state.step, values)
                bar.print(f"step {state.step:>6}  loss {loss:.4f}  lr {values['lr']:.2e}  "
                          f"tok/s {tok_s:,.0f}  mfu {values['mfu']:.1%}")
            tick, tokens_since = time.perf_counter(), 0
        bar.update(state.step, f"loss {loss:.3f}")
        if objective.has_val() and t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            result.val_loss = objective.evaluate(engine, d, log, state.step, bar)
            tick = time.perf_counter()
        if rollouts is not None and state.step % t.rollout_every == 0:
            rollouts.run(engine, state.step, log, bar)
            tick = time.perf_counter()
        if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or time_due:
            result.checkpoint = checkpoint.save(engine, ckpt_dir, state, meta, t.keep_last)
            last_ckpt_time = tick = time.perf_counter()
            saved_at = state.step
    if objective.has_val():
        result.val_loss = objective.evaluate(engine, d, log, state.step, bar)
    if saved_at != state.step:
        result.checkpoint = checkpoint.save(engine, ckpt_dir, state, meta, t.keep_last)
    bar.close()
    if d.is_main:
        log.close()
        print(describe_end(result), flush=True)
    result.state = state
    return result


def train_step(engine, optimizer, micro_batches, seq_len: int, d: DistInfo, due_by_time: bool,
               objective) -> tuple[float, bool, bool, torch.Tensor | None]:
    """One optimizer step. -> (global mean loss, skipped for NaN/inf, checkpoint due by time,
    the objective's extras summed over micro-batches and ranks)."""
    losses, extra = [], torch.zeros(objective.extra_size, device=d.device)
    for i, micro in enumerate(micro_batches):
        loss, more = objective.micro_loss(engine, micro, seq_len, d.device)
        engine.backward(loss)
        losses.append(loss.detach().float())
        if more is not None:
            extra += more
        if i + 1 < len(micro_batches):
            engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-step
    loss_sum = torch.stack(losses).sum()
    finite = torch.isfinite(loss_sum)
    stats = torch.stack([torch.where(finite, loss_sum, 0.0), (~finite).float(), torch.tensor(float(due_by_time))]).to(d.device)
    stats = torch.cat([stats, extra.to(stats.device)])
    dist.all_reduce(stats)
    bad = bool(stats[1] > 0)
    optimizer.skip = bad
    engine.step()
    optimizer.skip = False
    loss = float(stats[0]) / (len(losses) * d.world_size) if not bad else math.nan
    return loss, bad, bool(stats[2] > 0), (stats[3:] if objective.extra_size else None)


class Rollouts:
    """Every train.rollout_every steps: rank 0 rolls out the fixed prompts through
    `amtrain.rollout.rollout_hook` (ZeRO-3: every rank gathers the parameters around it).
    Text into metrics.jsonl (kind "rollout") and TensorBoard text; MIDI/WAV files into
    out_dir/rollouts/step_N/ (the hook writes them)."""

    def __init__(self, cfg: RunConfig, meta: dict, d: DistInfo):
        from amtrain.tokens import get_tokenizer

        self.cfg, self.d = cfg, d
        self.tokenizer = get_tokenizer(meta["tokenizer"], **meta.get("tokenizer_params", {}))
        modality = modality_of(meta["tokenizer"])
        self.prompts = [modality.training_prompt(p) for p in cfg.train.rollout_prompts]

    def run(self, engine, step: int, log: MetricsLog | None, bar: Progress) -> None:
        from amtrain.train.rollouts import rollout_hook

        with gathered(engine):
            if self.d.is_main:
                out = rollout_hook(engine.module, self.prompts, tokenizer=self.tokenizer, step=step,
                                   run_dir=self.cfg.train.out_dir, length=self.cfg.train.rollout_length,
                                   seed=self.cfg.train.seed)
                values = {"prompts": [str(p) if not hasattr(p, "tolist") else "<tokens>" for p in self.prompts]}
                values |= {k: v for k, v in out.items() if k != "step"}
                log.write("rollout", step, values)
                for i, text in enumerate(out.get("texts", [])):
                    log.tb.add_text(f"rollout/prompt_{i}", text, step)
                bar.print(f"step {step:>6}  rollout: " + "; ".join(out.get("texts", out.get("files", [])))[:300])


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan


@torch.no_grad()
def evaluate(engine, batches, d: DistInfo, log: MetricsLog | None, step: int, bar: Progress, tokenizer: str = "") -> float:
    engine.eval()
    total = torch.zeros(2, device=d.device)
    for x, y in batches:
        _, loss = engine(x.to(d.device), y.to(d.device))
        total += torch.stack([loss.float(), torch.ones((), device=d.device)])
    dist.all_reduce(total)
    engine.train()
    val_loss = float(total[0] / total[1])
    if d.is_main:
        values = {"val_loss": val_loss, "val_bpt": val_loss / math.log(2), **modality_of(tokenizer).val_metrics(val_loss)}
        log.write("val", step, values)
        bar.print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return val_loss


# ---------------------------------------------------------------- builders: the only readers of cfg

def build_dataset(cfg: RunConfig, d: DistInfo) -> Dataset:
    """The configured dataset; the bundled default is prepped (gpt2) on first use by rank 0."""
    path = cfg.data.resolved_path()
    if not cfg.data.path and not (DEFAULT_DATA / "manifest.json").is_file():
        if d.is_main:
            from amtrain.prep.text import prep_text

            print(f"preparing the bundled corpus {DEFAULT_TEXT.name} (gpt2) into {DEFAULT_DATA} ...", flush=True)
            prep_text([str(DEFAULT_TEXT)], DEFAULT_DATA, tokenizer="gpt2", show_progress=False)
        dist.barrier()
    if not path.is_dir():
        raise UserError(f"data.path {path}: no such folder; make a dataset with `amtrain prep-text` or point --data at one")
    return Dataset(path)


def build_model(cfg: RunConfig, dataset: Dataset):
    """The configured family at its named size; the family's objective fixes what the data
    decides (vocabulary, context), `model.overrides` the rest."""
    fam = family(cfg.model.arch)
    data_fields = fam.objective_cls().model_fields(cfg, dataset)
    model_cfg = fam.config(cfg.model.size, **{**data_fields, **cfg.model.overrides})
    fam.objective_cls().check_model(cfg, model_cfg)
    return fam.build(model_cfg)


def build_ds_config(cfg: RunConfig, plan: BatchPlan, precision: str, resume: ResumePoint | None) -> dict:
    path = cfg.resolved_ds_config()
    ds = resolve_ds_config(load_ds_config(path), cfg, plan, precision, ds_name=str(path))
    if resume is not None and resume.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def check_same_model(resume: ResumePoint, model_cfg: dict) -> None:
    saved = resume.meta["model"]
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in model_cfg.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"{resume.folder}: the checkpoint's model differs from this run config's ({', '.join(diff)}); "
                        f"resume with the checkpoint's model settings or start a new train.out_dir")


def build_val(cfg: RunConfig, dataset: Dataset, plan: BatchPlan, d: DistInfo):
    if not cfg.data.val_split or not dataset.shards(cfg.data.val_split) or cfg.train.eval_batches == 0:
        return []
    return val_batches(dataset, cfg.data.val_split, cfg.data.seq_len, plan.micro_batch, cfg.train.eval_batches,
                       d.rank, d.world_size)


def describe_start(cfg: RunConfig, d: DistInfo, plan: BatchPlan, model, resume: ResumePoint | None, state: RunState) -> str:
    where = f"resuming from {resume.folder} at step {state.step}" + (" (universal: world size changed)" if resume.universal else "") if resume else "starting fresh"
    return (f"amtrain: {cfg.model.size} {cfg.model.arch}, {model.num_params():,} params; {d.world_size} rank(s) on {d.device} ({d.backend}); "
            f"batch {plan.micro_batch} x {plan.grad_accum} accum x {plan.world_size} ranks x {plan.seq_len} tokens = "
            f"{plan.tokens_per_step:,} tokens/step; {cfg.train.max_steps} steps; run dir {cfg.train.out_dir}; {where}")


def describe_end(result: RunResult) -> str:
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    return (f"done: step {result.state.step}, {result.state.tokens_seen:,} tokens{val}\n"
            f"checkpoint: {result.checkpoint}\n"
            f"sample from it: python -m amtrain sample {result.run_dir} --prompt \"In the beginning\"")
