"""Checkpoints -> plain models: consolidate DeepSpeed (ZeRO) shards into one fp32 state dict and
build the Decoder from the config recorded in the checkpoint, without a DeepSpeed engine.

`export_checkpoint(ckpt, out)` writes `save_pretrained`'s folder (model.safetensors + config.json
with the tokenizer, step and source recorded), loadable by `amtrain.models.io.load_pretrained`.
`load_any(path)` takes an export folder, a run folder or a checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from amtrain.errors import UserError
from amtrain.train.checkpoint import consolidated_state_dict, read_meta, resolve_checkpoint


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, dict]:
    """A run or checkpoint folder -> (Decoder in eval mode with the consolidated fp32 weights, meta)."""
    from amtrain.models.decoder import Decoder, DecoderConfig

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    model = Decoder(DecoderConfig(**meta["model"]))
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed.weight
    if missing or unexpected:
        raise UserError(f"{folder}: checkpoint weights do not fit the recorded model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    info = {"tokenizer": meta["tokenizer"], "tokenizer_params": meta.get("tokenizer_params", {}),
            "step": meta["run_state"]["step"], "tokens_seen": meta["run_state"]["tokens_seen"],
            "source_checkpoint": str(folder.resolve()), "data": meta.get("data", "")}
    return model.eval(), info


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    from amtrain.models.io import save_pretrained

    model, meta = load_checkpoint_model(ckpt)
    return save_pretrained(model, out, meta)


def load_any(path: str | Path) -> tuple[nn.Module, dict]:
    """An export folder (config.json + model.safetensors) or a run / checkpoint folder."""
    from amtrain.models.io import CONFIG, load_pretrained

    p = Path(path)
    if (p / CONFIG).is_file() or (p.is_file() and p.suffix == ".safetensors"):
        return load_pretrained(p)
    if not p.exists():
        raise UserError(f"{p}: no such folder; pass an `amtrain export` folder, a run folder or a checkpoint folder")
    return load_checkpoint_model(p)
