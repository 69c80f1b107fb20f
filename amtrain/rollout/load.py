"""What a rollout needs from a checkpoint: `load_rollout_model(path) -> RolloutModel`.

Takes an `amtrain export` / `save_pretrained` folder or a training run / checkpoint folder
(through `amtrain.train.export.load_any`, the resolver `amtrain sample` uses). The family comes
from the model (`amtrain.registry.family_of`), the modality from the tokenizer recorded in the
checkpoint's meta ("tokenizer", "tokenizer_params") through `amtrain.registry.modality_of`.
A denoiser's sentinels sit above the tokenizer's vocabulary (`RolloutModel.t5_vocab`).
"""

from __future__ import annotations

from pathlib import Path

from amtrain.errors import UserError
from amtrain.modalities import RolloutModel
from amtrain.registry import family_of, modality_of


def load_rollout_model(path: str | Path, device: str = "cpu") -> RolloutModel:
    from amtrain.models.io import CONFIG, load_pretrained
    from amtrain.tokens import get_tokenizer

    p = Path(path)
    if (p / CONFIG).is_file() or (p.is_file() and p.parent.joinpath(CONFIG).is_file()):
        model, meta = load_pretrained(p, map_location=device)
    else:
        if not p.exists():
            raise UserError(f"{p}: no such checkpoint; pass an `amtrain export` folder, a run folder "
                            "or a checkpoint folder")
        from amtrain.train.export import load_any

        model, meta = load_any(p)
        model = model.to(device)
    if "tokenizer" not in meta:
        raise UserError(f"{p}: no tokenizer recorded in config.json; re-export it with `amtrain export` "
                        "(or pass meta={'tokenizer': ..., 'tokenizer_params': ...} to save_pretrained)")
    tok = get_tokenizer(meta["tokenizer"], **meta.get("tokenizer_params", {}))
    rm = RolloutModel(model.eval(), meta, tok, family_of(model), modality_of(meta["tokenizer"]), p)
    _check_vocab(rm)
    return rm


def _check_vocab(rm: RolloutModel) -> None:
    need = rm.tokenizer.vocab_size
    have = rm.model.cfg.vocab_size
    if not rm.family.left_to_right:
        from amtrain.data.span_corruption import NUM_SPECIALS

        need += NUM_SPECIALS + 1
    if have < need:
        raise UserError(f"{rm.path}: the model's vocab_size {have} is smaller than tokenizer "
                        f"{rm.meta['tokenizer']!r} needs ({need}); the checkpoint's meta names the wrong tokenizer")
