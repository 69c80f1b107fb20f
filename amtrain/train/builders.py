"""The pieces of a training run, built from the config: the only readers of `RunConfig` in
training (with each objective's `build`). `Trainer.__init__` calls them in order, one a line.

Every family-specific answer comes from the family's objective (`amtrain.train.objective`),
found through the registry (`family(cfg.model.arch).objective_cls()`); modality questions go to
`amtrain.registry.modality_of(tokenizer)`.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist

from amtrain.config import DEFAULT_DATA, DEFAULT_TEXT, BatchPlan, RunConfig
from amtrain.data.checks import unusable_split
from amtrain.errors import UserError
from amtrain.registry import family, family_of, modality_of
from amtrain.store import Dataset
from amtrain.train.checkpoint import ResumePoint, find_resume
from amtrain.train.engine import DistInfo, load_ds_config, resolve_ds_config, zero_stage
from amtrain.train.objective import Objective


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
    if cfg.train.init_from:  # fine-tuning: the export's config and weights (amtrain export / import-hf)
        from amtrain.train.export import init_model_from

        return init_model_from(cfg, dataset, data_fields)
    model_cfg = fam.config(cfg.model.size, **{**data_fields, **cfg.model.overrides})
    fam.objective_cls().check_model(cfg, model_cfg)
    return fam.build(model_cfg)


def build_shape(model):
    """The model again on the meta device (no memory, no draws from the RNG): parameter counts
    and FLOPs come from it, since ZeRO-3 leaves the real model's tensors empty on every rank."""
    with torch.device("meta"):
        return family_of(model).build(model.cfg)


def build_objective(cfg: RunConfig, dataset: Dataset, d: DistInfo) -> Objective:
    """The family's objective for this rank; it fixes the example length, hence the batch plan.
    A validation split it cannot evaluate on (missing or empty) is said in one line (rank 0)."""
    split = cfg.data.val_split
    why = unusable_split(dataset, split) if split and cfg.train.eval_batches else None
    if why and d.is_main:
        print(f"warning: no validation: {why}; prep the data with a validation share, or set data.val_split '' "
              f"to train without one", file=sys.stderr, flush=True)
    return family(cfg.model.arch).objective_cls().build(cfg, dataset, d.rank, d.world_size)


def build_resume(cfg: RunConfig, d: DistInfo, model) -> ResumePoint | None:
    """The checkpoint to resume from (train.resume), refused if it holds another model."""
    shards = cfg.train.ep_size if zero_stage(load_ds_config(cfg.resolved_ds_config())) in (1, 2) else 1
    resume = find_resume(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints", d.world_size, shards)
    if resume is not None:
        check_same_model(resume, model.cfg)
    return resume


def check_same_model(resume: ResumePoint, model_cfg) -> None:
    # a field the checkpoint predates has its default there (e.g. the MoE / MLA fields)
    saved = {**{f.name: f.default for f in fields(model_cfg) if f.default is not MISSING}, **resume.meta["model"]}
    model_cfg = asdict(model_cfg)
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in model_cfg.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"{resume.folder}: the checkpoint's model differs from this run config's ({', '.join(diff)}); "
                        f"resume with the checkpoint's model settings or start a new train.out_dir")


def build_ds_config(cfg: RunConfig, plan: BatchPlan, precision: str, resume: ResumePoint | None) -> dict:
    path = cfg.resolved_ds_config()
    ds = resolve_ds_config(load_ds_config(path), cfg, plan, precision, ds_name=str(path))
    if resume is not None and resume.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def build_meta(cfg: RunConfig, model, dataset: Dataset, ds_config: dict, objective: Objective) -> dict:
    """What every checkpoint records beside the run state (export and rollouts read it)."""
    return {"zero_stage": zero_stage(ds_config), "model": asdict(model.cfg), "data": str(dataset.folder),
            "tokenizer": dataset.manifest.tokenizer, "tokenizer_params": dataset.manifest.tokenizer_params,
            "config": cfg.to_dict(), **objective.run_meta()}


def build_codec(cfg: RunConfig, dataset: Dataset):
    """The audio codec of rollouts during training (train.codec_path), at the data's sample rate
    and checked to be the one the data was prepped with; None when unset or the modality has no
    codec."""
    if not (cfg.train.codec_path and modality_of(dataset.manifest.tokenizer).needs_codec):
        return None
    from amtrain.codec import load_codec

    extra = dataset.manifest.extra
    try:
        codec = load_codec(cfg.train.codec_path, f"{extra.get('sample_rate', 24000) // 1000}khz")
    except UserError as e:
        raise UserError(f"train.codec_path: {e}") from None
    if extra.get("codec_id", codec.codec_id) != codec.codec_id:
        raise UserError(f"train.codec_path {cfg.train.codec_path} is codec {codec.codec_id}, but {dataset.folder} was "
                        f"prepped with {extra['codec_id']}; point train.codec_path at that codec's weights")
    return codec


def build_rollout_prompts(cfg: RunConfig, dataset: Dataset) -> tuple[object, list]:
    """(tokenizer, prompts) of the rollouts during training, as the dataset's modality reads
    `train.rollout_prompts`."""
    from amtrain.tokens import get_tokenizer

    manifest = dataset.manifest
    modality = modality_of(manifest.tokenizer)
    return (get_tokenizer(manifest.tokenizer, **manifest.tokenizer_params),
            [modality.training_prompt(p) for p in cfg.train.rollout_prompts])
