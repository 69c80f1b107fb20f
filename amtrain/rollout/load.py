"""What a rollout needs from a checkpoint: the model, its tokenizer and the modality.

`load_rollout_model(path)` takes an `amtrain export` / `save_pretrained` folder (decoder, lstm or
t5) or a training run / checkpoint folder (through `amtrain.train.export.load_any`, the resolver
`amtrain sample` uses) and returns a `RolloutModel`. The modality comes from the tokenizer
recorded in the checkpoint's meta ("tokenizer", "tokenizer_params"):

    gpt2, ascii -> text      midi -> midi      audio -> audio      anything else -> tokens

A T5 checkpoint's sentinels sit above the tokenizer's vocabulary (`T5Vocab`); the number of
sentinels is read back from the model's vocab_size (base + PAD, EOS, 3 mode ids + sentinels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from amtrain.errors import UserError

MODALITIES = {"gpt2": "text", "ascii": "text", "midi": "midi", "audio": "audio"}


@dataclass
class RolloutModel:
    model: nn.Module
    meta: dict
    tokenizer: object  # amtrain.tokens.Tokenizer
    arch: str  # "decoder" | "lstm" | "t5"
    modality: str  # "text" | "midi" | "audio" | "tokens"
    path: Path

    @property
    def is_t5(self) -> bool:
        return self.arch == "t5"

    def t5_vocab(self):
        """The T5 id layout of this checkpoint (only for arch t5)."""
        from amtrain.data.span_corruption import NUM_SPECIALS, T5Vocab

        base = self.tokenizer.vocab_size
        return T5Vocab(base, self.model.cfg.vocab_size - base - NUM_SPECIALS)

    @property
    def base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def register_t5() -> None:
    """Make "arch": "t5" loadable: amtrain.models.t5 registers itself when imported."""
    import amtrain.models.t5  # noqa: F401


def load_rollout_model(path: str | Path, device: str = "cpu") -> RolloutModel:
    register_t5()
    from amtrain.models.io import CONFIG, arch_of, load_pretrained
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
    arch = arch_of(model)
    rm = RolloutModel(model.eval(), meta, tok, arch, MODALITIES.get(meta["tokenizer"], "tokens"), p)
    _check_vocab(rm)
    return rm


def _check_vocab(rm: RolloutModel) -> None:
    need = rm.tokenizer.vocab_size
    have = rm.model.cfg.vocab_size
    if rm.is_t5:
        from amtrain.data.span_corruption import NUM_SPECIALS

        need += NUM_SPECIALS + 1
    if have < need:
        raise UserError(f"{rm.path}: the model's vocab_size {have} is smaller than tokenizer "
                        f"{rm.meta['tokenizer']!r} needs ({need}); the checkpoint's meta names the wrong tokenizer")
