"""Training objectives: what one micro-batch is and what its loss is, for the loop in
`amtrain.train.loop` (which owns the engine, the all-reduce, logging and checkpoints).

    LMObjective       decoder / LSTM: windows from `TrainLoader`, causal LM loss, val loss
    DenoiseObjective  T5: `DenoisingBatcher` batches whose mixture and difficulty a `Curriculum`
                      decides every step; per-task losses feed the curriculum; val loss per
                      task (R/X/S) and exact match of reconstructed spans

The loop calls, per optimizer step `s` (0-based):

    micro = objective.next_step(s)                 # this rank's grad_accum micro-batches
    loss, extra = objective.micro_loss(engine, m, seq_len, device)   # per micro-batch
    ... one all-reduce of [loss, bad, checkpoint-due, *sum(extra)] ...
    record = objective.after_step(s, reduced_extra, bad)   # e.g. the curriculum's decision

and `state_dict()` after every step (kept in the checkpoint's RunState), `evaluate(...)` on
the validation cadence. `extra_size` is the length of the per-step extra vector (0 for LM).

Determinism of the T5 objective: the batcher's generator is reseeded from (seed, step, rank)
at the start of every step, so its RNG state is a function of the step (checkpointed through
the step itself); the curriculum's state (levels, loss windows, pending events) is saved in
RunState.objective. All ranks observe the same all-reduced per-task losses, so they make the
same decision; a resumed run decides and draws exactly as the uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from amtrain.data.loader import TrainLoader
from amtrain.errors import UserError
from amtrain.tokens import IGNORE_INDEX

VAL_SEED = 1_000_003  # the held-out denoising batches' stream, apart from every training step


class LMObjective:
    """Causal LM on fixed windows: the decoder's and the LSTM's objective."""

    extra_size = 0

    def __init__(self, loader: TrainLoader, val: list, tokenizer: str):
        self.loader, self.val, self.tokenizer = loader, val, tokenizer

    def next_step(self, step: int) -> list:
        return self.loader.next_step()

    def micro_loss(self, engine, micro, seq_len: int, device) -> tuple[torch.Tensor, None]:
        x, y = micro
        x, y = x[:, :seq_len].to(device), y[:, :seq_len].to(device)  # (B, T)
        _, loss = engine(x, y)
        return loss, None

    def after_step(self, step: int, extra: torch.Tensor | None, bad: bool) -> dict | None:
        return None

    def flops_per_token(self, model, seq_len: int) -> float:
        return model.flops_per_token(seq_len)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def loader_state(self) -> dict:
        return self.loader.state_dict()

    def load_loader_state(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def has_val(self) -> bool:
        return bool(self.val)

    def evaluate(self, engine, d, log, step: int, bar) -> float:
        from amtrain.train.loop import evaluate

        return evaluate(engine, self.val, d, log, step, bar, self.tokenizer)


# ---------------------------------------------------------------- T5 denoising


def denoise_unit(tokenizer: str, params: dict, unit: int | None, unit_offset: int | None) -> tuple[int, int, bool]:
    """(unit, unit_offset, windows inside documents) for a dataset's tokenizer: text 1 (packed
    stream), MIDI 3 with offset 1 (the AMT sequence flag), audio K with offset 1 (one frame of K
    codebooks; the <eot> before every chunk)."""
    if tokenizer == "midi":
        default, offset, inside = 3, 1, True
    elif tokenizer == "audio":
        from amtrain.tokens import get_tokenizer

        tok = get_tokenizer("audio", **params)
        default, offset, inside = int(tok.tokens_per_step), 1, True  # prep-audio: <eot> opens each chunk
    else:
        default, offset, inside = 1, 0, False
    return (unit if unit is not None else default, unit_offset if unit_offset is not None else offset,
            inside or unit is not None and unit > 1)


def _make_batcher(arrays, doc_starts, vocab, inputs_length, targets_length, unit, unit_offset, priorities=None,
                  temperature: float = 1.0):
    from amtrain.data.span_corruption import DenoisingBatcher

    if priorities is None:
        return DenoisingBatcher(arrays, vocab, inputs_length, targets_length, unit=unit,
                                doc_starts=doc_starts, unit_offset=unit_offset)

    class _Priority(DenoisingBatcher):
        """Chunks from documents drawn with P ∝ priority (amtrain.data.priority), a uniform
        valid window inside the drawn document (documents too short for the chunk redraw)."""

        def __init__(self, *a, probs, **kw):
            super().__init__(*a, **kw)
            self.probs = probs

        def choose_document(self, length: int) -> tuple[int, int]:
            """(document, its number of valid windows of `length`), P(document) ∝ priority
            among the documents long enough."""
            counts = np.maximum((self._doc_length - length) // self.unit + 1, 0)
            p = self.probs * (counts > 0)
            if p.sum() == 0:
                raise ValueError(f"no document holds a chunk of {length} tokens; lower denoise.inputs_length")
            doc = int(self.rng.choice(len(p), p=p / p.sum()))
            return doc, int(counts[doc])

        def _chunk(self, length: int) -> np.ndarray:
            doc, num_windows = self.choose_document(length)
            k = int(self.rng.integers(num_windows))
            start = int(self._doc_begin[doc]) + k * self.unit
            return np.asarray(self.arrays[self._doc_array[doc]][start:start + length])

    from amtrain.data.priority import chunk_probabilities

    return _Priority(arrays, vocab, inputs_length, targets_length, unit=unit, doc_starts=doc_starts,
                     unit_offset=unit_offset, probs=chunk_probabilities(priorities, temperature))


class DenoiseObjective:
    """T5 span corruption / UL2 denoisers with a curriculum (module doc)."""

    def __init__(self, cfg, dataset, vocab, rank: int, world_size: int):
        from amtrain.data.curriculum import Curriculum
        from amtrain.data.span_corruption import TASKS, required_targets_length

        den = cfg.denoise
        self.tasks = TASKS
        self.vocab = vocab
        self.curriculum_cfg = den.curriculum_config()
        self.curriculum = Curriculum(self.curriculum_cfg)
        manifest = dataset.manifest
        self.unit, self.unit_offset, inside = denoise_unit(manifest.tokenizer, manifest.tokenizer_params,
                                                           den.unit, den.unit_offset)
        self.inputs_length = den.inputs_length
        try:
            self.targets_length = required_targets_length(den.inputs_length, self.curriculum_cfg.all_denoisers(), self.unit)
        except ValueError as e:
            raise UserError(f"config denoise.inputs_length = {den.inputs_length}: {e}") from None
        self.micro_batch = cfg.batch.micro_batch
        self.grad_accum = 1  # set by the loop from the batch plan (which needs seq_len first)
        self.rank, self.seed = rank, cfg.train.seed
        self.priority_temperature = den.priority_temperature
        self.batcher = self._batcher(dataset, cfg.data.split, inside, den.priority)
        self.val_batches = self._val_batches(cfg, dataset, inside, world_size)
        self.exact_match_batches = den.exact_match_batches
        self.decision = None

    @property
    def seq_len(self) -> int:
        """Tokens per example (inputs + targets): the batch plan's unit of length."""
        return self.inputs_length + self.targets_length

    extra_size = 6  # per task (R, X, S): sum of per-example mean losses, number of examples

    def _batcher(self, dataset, split: str, inside: bool, priority: bool):
        records = dataset.shards(split)
        if not records:
            raise UserError(f"{dataset.folder}: no '{split}' split; set data.split to one the dataset has")
        arrays = dataset.tokens(split)
        starts = [dataset.doc_starts(r) for r in records] if inside else None
        priorities = None
        if priority:
            if dataset.manifest.tokenizer != "audio":
                raise UserError(f"config denoise.priority: {dataset.folder} is a {dataset.manifest.tokenizer} "
                                f"dataset; priority sampling needs an audio dataset made by `amtrain prep-audio`")
            from amtrain.data.priority import chunk_priorities

            priorities = chunk_priorities(dataset.folder, split)
        try:
            return _make_batcher(arrays, starts, self.vocab, self.inputs_length, self.targets_length,
                                 self.unit, self.unit_offset, priorities, self.priority_temperature)
        except ValueError as e:
            raise UserError(f"{dataset.folder} ({split}): {e}") from None

    # -- training --------------------------------------------------------------------------

    def next_step(self, step: int) -> list:
        self.decision = self.curriculum.decide(step)
        self.batcher.rng = np.random.default_rng([self.seed, step, self.rank])
        try:
            return [self.batcher.batch(self.micro_batch, self.decision.denoisers, self.decision.weights)
                    for _ in range(self.grad_accum)]
        except ValueError as e:
            raise UserError(f"denoising batch at step {step + 1}: {e}; lower denoise.inputs_length "
                            f"or the curriculum's hard densities") from None

    @staticmethod
    def tensors(batch, device) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(batch.input_ids).to(device),
                "attention_mask": torch.from_numpy(batch.attention_mask).to(device),
                "labels": torch.from_numpy(batch.labels).to(device)}

    def micro_loss(self, engine, micro, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        from amtrain.models.t5 import per_example_loss

        t = self.tensors(micro, device)
        _, token_nll = engine(**t, return_logits=False, reduction="none")  # (B, T), 0 where ignored
        labelled = (t["labels"] != IGNORE_INDEX).sum()
        loss = token_nll.sum() / labelled.clamp(min=1)
        per_example = per_example_loss(token_nll.detach(), t["labels"]).float()  # (B,)
        task_ids = torch.from_numpy(micro.task_ids).to(device)
        extra = torch.zeros(self.extra_size, device=device)
        for k in range(len(self.tasks)):
            sel = task_ids == k
            extra[k] = per_example[sel].sum()
            extra[len(self.tasks) + k] = sel.sum()
        return loss, extra

    def after_step(self, step: int, extra: torch.Tensor, bad: bool) -> dict:
        """Feed the all-reduced per-task losses to the curriculum; the step's record."""
        n = len(self.tasks)
        losses = {task: float(extra[k] / extra[n + k]) for k, task in enumerate(self.tasks) if extra[n + k] > 0}
        if not bad:
            self.curriculum.observe(step, losses)
        record = {k: v for k, v in self.decision.as_dict().items() if k != "step"}
        record.update({f"{task}/loss": v for task, v in losses.items()})
        return record

    def flops_per_token(self, model, seq_len: int) -> float:
        return model.flops_per_token(self.inputs_length, self.targets_length)

    def state_dict(self) -> dict:
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "curriculum" not in state:
            raise UserError("checkpoint holds no curriculum state (made by a decoder run?); resume a T5 run "
                            "from a T5 checkpoint")
        self.curriculum.load_state_dict(state["curriculum"])

    def loader_state(self) -> dict:
        return {}

    def load_loader_state(self, state: dict) -> None:
        pass

    # -- validation ------------------------------------------------------------------------

    def _val_batches(self, cfg, dataset, inside: bool, world_size: int) -> dict[str, list]:
        """Fixed held-out batches per task: the task's denoiser at the curriculum's initial
        level, `train.eval_batches` micro-batches per rank, drawn from a seed apart."""
        split = cfg.data.val_split
        if not split or not dataset.shards(split) or cfg.train.eval_batches == 0:
            return {}
        val = self._batcher(dataset, split, inside, priority=False)
        level = self.curriculum_cfg.initial_level
        out = {}
        for k, task in enumerate(self.tasks):
            denoiser = self.curriculum_cfg.ranges[task].at(task, level)
            val.rng = np.random.default_rng([self.seed, VAL_SEED, k, self.rank])
            try:
                out[task] = [val.batch(self.micro_batch, [denoiser]) for _ in range(cfg.train.eval_batches)]
            except ValueError as e:
                raise UserError(f"{dataset.folder} ({split}): {e}; lower denoise.inputs_length or set "
                                f"data.val_split ''") from None
        return out

    def has_val(self) -> bool:
        return bool(self.val_batches)

    @torch.no_grad()
    def evaluate(self, engine, d, log, step: int, bar) -> float:
        """Loss per task over the fixed batches (token-weighted, all ranks) and exact match of
        reconstructed spans (greedy decode) on the first `exact_match_batches` of R and X."""
        from amtrain.data.span_corruption import span_exact_match
        from amtrain.generate.loop import t5_generate

        n = len(self.tasks)
        totals = torch.zeros(2 * n + 2, device=d.device)  # nll sum, tokens per task; hits, spans
        engine.eval()
        for k, task in enumerate(self.tasks):
            for batch in self.val_batches[task]:
                t = self.tensors(batch, d.device)
                _, token_nll = engine(**t, return_logits=False, reduction="none")  # (B, T)
                totals[k] += token_nll.float().sum()
                totals[n + k] += (t["labels"] != IGNORE_INDEX).sum()
        with gathered(engine):
            model = engine.module
            for task in ("R", "X"):
                for batch in self.val_batches[task][: self.exact_match_batches]:
                    t = self.tensors(batch, d.device)
                    pred = t5_generate(model, t["input_ids"], self.targets_length, temperature=0,
                                       eos_id=self.vocab.eos_id, attention_mask=t["attention_mask"]).cpu().numpy()  # (B, n)
                    for row, labels in zip(pred, batch.labels, strict=True):
                        hits, spans = span_exact_match(row, labels, self.vocab)
                        totals[2 * n] += hits
                        totals[2 * n + 1] += spans
        engine.train()
        dist.all_reduce(totals)
        val_loss = float(totals[:n].sum() / totals[n:2 * n].sum())
        if d.is_main:
            values = {"val_loss": val_loss, "val_bpt": val_loss / math.log(2)}
            values |= {f"val_loss/{task}": float(totals[k] / totals[n + k]) for k, task in enumerate(self.tasks)}
            if self.exact_match_batches:
                values["exact_match"] = float(totals[2 * n] / totals[2 * n + 1].clamp(min=1))
                values["num_spans"] = int(totals[2 * n + 1])
            log.write("val", step, values)
            bar.print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return val_loss


class gathered:
    """ZeRO-3: every rank gathers the full parameters for the block and the ZeRO-3 module hooks
    are taken off meanwhile (DeepSpeed's `unwrap_model_for_generation`), so that a generate or a
    rollout run by some ranks only (rank 0's rollouts; early-stopping greedy decodes) issues no
    collective of its own. A no-op at other stages. Every rank must enter it."""

    def __init__(self, engine):
        self.engine = engine
        self.ctx = None

    def __enter__(self):
        if self.engine.zero_optimization_stage() == 3:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            self.ctx = unwrap_model_for_generation(self.engine)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
