"""Checkpoints -> plain models: consolidate DeepSpeed (ZeRO) shards into one fp32 state dict and
build the model (decoder, lstm or t5) from the config recorded in the checkpoint, without a DeepSpeed engine.

`export_checkpoint(ckpt, out)` writes `save_pretrained`'s folder (model.safetensors + config.json
with the tokenizer, step and source recorded), loadable by `amtrain.models.io.load_pretrained`.
`load_any(path)` takes an export folder, a run folder or a checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

from amtrain.errors import UserError
from amtrain.models.base import SequenceModel
from amtrain.registry import family, family_names
from amtrain.train.checkpoint import consolidated_state_dict, read_meta, resolve_checkpoint


def load_checkpoint_model(path: str | Path) -> tuple[SequenceModel, dict]:
    """A run or checkpoint folder -> (model in eval mode with the consolidated fp32 weights, meta).
    The model class comes from the run's model.arch through the family registry."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    arch = meta.get("config", {}).get("model", {}).get("arch", "decoder")
    if arch not in family_names():
        raise UserError(f"{folder}: unknown model.arch {arch!r} in the checkpoint; known: {', '.join(family_names())}")
    fam = family(arch)
    model = fam.build(fam.config_from_dict(meta["model"], str(folder)))
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]  # e.g. the decoder's lm_head.weight = embed.weight
    if missing or unexpected:
        raise UserError(f"{folder}: checkpoint weights do not fit the recorded model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    info = {"tokenizer": meta["tokenizer"], "tokenizer_params": meta.get("tokenizer_params", {}),
            "step": meta["run_state"]["step"], "tokens_seen": meta["run_state"]["tokens_seen"],
            "source_checkpoint": str(folder.resolve()), "data": meta.get("data", "")}
    if "denoise" in meta:  # T5: the span layout it was trained with (inputs/targets length, unit)
        info["denoise"] = meta["denoise"]
    if "fim" in meta:  # a left-to-right model trained to fill in the middle: its sentinel ids
        info["fim"] = meta["fim"]
    return model.eval(), info


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    from amtrain.models.io import save_pretrained

    model, meta = load_checkpoint_model(ckpt)
    return save_pretrained(model, out, meta)


def export_hf_folder(src: str | Path, out: str | Path) -> Path:
    """A run, checkpoint or export folder -> a transformers folder (`amtrain.hf.export_hf`)."""
    from amtrain.hf import export_hf

    model, meta = load_any(src)
    return export_hf(model, meta, out)


def load_any(path: str | Path) -> tuple[SequenceModel, dict]:
    """An export folder (config.json + model.safetensors) or a run / checkpoint folder."""
    from amtrain.models.io import CONFIG, load_pretrained

    p = Path(path)
    if (p / CONFIG).is_file() or (p.is_file() and p.suffix == ".safetensors"):
        return load_pretrained(p)
    if not p.exists():
        raise UserError(f"{p}: no such folder; pass an `amtrain export` folder, a run folder or a checkpoint folder")
    return load_checkpoint_model(p)


def init_model_from(cfg, dataset, data_fields: dict) -> SequenceModel:
    """The model of `train.init_from` (an export folder), checked against the run: same family
    (`model.arch`), same tokenizer as the dataset, a vocabulary and context the data fits in."""
    import dataclasses

    from amtrain.models.io import load_pretrained
    from amtrain.registry import family_of

    where = f"train.init_from {cfg.train.init_from}"
    if not Path(cfg.train.init_from).is_dir():
        raise UserError(f"{where}: no such folder; pass an `amtrain export` or `amtrain import-hf` folder")
    model, meta = load_pretrained(cfg.train.init_from)
    arch = family_of(model).name
    if arch != cfg.model.arch:
        raise UserError(f"{where}: a {arch} model but model.arch is {cfg.model.arch}; set --model.arch {arch}")
    if meta.get("tokenizer") not in (None, dataset.manifest.tokenizer):
        raise UserError(f"{where}: trained on {meta['tokenizer']} ids but the dataset {dataset.folder} holds "
                        f"{dataset.manifest.tokenizer} ids; fine-tune on data of the model's tokenizer")
    if data_fields.get("vocab_size", 0) > model.cfg.vocab_size:
        raise UserError(f"{where}: model vocab_size {model.cfg.vocab_size} < the {data_fields['vocab_size']} ids "
                        "the run needs (data.fim_rate > 0 adds 3 sentinels: set --data.fim_rate 0)")
    if cfg.model.overrides:
        fam = family_of(model)
        try:
            tuned = fam.build(dataclasses.replace(model.cfg, **cfg.model.overrides))
            tuned.load_state_dict(model.state_dict())
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{where}: model.overrides {cfg.model.overrides} do not fit the export's weights "
                            f"({str(e).splitlines()[0]}); only shape-free fields can change") from None
        model = tuned
    family_of(model).objective_cls().check_model(cfg, model.cfg)
    return model.train()
