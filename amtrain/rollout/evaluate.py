"""`amtrain evaluate RUN --out DIR`: generate samples and measure them against held-out data of
the run's dataset (docs/evaluation.md).

    DIR/samples/sample_<i>.{txt,mid,wav} + .npy   what the modality's `write_tape` writes
    DIR/samples_metadata.json                     run, dataset, options; per sample its prompt,
                                                  seed, files, tokens and seconds
    DIR/evaluation_results.json                   held-out loss / bits per token; the samples'
                                                  and held-out excerpts' statistics and their
                                                  comparison (`amtrain.evaluate.sets`); audio:
                                                  prep-audio's chunk features of the WAVs
    DIR/histograms.png, per_sample.png, pianoroll_<i>.png

Samples are unconditional where the modality can start a document from nothing
(`Modality.start_tape`: a left-to-right model's document start), else continue held-out
openings (`Modality.document_prompt` of split document `seed + i`); only what generation
added is measured (`Modality.generated_part`). Held-out excerpts: the openings of up to
`heldout_docs` documents of the split, cut to the samples' longest id count.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic
from amtrain.modalities import RolloutConfig, RolloutModel


@dataclass
class EvalOptions:
    samples: int = 8
    length: int = 256
    """New tokens per sample."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    heldout_docs: int = 32
    """Held-out documents whose openings the samples are compared with."""
    loss_tokens: int = 16384
    """Held-out tokens the loss is measured on (left-to-right models)."""
    pianorolls: int = 4
    data: str | None = None
    """Dataset folder (default: the one the checkpoint records)."""
    split: str | None = None
    """Held-out split (default: the run's data.val_split, else val)."""
    progress: bool = True

    def __post_init__(self):
        if self.samples < 1 or self.length < 1 or self.heldout_docs < 1:
            raise UserError("--samples, --length and --heldout-docs must be positive")


def _dataset(rm: RolloutModel, opts: EvalOptions):
    from amtrain.rollout.defaults import _val_split
    from amtrain.store import Dataset

    data = opts.data or rm.meta.get("data")
    if not data:
        raise UserError(f"{rm.path}: records no dataset (meta \"data\"); pass --data DIR (the dataset it was trained on)")
    if not (Path(data) / "manifest.json").is_file():
        raise UserError(f"{data}: no dataset here (manifest.json missing); pass --data DIR")
    dataset = Dataset(data)
    if dataset.manifest.tokenizer != rm.meta["tokenizer"]:
        raise UserError(f"{data}: a dataset of {dataset.manifest.tokenizer} ids, but {rm.path} models "
                        f"{rm.meta['tokenizer']} ids; pass the dataset it was trained on with --data")
    split = opts.split or _val_split(rm.path)
    if not dataset.manifest.splits.get(split, {}).get("docs", 0):
        raise UserError(f"{data}: no '{split}' documents; pass --split with one of {', '.join(dataset.manifest.splits)}")
    return dataset, split


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def generate_samples(rm: RolloutModel, docs: list, opts: EvalOptions, log=print) -> list[dict]:
    """-> one dict per sample: tape, generated (ids measured), prompt (a line), seed, seconds."""
    modality = rm.modality
    cfg = RolloutConfig(length=opts.length, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                        seed=opts.seed)
    start = modality.start_tape(rm)
    out = []
    with _progress(opts.progress) as bar:
        task = bar.add_task("samples", total=opts.samples)
        for i in range(opts.samples):
            if start is not None:
                tape, line = start, "unconditional (the document start)"
            else:
                index = (opts.seed + i) % len(docs)
                prompt, _, part = modality.document_prompt(rm, docs[index], cfg)
                tape, line = modality.continuation_tape(rm, prompt), f"held-out document {index}, {part}"
            t0 = time.perf_counter()
            result = modality.continue_tape(rm, tape, cfg, 1, seed_offset=i)[0]
            seconds = time.perf_counter() - t0
            generated = modality.tape_ids(rm, result if start is not None else modality.generated_part(rm, tape, result))
            out.append({"tape": result, "ids": generated, "prompt": line, "seed": opts.seed + i, "seconds": seconds})
            bar.advance(task)
    return out


def evaluate(run: str | Path, out: str | Path, opts: EvalOptions, codec=None, device: str = "cpu",
             log=print, rm: RolloutModel | None = None) -> dict:
    """Generate, write and measure; -> the evaluation results (also DIR/evaluation_results.json).
    `rm`: the run already loaded."""
    from amtrain.evaluate import plots
    from amtrain.evaluate.heldout import excerpts, heldout_loss
    from amtrain.evaluate.sets import compare_sets, flat, set_stats
    from amtrain.rollout.load import load_rollout_model

    out = Path(out)
    rm = rm or load_rollout_model(run, device=device)
    if rm.modality.needs_codec and codec is None:
        raise UserError(f"{run}: an audio model; pass --codec-path (the EnCodec weights its data was prepped with)")
    dataset, split = _dataset(rm, opts)
    docs = list(dataset.documents(split))
    log(f"held-out: {len(docs)} '{split}' documents of {dataset.folder}")
    t0 = time.perf_counter()
    samples = generate_samples(rm, docs, opts, log)
    gen_seconds = time.perf_counter() - t0
    files = []
    for i, s in enumerate(samples):
        s["files"] = [str(p) for p in rm.modality.write_tape(rm, s["tape"], out / "samples" / f"sample_{i}", codec)]
        files += s["files"]
    tok = rm.tokenizer
    layout = rm.modality.span_layout(tok)  # excerpts end on whole units (a MIDI triple, an audio step)
    length = max(len(s["ids"]) for s in samples)
    length = layout.offset + -(-(length - layout.offset) // layout.unit) * layout.unit
    held = excerpts(docs, length, opts.heldout_docs)
    sample_stats = set_stats(rm.modality, tok, [s["ids"] for s in samples])
    held_stats = set_stats(rm.modality, tok, held)
    comparison = compare_sets(sample_stats, held_stats)
    loss: dict = {"loss": None, "bits_per_token": None, "tokens": 0}
    if rm.family.left_to_right:
        loss = heldout_loss(rm.model, dataset, split, min(rm.context, 1024), opts.loss_tokens)
        loss |= rm.modality.val_metrics(loss["loss"]) if loss["tokens"] else {}
    else:
        loss["note"] = "a denoiser: its held-out loss is the run's val_loss (metrics.jsonl)"
    audio = _audio_features(rm, dataset, split, samples, codec) if rm.modality.priority_scores and codec else None
    results = {"run": str(run), "dataset": str(dataset.folder), "split": split, "units": sample_stats.units,
               "heldout_loss": loss, "samples": flat(sample_stats), "heldout": flat(held_stats),
               "heldout_excerpts": len(held), "excerpt_ids": length, "comparison": comparison}
    if audio is not None:
        results["audio_chunk_features"] = audio
    pngs = [p for p in (plots.plot_histograms(comparison, audio, out / "histograms.png"),
                        plots.plot_per_item(comparison, out / "per_sample.png")) if p is not None]
    pngs += _pianorolls(rm, samples, out, opts.pianorolls)
    results["pngs"] = [str(p) for p in pngs]
    meta = {"run": str(run), "family": rm.family.name, "modality": rm.modality.name, "dataset": str(dataset.folder),
            "split": split, "device": device, "options": asdict(opts), "generation_seconds": round(gen_seconds, 3),
            "samples": [{"index": i, "prompt": s["prompt"], "seed": s["seed"], "files": s["files"],
                         "ids": int(len(s["ids"])), "seconds": round(s["seconds"], 3),
                         "ids_per_s": round(len(s["ids"]) / max(s["seconds"], 1e-9), 1)}
                        for i, s in enumerate(samples)]}
    write_bytes_atomic(out / "samples_metadata.json", json.dumps(meta, indent=1).encode())
    write_bytes_atomic(out / "evaluation_results.json", json.dumps(_clean(results), indent=1).encode())
    return results


def _audio_features(rm: RolloutModel, dataset, split: str, samples: list[dict], codec) -> dict:
    from amtrain.evaluate.audio import compare_features, heldout_chunk_features, wave_chunk_features

    extra = dataset.manifest.extra
    chunk = int(extra.get("chunk_frames") or round(5.0 * codec.frame_rate))
    per: dict[str, list] = {}
    for s in samples:
        grid = rm.modality.codes(rm.tokenizer, s["ids"])
        if grid is None or not grid.shape[1]:
            continue
        feats = wave_chunk_features(codec.decode(grid), codec.sample_rate, codec.hop_length, chunk)
        for k, v in feats.items():
            per.setdefault(k, []).append(v)
    mine = {k: np.concatenate(v) for k, v in per.items()}
    return compare_features(mine, heldout_chunk_features(dataset.folder, extra.get("scores_dir", "scores"), split))


def _pianorolls(rm: RolloutModel, samples: list[dict], out: Path, count: int) -> list[Path]:
    from amtrain.midi.pianoroll import plot_notes

    files = []
    for i, s in enumerate(samples[:count]):
        notes = rm.modality.notes(rm.tokenizer, s["ids"])
        if notes is None:
            break
        files.append(plot_notes(notes, out / f"pianoroll_{i}.png", title=f"sample {i}: {s['prompt']}"))
    return files


def _clean(x):
    """JSON without NaN: nan -> null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x

