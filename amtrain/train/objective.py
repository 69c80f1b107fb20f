"""Training objectives: everything in training that differs between model families.

The trainer (`amtrain.train.trainer.Trainer`) owns the engine, the step's all-reduce, the
cadences, logging and checkpoints, and knows no family. A family's spec names its objective
(`amtrain.registry.ModelFamily.objective`); the objective says what an example is and how long,
what a micro-batch and its loss are, what the run records about it, how validation goes and
what it must checkpoint. `Objective` below is the protocol; two implement it:

    LMObjective       decoder, LSTM (and any left-to-right LM): windows from `TrainLoader`
                      (fill-in-the-middle examples at data.fim_rate), causal LM loss,
                      sequence-length warm-up, val loss (+ the modality's val metrics)
    DenoiseObjective  T5: `DenoisingLoader` batches whose mixture and difficulty a `Curriculum`
                      decides every step; per-task losses feed the curriculum; val loss per
                      task (R/X/S) and exact match of reconstructed spans

The trainer calls, for optimizer step `s` (0-based):

    objective.seq_len_at(s)                        # tokens per example (tokens seen, MFU)
    micro = objective.micro_batches(s)             # this rank's grad_accum micro-batches
    loss, extra = objective.loss(engine, m, device)    # per micro-batch; extra: extra_size sums
    ... one all-reduce of [loss, bad, checkpoint-due, *sum(extra)] ...
    records = objective.after_step(s, reduced_extra, bad)  # {kind: values} for metrics.jsonl

then keeps `objective.loader.state_dict()` (the data position, RunState.loader) and
`objective.state_dict()` (RunState.objective) after every step, and calls `evaluate` on the
validation cadence.

Determinism of the denoising objective: its loader reseeds the batcher from (seed, step, rank)
at the start of every step, so its draws are a function of the step (checkpointed through the
step itself); the curriculum's state (levels, loss windows, pending events) is saved in
RunState.objective. All ranks observe the same all-reduced per-task losses, so they make the
same decision; a resumed run decides and draws exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from amtrain.config import BatchPlan, RunConfig, batch_plan
from amtrain.data.checks import checked_tokens, unusable_split
from amtrain.data.curriculum import Curriculum, CurriculumConfig, Decision
from amtrain.data.fim import FimSpec
from amtrain.data.loader import TrainLoader, check_vocab, val_batches
from amtrain.data.span_corruption import (
    TASKS,
    DenoisingBatch,
    DenoisingBatcher,
    DenoisingLoader,
    T5Vocab,
    required_targets_length,
    span_exact_match,
)
from amtrain.errors import UserError
from amtrain.models.t5 import per_example_loss
from amtrain.registry import modality_of
from amtrain.store import Dataset
from amtrain.tokens import IGNORE_INDEX, get_tokenizer
from amtrain.train.engine import gathered

if TYPE_CHECKING:
    from amtrain.modalities import Modality

VAL_SEED = 1_000_003  # the held-out denoising batches' stream, apart from every training step


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Objective(Protocol):
    """What the trainer asks of a family's objective. A new family either names an existing
    objective (`LMObjective` for a left-to-right LM whose `forward(idx, targets)` returns
    `(logits, loss)`) or implements this protocol and names its class in its `ModelFamily`."""

    plan: BatchPlan
    """The batch arithmetic (`amtrain.config.batch_plan`) at this objective's example length."""
    loader: Stateful
    """The data stream; its `state_dict()` is the checkpoint's data position (RunState.loader)."""
    extra_size: int
    """Length of the vector `loss` returns beside the loss, summed over micro-batches and ranks
    in the step's all-reduce and handed to `after_step` (0: none)."""

    @classmethod
    def model_fields(cls, cfg: RunConfig, dataset: Dataset) -> dict[str, Any]:
        """Model config fields the data fixes (vocabulary, context); model.overrides win."""
        ...

    @classmethod
    def check_model(cls, cfg: RunConfig, model_cfg) -> None:
        """Refuse a model config the run cannot train (a `UserError` naming the key)."""
        ...

    @classmethod
    def build(cls, cfg: RunConfig, dataset: Dataset, rank: int, world_size: int) -> Objective:
        """The objective of a run: the only place it reads the config."""
        ...

    def seq_len_at(self, step: int) -> int:
        """Tokens per example at optimizer step `step` (0-based)."""
        ...

    def micro_batches(self, step: int) -> list:
        """This rank's grad_accum micro-batches of optimizer step `step` (0-based)."""
        ...

    def loss(self, engine, micro, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss of a micro-batch to backpropagate, its extra sums (extra_size,) or None)."""
        ...

    def after_step(self, step: int, extra: torch.Tensor | None, bad: bool) -> dict[str, dict]:
        """After the update of step `step`, with the extras summed over the step and all ranks
        (`bad`: the step was skipped for a NaN/inf loss). -> metrics records by kind."""
        ...

    def flops_per_token(self, model, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward), for MFU; `model` is the run's model
        on the meta device (`amtrain.train.builders.build_shape`): shapes, no values."""
        ...

    def run_meta(self) -> dict:
        """What checkpoints record about the objective, beside the model (read by export and
        rollouts)."""
        ...

    def has_val(self) -> bool: ...

    def evaluate(self, engine, device: torch.device) -> dict[str, float]:
        """Validation on every rank (collective): {"val_loss", "val_bpt", ...}, the same on all."""
        ...

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the step and the data position (RunState.objective)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------- causal LM


class LMObjective:
    """Causal LM on fixed windows: the decoder's and the LSTM's objective. Windows are cut to
    the step's length during the sequence-length warm-up (`data.seq_len_warmup_steps`); a share
    `data.fim_rate` of them are fill-in-the-middle examples (`amtrain.data.fim`)."""

    extra_size = 0

    @staticmethod
    def fim_spec(cfg: RunConfig, dataset: Dataset) -> FimSpec | None:
        """The run's FIM layout: sentinels above the dataset's vocabulary, the tokenizer's end id
        closing a middle, cuts on the modality's units (`Modality.span_layout`); None at rate 0."""
        if cfg.data.fim_rate == 0:
            return None
        manifest = dataset.manifest
        tok = get_tokenizer(manifest.tokenizer, **manifest.tokenizer_params)
        layout = modality_of(manifest.tokenizer).span_layout(tok)
        return FimSpec(cfg.data.fim_rate, cfg.data.fim_spm_rate, dataset.vocab_size, tok.eot_id, layout.unit,
                       layout.offset, layout.inside_documents)

    @classmethod
    def model_fields(cls, cfg: RunConfig, dataset: Dataset) -> dict:
        """The vocabulary (the dataset's, + 3 FIM sentinels when data.fim_rate > 0, or a larger
        model.vocab_size) and the context (data.seq_len; model.overrides may raise it)."""
        fim = cls.fim_spec(cfg, dataset)
        need = fim.vocab_size if fim is not None else dataset.vocab_size
        vocab = cfg.model.vocab_size or need
        check_vocab(dataset, vocab)
        if vocab < need:
            raise UserError(f"config model.vocab_size = {vocab}: data.fim_rate > 0 puts three sentinels above the "
                            f"dataset's {dataset.vocab_size} ids; use at least {need} or leave it unset")
        return {"vocab_size": vocab, "max_seq_len": cfg.data.seq_len}

    @classmethod
    def check_model(cls, cfg: RunConfig, model_cfg) -> None:
        if model_cfg.max_seq_len < cfg.data.seq_len:
            raise UserError(f"config data.seq_len = {cfg.data.seq_len} exceeds model.overrides.max_seq_len = "
                            f"{model_cfg.max_seq_len}")

    @classmethod
    def build(cls, cfg: RunConfig, dataset: Dataset, rank: int, world_size: int) -> LMObjective:
        data = cfg.data
        plan = batch_plan(cfg.batch, data.seq_len, world_size)
        fim = cls.fim_spec(cfg, dataset)
        loader = TrainLoader(dataset, data.split, data.seq_len, plan.micro_batch, plan.grad_accum, rank, world_size,
                             cfg.train.seed, fim)
        val = []
        if data.val_split and cfg.train.eval_batches and unusable_split(dataset, data.val_split) is None:
            val = val_batches(dataset, data.val_split, data.seq_len, plan.micro_batch, cfg.train.eval_batches,
                              rank, world_size)
        modality = modality_of(dataset.manifest.tokenizer)
        rate = None
        if val:  # symbolic music: bits per second of music (amtrain.modalities.music)
            from amtrain.modalities.music import val_tokens_per_second

            rate = val_tokens_per_second(dataset, data.val_split, data.seq_len,
                                         len(val) * plan.micro_batch * world_size, modality)
        return cls(plan, loader, val, modality, data.seq_len_at, fim, tokens_per_second=rate)

    def __init__(self, plan: BatchPlan, loader: TrainLoader, val: list[tuple[torch.Tensor, torch.Tensor]],
                 modality: Modality, seq_len_schedule: Callable[[int], int], fim: FimSpec | None = None,
                 tokens_per_second: float | None = None):
        """`seq_len_schedule(step)`: window length at a step (`DataConfig.seq_len_at`); `fim`:
        the loader's FIM layout, recorded as the run's meta["fim"] (export, rollouts);
        `tokens_per_second`: of the music the validation windows hold (symbolic music only),
        for `bits_per_second`."""
        self.plan, self.loader, self.val, self.modality = plan, loader, val, modality
        self.seq_len_schedule, self.fim, self.tokens_per_second = seq_len_schedule, fim, tokens_per_second

    def seq_len_at(self, step: int) -> int:
        return self.seq_len_schedule(step)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.loader.next_step(self.seq_len_at(step))  # [(x (B, T), y (B, T)), ...]

    def loss(self, engine, micro, device: torch.device) -> tuple[torch.Tensor, None]:
        x, y = micro
        _, loss = engine(x.to(device), y.to(device))
        return loss, None

    def after_step(self, step: int, extra: torch.Tensor | None, bad: bool) -> dict[str, dict]:
        return {}

    def flops_per_token(self, model, seq_len: int) -> float:
        return model.flops_per_token(seq_len)

    def run_meta(self) -> dict:
        return {"fim": self.fim.meta()} if self.fim is not None else {}

    def has_val(self) -> bool:
        return bool(self.val)

    @torch.no_grad()
    def evaluate(self, engine, device: torch.device) -> dict[str, float]:
        """Mean loss over the fixed validation micro-batches of all ranks."""
        engine.eval()
        total = torch.zeros(2, device=device)
        for x, y in self.val:
            _, loss = engine(x.to(device), y.to(device))
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        dist.all_reduce(total)
        engine.train()
        val_loss = float(total[0] / total[1])
        music = {"bits_per_second": val_loss / math.log(2) * self.tokens_per_second} if self.tokens_per_second else {}
        return {"val_loss": val_loss, "val_bpt": val_loss / math.log(2), **self.modality.val_metrics(val_loss), **music}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------- T5 denoising


def denoise_unit(tokenizer: str, params: dict, unit: int | None, unit_offset: int | None) -> tuple[int, int, bool]:
    """(unit, unit_offset, windows inside documents): the modality's span layout
    (`Modality.span_layout`: text 1 in a packed stream, MIDI 3 after the AMT flag, audio K after
    each chunk's <eot>), with denoise.unit / denoise.unit_offset where set."""
    layout = modality_of(tokenizer).span_layout(get_tokenizer(tokenizer, **params))
    return (unit if unit is not None else layout.unit, unit_offset if unit_offset is not None else layout.offset,
            layout.inside_documents or unit is not None and unit > 1)


def denoising_batcher(dataset: Dataset, split: str, vocab: T5Vocab, inputs_length: int, targets_length: int,
                      unit: int, unit_offset: int, inside: bool, priority_temperature: float | None = None
                      ) -> DenoisingBatcher:
    """Batches of a split: windows inside documents or across the packed stream (`inside`);
    with a `priority_temperature`, documents drawn by prep-audio's priority scores
    (`amtrain.data.priority.PrioritySampler`), else uniform over all windows."""
    from amtrain.data.priority import PrioritySampler, chunk_priorities

    if not dataset.shards(split):
        raise UserError(f"{dataset.folder}: no '{split}' split; set data.split to one the dataset has")
    if priority_temperature is not None and not modality_of(dataset.manifest.tokenizer).priority_scores:
        raise UserError(f"config denoise.priority: {dataset.folder} is a {dataset.manifest.tokenizer} "
                        f"dataset; priority sampling needs an audio dataset made by `amtrain prep-audio`")
    starts = [dataset.doc_starts(r) for r in dataset.shards(split)] if inside else None
    try:
        sampler = None
        if priority_temperature is not None:
            sampler = PrioritySampler(chunk_priorities(dataset.folder, split), priority_temperature)
        return DenoisingBatcher(checked_tokens(dataset, split), vocab, inputs_length, targets_length, unit=unit,
                                doc_starts=starts, unit_offset=unit_offset, document_sampler=sampler)
    except ValueError as e:
        raise UserError(f"{dataset.folder} ({split}): {e}") from None


def greedy_targets(model, t: dict[str, torch.Tensor], max_new_tokens: int, eos_id: int) -> np.ndarray:
    """(B, n) greedy decode of a batch's targets (no decoder start token): the one call into
    generation."""
    from amtrain.generate.loop import t5_generate

    out = t5_generate(model, t["input_ids"], max_new_tokens, temperature=0, eos_id=eos_id,
                      attention_mask=t["attention_mask"])
    return out.cpu().numpy()


class DenoiseObjective:
    """T5 span corruption / UL2 denoisers with a curriculum (module doc)."""

    extra_size = 2 * len(TASKS)  # per task (R, X, S): sum of per-example mean losses, number of examples

    @staticmethod
    def t5_vocab(cfg: RunConfig, dataset: Dataset) -> T5Vocab:
        """The T5 id layout of a run: specials and sentinels above the dataset's vocabulary."""
        if cfg.model.vocab_size is not None:
            raise UserError("config model.vocab_size: a t5 model's vocabulary is the dataset's plus the T5 specials "
                            "and sentinels (denoise.num_sentinels); leave model.vocab_size unset")
        return T5Vocab(dataset.vocab_size, cfg.denoise.num_sentinels)

    @classmethod
    def model_fields(cls, cfg: RunConfig, dataset: Dataset) -> dict:
        v = cls.t5_vocab(cfg, dataset)
        return {"vocab_size": v.size, "pad_token_id": v.pad_id, "decoder_start_token_id": v.pad_id}

    @classmethod
    def check_model(cls, cfg: RunConfig, model_cfg) -> None:
        pass

    @classmethod
    def build(cls, cfg: RunConfig, dataset: Dataset, rank: int, world_size: int) -> DenoiseObjective:
        den, manifest = cfg.denoise, dataset.manifest
        vocab = cls.t5_vocab(cfg, dataset)
        curriculum = den.curriculum_config()
        unit, unit_offset, inside = denoise_unit(manifest.tokenizer, manifest.tokenizer_params, den.unit, den.unit_offset)
        try:
            targets_length = required_targets_length(den.inputs_length, curriculum.all_denoisers(), unit)
        except ValueError as e:
            raise UserError(f"config denoise.inputs_length = {den.inputs_length}: {e}") from None
        plan = batch_plan(cfg.batch, den.inputs_length + targets_length, world_size)

        def batcher(split: str, priority_temperature: float | None = None) -> DenoisingBatcher:
            return denoising_batcher(dataset, split, vocab, den.inputs_length, targets_length, unit, unit_offset,
                                     inside, priority_temperature)

        train = batcher(cfg.data.split, den.priority_temperature if den.priority else None)
        loader = DenoisingLoader(train, plan.micro_batch, plan.grad_accum, cfg.train.seed, rank)
        val = {}
        split = cfg.data.val_split
        if split and cfg.train.eval_batches and unusable_split(dataset, split) is None:
            held_out = batcher(split)
            try:
                val = fixed_val_batches(held_out, curriculum, plan.micro_batch, cfg.train.eval_batches,
                                        cfg.train.seed, rank)
            except ValueError as e:
                raise UserError(f"{dataset.folder} ({split}): {e}; lower denoise.inputs_length or set "
                                f"data.val_split ''") from None
        meta = {"inputs_length": den.inputs_length, "targets_length": targets_length, "unit": unit,
                "unit_offset": unit_offset, "num_sentinels": den.num_sentinels}
        return cls(plan, vocab, loader, Curriculum(curriculum), val, den.exact_match_batches, meta)

    def __init__(self, plan: BatchPlan, vocab: T5Vocab, loader: DenoisingLoader, curriculum: Curriculum,
                 val_batches: dict[str, list[DenoisingBatch]], exact_match_batches: int, meta: dict):
        """`meta`: inputs_length, targets_length, unit, unit_offset, num_sentinels, recorded as
        the run's meta["denoise"] (export, rollouts)."""
        self.plan, self.vocab, self.loader, self.curriculum = plan, vocab, loader, curriculum
        self.val_batches, self.exact_match_batches = val_batches, exact_match_batches
        self.meta = meta
        self.inputs_length, self.targets_length = meta["inputs_length"], meta["targets_length"]
        self.unit, self.unit_offset = meta["unit"], meta["unit_offset"]
        self.decision: Decision | None = None
        self.lengths: list[np.ndarray] = []  # (B, 2) real inputs, labelled targets of each micro-batch since flops_per_token

    # -- training --------------------------------------------------------------------------

    def seq_len_at(self, step: int) -> int:
        """Tokens per example (inputs + targets), the batch plan's unit of length."""
        return self.plan.seq_len

    def micro_batches(self, step: int) -> list[DenoisingBatch]:
        self.decision = self.curriculum.decide(step)
        try:
            return self.loader.next_step(step, self.decision.denoisers, self.decision.weights)
        except ValueError as e:
            raise UserError(f"denoising batch at step {step + 1}: {e}; lower denoise.inputs_length "
                            f"or the curriculum's hard densities") from None

    @staticmethod
    def tensors(batch: DenoisingBatch, device: torch.device) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(batch.input_ids).to(device),
                "attention_mask": torch.from_numpy(batch.attention_mask).to(device),
                "labels": torch.from_numpy(batch.labels).to(device)}

    def loss(self, engine, micro: DenoisingBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.lengths.append(np.stack([micro.attention_mask.sum(1), (micro.labels != IGNORE_INDEX).sum(1)], 1))
        t = self.tensors(micro, device)
        _, token_nll = engine(**t, return_logits=False, reduction="none")  # (B, T), 0 where ignored
        labelled = (t["labels"] != IGNORE_INDEX).sum()
        loss = token_nll.sum() / labelled.clamp(min=1)
        per_example = per_example_loss(token_nll.detach(), t["labels"]).float()  # (B,)
        task_ids = torch.from_numpy(micro.task_ids).to(device)
        extra = torch.zeros(self.extra_size, device=device)
        for k in range(len(TASKS)):
            sel = task_ids == k
            extra[k] = per_example[sel].sum()
            extra[len(TASKS) + k] = sel.sum()
        return loss, extra

    def after_step(self, step: int, extra: torch.Tensor, bad: bool) -> dict[str, dict]:
        """Feed the all-reduced per-task losses to the curriculum; the step's decision record."""
        n = len(TASKS)
        losses = {task: float(extra[k] / extra[n + k]) for k, task in enumerate(TASKS) if extra[n + k] > 0}
        if not bad:
            self.curriculum.observe(step, losses)
        assert self.decision is not None  # micro_batches(step) decided before the step ran
        record = {k: v for k, v in self.decision.as_dict().items() if k != "step"}
        record.update({f"{task}/loss": v for task, v in losses.items()})
        return {"curriculum": record}

    def flops_per_token(self, model, seq_len: int) -> float:
        """Useful FLOPs per token slot (inputs_length + targets_length) of the examples this rank
        trained since the last call: each example's real inputs and labelled targets
        (`T5.flops_per_example`); padded slots are no work (the LM head skips them too)."""
        lengths = np.concatenate(self.lengths).astype(np.float64)  # (N, 2)
        self.lengths = []
        return float(model.flops_per_example(lengths[:, 0], lengths[:, 1]).sum()) / (len(lengths) * seq_len)

    def run_meta(self) -> dict:
        return {"denoise": dict(self.meta)}

    def state_dict(self) -> dict:
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "curriculum" not in state:
            raise UserError("checkpoint holds no curriculum state (made by a decoder run?); resume a T5 run "
                            "from a T5 checkpoint")
        self.curriculum.load_state_dict(state["curriculum"])

    # -- validation ------------------------------------------------------------------------

    def has_val(self) -> bool:
        return bool(self.val_batches)

    @torch.no_grad()
    def evaluate(self, engine, device: torch.device) -> dict[str, float]:
        """Loss per task over the fixed batches (token-weighted, all ranks) and exact match of
        reconstructed spans (greedy decode) on the first `exact_match_batches` of R and X."""
        n = len(TASKS)
        totals = torch.zeros(2 * n + 2, device=device)  # nll sum, tokens per task; hits, spans
        engine.eval()
        for k, task in enumerate(TASKS):
            for batch in self.val_batches[task]:
                t = self.tensors(batch, device)
                _, token_nll = engine(**t, return_logits=False, reduction="none")  # (B, T)
                totals[k] += token_nll.float().sum()
                totals[n + k] += (t["labels"] != IGNORE_INDEX).sum()
        with gathered(engine):
            for task in ("R", "X"):
                for batch in self.val_batches[task][: self.exact_match_batches]:
                    pred = greedy_targets(engine.module, self.tensors(batch, device), self.targets_length,
                                          self.vocab.eos_id)  # (B, n)
                    for row, labels in zip(pred, batch.labels, strict=True):
                        hits, spans = span_exact_match(row, labels, self.vocab)
                        totals[2 * n] += hits
                        totals[2 * n + 1] += spans
        engine.train()
        dist.all_reduce(totals)
        val_loss = float(totals[:n].sum() / totals[n:2 * n].sum())
        values = {"val_loss": val_loss, "val_bpt": val_loss / math.log(2)}
        values |= {f"val_loss/{task}": float(totals[k] / totals[n + k]) for k, task in enumerate(TASKS)}
        if self.exact_match_batches:
            values["exact_match"] = float(totals[2 * n] / totals[2 * n + 1].clamp(min=1))
            values["num_spans"] = int(totals[2 * n + 1])
        return values


def fixed_val_batches(batcher: DenoisingBatcher, curriculum: CurriculumConfig, micro_batch: int, num_batches: int,
                      seed: int, rank: int) -> dict[str, list[DenoisingBatch]]:
    """Fixed held-out batches per task: the task's denoiser at the curriculum's initial level,
    `num_batches` micro-batches per rank, drawn from a seed apart from every training step."""
    out = {}
    for k, task in enumerate(TASKS):
        denoiser = curriculum.ranges[task].at(task, curriculum.initial_level)
        batcher.rng = np.random.default_rng([seed, VAL_SEED, k, rank])
        out[task] = [batcher.batch(micro_batch, [denoiser]) for _ in range(num_batches)]
    return out
