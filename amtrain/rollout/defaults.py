"""What `amtrain rollout` takes when not told: the checkpoint, the prompt and the output folder.

    CKPT      the run folder under ./runs whose latest complete checkpoint was saved last
              (its amtrain_state.json "time")
    --prompt  a held-out document of the checkpoint's dataset (meta "data"; the run's
              data.val_split, else "val"): document `seed mod number of documents`, cut by the
              modality (`Modality.document_prompt`: text in-filling gets prefix <gap> suffix)
    --out     RUN/rollouts/<mode>_<n> (the first n not taken); an export folder's own rollouts/

Each choice is said in one line, so the run can be repeated with the values spelled out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from amtrain.errors import UserError
from amtrain.modalities import RolloutConfig, RolloutModel
from amtrain.train.checkpoint import STATE_FILE, latest_checkpoint, resolve_checkpoint

RUNS = Path("runs")


def newest_run(root: Path = RUNS) -> tuple[Path, str]:
    """(the run folder under `root` whose latest complete checkpoint is the newest, a line
    saying so)."""
    found = []
    for run in sorted(root.iterdir()) if root.is_dir() else []:
        ckpt = latest_checkpoint(run / "checkpoints") if run.is_dir() else None
        saved = _saved_at(ckpt) if ckpt is not None else None
        if saved is not None:
            found.append((saved, run, ckpt))
    if not found:
        raise UserError(f"{root}/: no run with a complete checkpoint here; pass CKPT (an export, run or checkpoint "
                        f"folder), or train one first: deepspeed launchers/train.py --ds_config ds_configs/zero2.json")
    saved, run, ckpt = max(found, key=lambda f: f[0])
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved))
    return run, f"checkpoint: {ckpt} (the newest run under {root}/, saved {when})"


def _saved_at(ckpt: Path) -> float | None:
    try:
        return float(json.loads((ckpt / STATE_FILE).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged checkpoint is not offered; loading it would say why


def heldout_prompt(rm: RolloutModel, cfg: RolloutConfig) -> tuple[Any, Any, str]:
    """(prompt, the original it was cut from, a line naming the document and the cut)."""
    from amtrain.store import Dataset

    data = rm.meta.get("data")
    if not data:
        raise UserError(f"{rm.path}: records no dataset (meta \"data\"); pass --prompt FILE")
    if not (Path(data) / "manifest.json").is_file():
        raise UserError(f"{data}: the checkpoint's dataset is not there any more; pass --prompt FILE")
    split = _val_split(rm.path)
    dataset = Dataset(data)
    num_docs = dataset.manifest.splits.get(split, {}).get("docs", 0)
    if not num_docs:
        raise UserError(f"{data}: no '{split}' documents to take a prompt from; pass --prompt FILE")
    docs = list(dataset.documents(split))  # memmap views: nothing is read until used
    index = _long_enough(docs, (cfg.seed or 0) % num_docs)
    prompt, original, part = rm.modality.document_prompt(rm, docs[index], cfg)
    return prompt, original, f"prompt: {split} document {index} of {num_docs} in {data}, {part}"


MIN_PROMPT_IDS = 32  # a shorter document (a title line) leaves no room for a gap worth filling


def _long_enough(docs: list, start: int) -> int:
    """The first document from `start` on (wrapping) with at least MIN_PROMPT_IDS ids; the longest
    if none is."""
    for k in range(len(docs)):
        i = (start + k) % len(docs)
        if len(docs[i]) >= MIN_PROMPT_IDS:
            return i
    return max(range(len(docs)), key=lambda i: len(docs[i]))


def _val_split(path: Path) -> str:
    """The run's data.val_split when `path` is a run or checkpoint folder, else "val"."""
    try:
        meta = json.loads((resolve_checkpoint(path) / STATE_FILE).read_text())
    except (UserError, OSError, ValueError):
        return "val"
    return meta.get("config", {}).get("data", {}).get("val_split") or "val"


def default_out(ckpt: Path, mode: str) -> Path:
    """RUN/rollouts/<mode>_<n>: the run of a run or checkpoint folder, or the export folder."""
    folder = Path(ckpt)
    if folder.is_file():  # a file of an export folder
        folder = folder.parent
    if (folder / STATE_FILE).is_file():  # RUN/checkpoints/step_N
        folder = folder.parent.parent
    n = 0
    while (folder / "rollouts" / f"{mode}_{n}").exists():
        n += 1
    return folder / "rollouts" / f"{mode}_{n}"
