"""transformers folders: `export_hf` (amtrain model -> a folder `AutoModelFor*.from_pretrained`
loads with no custom code) and `import_hf` (such a folder -> an amtrain export folder).

    OUT/ (export_hf)
      config.json              the transformers config (model_type, architectures, shapes) and
                               "amtrain": arch, model fields, tokenizer + id layout, run meta
      model.safetensors        fp32 weights under the transformers family's names
      generation_config.json   end-of-text id, padded vocabulary rows suppressed
      tokenizer.json, vocab.json, merges.txt, tokenizer_config.json   (gpt2 datasets)
      README.md                the family mapping and, for MIDI / audio / ascii ids, the id layout

Which transformers family each amtrain family becomes is its registry entry's "hf" adapter
(`amtrain.hf.decoder`, `amtrain.hf.t5`); a family without one (the LSTM) is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amtrain.errors import UserError
from amtrain.fileio import atomic_target, write_bytes_atomic, write_json_atomic
from amtrain.hf.common import check_local_folder, require_transformers
from amtrain.hf.tokenizer import id_layout, readme, write_gpt2_files
from amtrain.models.base import SequenceModel
from amtrain.registry import family, family_names, family_of

AMTRAIN_KEY = "amtrain"


def hf_families() -> list[str]:
    return [n for n in family_names() if "hf" in family(n).adapters]


def export_hf(model: SequenceModel, meta: dict, out: str | Path) -> Path:
    """Write `model` (with its export meta: tokenizer, step, ...) as a transformers folder."""
    require_transformers()
    from safetensors.torch import save_file

    fam = family_of(model)
    if "hf" not in fam.adapters:
        raise UserError(f"arch {fam.name!r}: no transformers family computes it, so --format hf cannot export it; "
                        f"families with a transformers form: {', '.join(hf_families())}")
    w = fam.adapter("hf").to_hf(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = id_layout(meta["tokenizer"], meta.get("tokenizer_params", {})) if "tokenizer" in meta else None
    files = []
    with atomic_target(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in w.state.items()}, str(tmp), metadata={"format": "pt"})
    suppress = set(w.suppress_ids)
    if layout is not None and fam.left_to_right:  # FIM sentinels above the tokenizer's ids: never generated
        suppress |= set(range(layout["vocab_size"], model.cfg.vocab_size))
    gen = {"suppress_tokens": sorted(suppress) or None, "do_sample": False}
    if layout is not None:
        gen |= {"eos_token_id": layout["eot_id"], "bos_token_id": layout["eot_id"]}
        if hasattr(w.config, "decoder_start_token_id") and w.config.is_encoder_decoder:
            gen["decoder_start_token_id"] = w.config.decoder_start_token_id
        if layout["tokenizer"] == "gpt2":
            files = write_gpt2_files(out)
    write_json_atomic(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    architecture = (w.config.architectures or [type(w.config).__name__])[0]
    note = readme(w.config.model_type, architecture, layout) if layout else ""
    if note and not files:
        write_bytes_atomic(out / "README.md", note.encode())
    config = w.config.to_dict()
    config[AMTRAIN_KEY] = {"arch": fam.name, "model": _fields(model), **(layout or {}),
                           "meta": {k: v for k, v in meta.items() if k not in ("tokenizer", "tokenizer_params")}}
    write_json_atomic(out / "config.json", config)
    return out


def _fields(model: SequenceModel) -> dict:
    from dataclasses import asdict

    return asdict(model.cfg)


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state |= load_file(str(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():  # never unpickled: tensors only
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{folder / 'pytorch_model.bin'}: not a plain tensor checkpoint ({type(e).__name__}); "
                            "convert it to model.safetensors") from None
    raise UserError(f"{folder}: no model.safetensors (or pytorch_model.bin) beside config.json")


def import_hf(path: str | Path, out: str | Path, tokenizer: str | None = None,
              tokenizer_params: dict | None = None) -> tuple[Path, SequenceModel, dict]:
    """A local transformers folder -> an amtrain export folder (`save_pretrained`'s) that
    `sample`, `rollout` and `--train.init_from` take. The tokenizer: the folder's "amtrain"
    record (an amtrain export), else `tokenizer`, else guessed from the vocabulary size (50257:
    gpt2, 55028: midi)."""
    from amtrain.models.io import save_pretrained
    from amtrain.tokens import get_tokenizer

    folder = check_local_folder(path)
    where = str(folder / "config.json")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    model_type = config.get("model_type")
    owners = {t: n for n in hf_families() for t in family(n).adapter("hf").model_types}
    if model_type not in owners:
        raise UserError(f"{where}: model_type {model_type!r} is not importable; amtrain imports "
                        f"{', '.join(sorted(owners))}")
    ours = config.get(AMTRAIN_KEY) or {}
    model = family(owners[model_type]).adapter("hf").from_hf(config, _read_state(folder), where, ours)
    meta = dict(ours.get("meta", {}))
    if tokenizer:
        meta |= {"tokenizer": tokenizer, "tokenizer_params": tokenizer_params or {}}
    elif "tokenizer" in ours:
        meta |= {"tokenizer": ours["tokenizer"], "tokenizer_params": ours.get("tokenizer_params", {})}
    else:
        guess = {50257: "gpt2", 55028: "midi"}.get(model.cfg.vocab_size)
        if guess is None:
            raise UserError(f"{where}: cannot tell the vocabulary of {model.cfg.vocab_size} ids; pass --tokenizer "
                            "(gpt2, midi, audio, ascii, ...)")
        meta |= {"tokenizer": guess, "tokenizer_params": {}}
    tok = get_tokenizer(meta["tokenizer"], **meta["tokenizer_params"])
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"--tokenizer {meta['tokenizer']}: {tok.vocab_size} ids, more than the model's "
                        f"{model.cfg.vocab_size}; pick the tokenizer the checkpoint was trained with")
    meta |= {"source": str(folder.resolve()), "imported_from": model_type}
    meta.setdefault("step", 0)
    return save_pretrained(model, out, meta), model, meta
