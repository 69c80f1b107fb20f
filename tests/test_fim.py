"""Fill-in-the-middle: the window transform (PSM / SPM, sentinels above the vocabulary, units
whole on real MIDI), the loader (deterministic, world-size free, exact resume, warm-up lengths),
the objective (vocab + 3, the layout in the run's meta), FIM decoding (prefix and suffix kept,
the end id stops a middle, no sentinel ever sampled, cache = no cache), and the README's main
job followed by `amtrain rollout --mode infill` with nothing but defaults."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from amtrain.data.fim import FimSpec, FimWindows, legal_cuts, middle_start, permute
from amtrain.data.loader import TrainLoader
from amtrain.errors import UserError
from amtrain.rollout.load import load_rollout_model
from amtrain.rollout.run import RolloutConfig, read_prompt, rollout
from amtrain.store import Dataset
from tests.conftest import REPO
from tests.midi_helpers import SMALL_FILES
from tests.rollout_helpers import fim_decoder_ckpt

SPEC = FimSpec(rate=0.5, spm_rate=0.5, base_vocab_size=1000, end_id=999)


def midi_phase(ids: np.ndarray) -> np.ndarray:
    """Position of each MIDI id in its (time, duration, note) triple; -1 for specials."""
    from amtrain.tokens.midi import CONTROL_OFFSET, DUR_OFFSET, NOTE_OFFSET, SEPARATOR

    base = np.where(ids >= CONTROL_OFFSET, ids - CONTROL_OFFSET, ids)
    return np.where(ids >= SEPARATOR, -1, np.select([base < DUR_OFFSET, base < NOTE_OFFSET], [0, 1], 2))


# --------------------------------------------------------------------------- the transform
def test_psm_and_spm_layouts_keep_every_content_id():
    c = np.arange(10, 30)
    psm, spm = permute(c, 4, 9, 15, False, SPEC), permute(c, 4, 9, 15, True, SPEC)
    assert psm.tolist() == [1000, *range(10, 14), 1001, *range(19, 25), 1002, *range(14, 19), 999, *range(25, 30)]
    assert spm.tolist() == [1000, 1001, *range(19, 25), 1002, *range(10, 19), 999, *range(25, 30)]  # prefix+middle: one run
    assert len(psm) == len(spm) == len(c) + 4
    ms = middle_start(4, 9, 15)
    assert psm[ms:15 + 3].tolist() == spm[ms:15 + 3].tolist() == list(range(14, 19)) and psm[18] == spm[18] == 999
    assert SPEC.vocab_size == 1003 and (SPEC.prefix_id, SPEC.suffix_id, SPEC.middle_id) == (1000, 1001, 1002)
    assert FimSpec.from_meta(json.loads(json.dumps(SPEC.meta()))) == SPEC


def test_rate_order_and_determinism_per_window():
    fw = FimWindows(SPEC, seed=3)
    w = np.arange(100, 165)  # 65 ids: a 64-token window, 61 of content
    draws = [fw.draw(61, 0, i, 0, 0) for i in range(2000)]
    fim = [d for d in draws if d is not None]
    assert len(fim) / len(draws) == pytest.approx(0.5, abs=0.04)
    assert sum(d[3] for d in fim) / len(fim) == pytest.approx(0.5, abs=0.05)  # SPM share
    a, b, e = np.array([d[:3] for d in fim]).T
    assert ((0 <= a) & (a <= b) & (b <= e) & (e <= 61)).all()
    assert np.histogram(e + 3, bins=4, range=(3, 65))[0].min() > 180  # the end id sits anywhere: e uniform
    for i in range(200):
        out = fw.window(w, 0, i, 0, 0)
        assert np.array_equal(out, w) if draws[i] is None else np.array_equal(out, permute(w[:61], *draws[i], SPEC))
    again = [FimWindows(SPEC, seed=4).draw(61, 0, i, 0, 0) for i in range(50)]
    assert again != draws[:50] and [fw.draw(61, 1, i, 0, 0) for i in range(50)] != draws[:50]  # seed, epoch
    assert [fw.draw(61, 0, i, 0, 0) for i in range(50)] == draws[:50]  # (seed, epoch, window id) alone


def test_cuts_keep_units_whole_and_middles_inside_a_document():
    spec = FimSpec(1.0, 0.5, 1000, 999, unit=3, offset=1, inside_documents=True)
    docs = np.array([0, 10, 23, 31])  # flag + 3 triples, flag + 4, flag + 2 (+ 1 id), ...
    assert legal_cuts(12, 5, docs, 3, 1).tolist() == [2, 6, 9, 12]  # shard 7, 11, 14, 17 (10: a flag follows)
    fw = FimWindows(spec, 0, [docs])
    for i in range(300):
        start = i % 12
        a, b, e, _ = fw.draw(21, 0, i, 0, start)
        legal = {start + p for p in legal_cuts(21, start, docs, 3, 1)} | set(docs.tolist())
        assert start + a in legal - set(docs.tolist()) and start + b in legal and start + e in legal
        end = np.append(docs, 10**9)[np.searchsorted(docs, start + a, side="right")]
        assert start + b <= end and start + e <= end, (start, a, b, e)  # middle and suffix stay in a's document


def test_real_midi_windows_cut_whole_events(tmp_path):
    """prep-midi shards with the MIDI layout: every middle and suffix is whole (time, duration,
    note) triples, and the loader's FIM windows are these cuts."""
    from amtrain.data.loader import WindowIndex
    from amtrain.prep.midi import MidiPrepConfig, prep_midi
    from amtrain.train.objective import LMObjective
    from tests.train_helpers import from_args, tiny

    prep_midi([str(p) for p in SMALL_FILES], tmp_path / "midi", MidiPrepConfig(split="ratio", val_fraction=0.0,
                                                                                  test_fraction=0.0), show_progress=False)
    ds = Dataset(tmp_path / "midi")
    spec = LMObjective.fim_spec(from_args(tiny(tmp_path / "midi", tmp_path, **{"data.fim_rate": 1.0})), ds)
    assert (spec.unit, spec.offset, spec.inside_documents, spec.base_vocab_size) == (3, 1, True, ds.vocab_size)
    index = WindowIndex(ds, "train", 96)
    fw = TrainLoader(ds, "train", 96, 8, 1, 0, 1, 0, spec).fim
    pieces = []
    for i in range(len(index)):
        a, b, e, _ = fw.draw(93, 0, i, int(index.shard_of[i]), int(index.start_of[i]))
        c = index.window(i)[:93].astype(np.int64)
        pieces += [c[a:b], c[b:e]]
    assert sum(p.size > 0 for p in pieces) > 40
    for piece in pieces:
        phase = midi_phase(piece)
        assert piece.size % 3 == 0 and np.all((phase == np.arange(piece.size) % 3) | (phase == -1)), phase


# --------------------------------------------------------------------------- loader + objective
def _fim_loader(ds, rank=0, world=1, accum=1, seed=0, micro=4):
    return TrainLoader(ds, "train", 64, micro, accum, rank, world, seed, FimSpec(0.5, 0.5, ds.vocab_size, 50256))


def _rows(loader, length=None):
    return torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in loader.next_step(length)])


def test_loader_fim_is_world_size_free_and_resumes_exactly(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    single = _fim_loader(ds, accum=4, micro=2)
    ranks = [_fim_loader(ds, rank=r, world=2, accum=2, micro=2) for r in range(2)]
    seen_fim = False
    for _ in range(3):
        whole = _rows(single)
        assert torch.equal(torch.cat([_rows(r) for r in ranks]), whole)
        seen_fim |= bool((whole == 50259).any())
    assert seen_fim
    a = _fim_loader(ds, seed=5)
    for _ in range(3):
        _rows(a)
    b = _fim_loader(ds, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(_rows(a), _rows(b))
    plain = TrainLoader(ds, "train", 64, 4, 1, 0, 1, 5)
    plain.load_state_dict(b.state_dict())
    fim_rows, plain_rows = _rows(b), _rows(plain)
    kept = ~(fim_rows == 50257).any(1)  # windows left plain are the plain loader's
    assert kept.any() and not kept.all() and torch.equal(fim_rows[kept], plain_rows[kept])


def test_warmup_windows_are_fim_examples_of_their_own_length(kjv_gpt2):
    loader = _fim_loader(Dataset(kjv_gpt2), micro=16)
    rows = _rows(loader, length=16)
    assert rows.shape == (16, 17)
    fim = rows[(rows == 50257).any(1)]  # <fim_prefix> first, one <fim_middle>, then the end id
    assert len(fim) and (fim[:, 0] == 50257).all() and ((fim == 50259).sum(1) == 1).all()
    for row in fim.tolist():
        assert 50256 in row[row.index(50259):]


def test_objective_vocab_meta_and_errors(kjv_gpt2, tmp_path):
    from amtrain.train.objective import LMObjective
    from tests.train_helpers import from_args, tiny

    ds = Dataset(kjv_gpt2)
    cfg = from_args(tiny(kjv_gpt2, tmp_path, **{"data.fim_rate": 0.5, "data.fim_spm_rate": 1.0}))
    assert LMObjective.model_fields(cfg, ds)["vocab_size"] == 50260
    meta = LMObjective.build(cfg, ds, 0, 1).run_meta()["fim"]
    assert (meta["prefix_id"], meta["suffix_id"], meta["middle_id"], meta["end_id"]) == (50257, 50258, 50259, 50256)
    assert FimSpec.from_meta(meta).spm_at_inference
    plain = from_args(tiny(kjv_gpt2, tmp_path, **{"data.fim_rate": 0}))
    assert LMObjective.model_fields(plain, ds)["vocab_size"] == 50257 and LMObjective.build(plain, ds, 0, 1).run_meta() == {}
    with pytest.raises(UserError, match=r"model.vocab_size = 50258: data.fim_rate > 0 .* at least 50260"):
        LMObjective.model_fields(from_args(tiny(kjv_gpt2, tmp_path, **{"data.fim_rate": 0.5, "model.vocab_size": 50258})), ds)
    for key, value, match in (("data.fim_rate", 1.5, "data.fim_rate: 1.5 must lie in"),
                              ("data.fim_spm_rate", -0.1, "data.fim_spm_rate"),
                              ("data.seq_len", 4, "at least 8 tokens")):
        with pytest.raises(UserError, match=match):
            from_args(tiny(kjv_gpt2, tmp_path, **{"data.fim_rate": 0.5, key: value}))


# --------------------------------------------------------------------------- decoding
def _biased(rm, ids: list[int], bias: float = 1e4):
    """The rollout model's decoder with `bias` added to the logits of `ids`."""
    orig = rm.model.forward

    def forward(idx, targets=None, cache=None, last_only=False):
        logits, loss = orig(idx, targets, cache, last_only)
        logits = logits.clone()
        logits[..., ids] += bias
        return logits, loss

    rm.model.forward = forward
    return rm


def _prompt(folder, text):
    p = folder / "prompt.txt"
    p.write_text(text)
    return p


def test_text_infill_keeps_prefix_and_suffix_and_cache_matches(tmp_path):
    rm = load_rollout_model(fim_decoder_ckpt(tmp_path / "m", "ascii"))
    assert rm.modality.can_infill(rm) and rm.fim.middle_id == 260
    cfg = RolloutConfig(mode="infill", num_samples=3, seed=2, length=12, top_k=50)
    segs = read_prompt(rm, _prompt(tmp_path, "And God said, Let there be<gap> and there was light."), cfg)
    out = rollout(rm, segs, cfg)
    for ids in out:
        assert np.array_equal(ids[:len(segs[0])], segs[0]) and np.array_equal(ids[len(ids) - len(segs[1]):], segs[1])
        middle = ids[len(segs[0]):len(ids) - len(segs[1])]
        assert len(middle) <= 12 and (middle < 256).all()  # base ids only, never the end id
    assert all(np.array_equal(x, y) for x, y in zip(out, rollout(rm, segs, RolloutConfig(
        mode="infill", num_samples=3, seed=2, length=12, top_k=50, use_cache=False)), strict=True))
    two = rollout(rm, read_prompt(rm, _prompt(tmp_path, "a<gap>b<gap>c"), cfg), cfg)[0]
    text = rm.tokenizer.decode(two.tolist())
    assert text[0] == "a" and text[-1] == "c" and "b" in text[1:-1]


def test_the_end_id_stops_a_middle_and_sentinels_are_never_sampled(tmp_path):
    rm = load_rollout_model(fim_decoder_ckpt(tmp_path / "m", "ascii", spm_rate=1.0))
    segs = [np.array([65, 66]), np.array([67])]
    ended = _biased(rm, [rm.fim.end_id])  # the model wants to stop at once
    assert [len(t) for t in rollout(ended, segs, RolloutConfig(mode="infill", num_samples=2))] == [3, 3]
    rm = _biased(load_rollout_model(fim_decoder_ckpt(tmp_path / "m2", "ascii")), [257, 258, 259, 260])  # pad + sentinels
    for t in rollout(rm, segs, RolloutConfig(mode="infill", length=8, temperature=2.0)) + \
            rollout(rm, [np.array([65])], RolloutConfig(length=20, temperature=2.0)):
        assert t.max() < 258  # ordinary continuation and middles: tokenizer ids only


def test_fim_prompt_is_cut_to_the_context_around_the_gap(tmp_path):
    from amtrain.generate.fim import fit_views, middle_budget

    assert fit_views(100, 10, 60) == (50, 10) and fit_views(10, 100, 60) == (10, 50) and fit_views(100, 100, 61, 4) == (28, 33)
    assert middle_budget(48, 256, 100) == 12 and middle_budget(48, 5, 10) == 5 and middle_budget(48, 256, 10) == 35
    rm = load_rollout_model(fim_decoder_ckpt(tmp_path / "m", "ascii", max_seq_len=48))
    long = [np.full(200, 65), np.full(150, 66)]
    out = rollout(rm, long, RolloutConfig(mode="infill", seed=0))[0]
    assert np.array_equal(out[:200], long[0]) and np.array_equal(out[-150:], long[1]) and len(out) <= 350 + 12


def test_decoder_without_fim_still_refuses_to_infill(tmp_path):
    from tests.rollout_helpers import decoder_ckpt

    rm = load_rollout_model(decoder_ckpt(tmp_path / "m", "ascii"))
    assert rm.fim is None and not rm.modality.can_infill(rm)
    with pytest.raises(UserError, match="trained without fill-in-the-middle cannot in-fill.*data.fim_rate"):
        rollout(rm, [np.array([65]), np.array([66])], RolloutConfig(mode="infill"))


# --------------------------------------------------------------------------- defaults of the command
def test_newest_run_and_default_out(tmp_path):
    from amtrain.rollout.defaults import default_out, newest_run

    with pytest.raises(UserError, match="no run with a complete checkpoint"):
        newest_run(tmp_path / "runs")
    for name, t in (("old", 100.0), ("new", 300.0), ("mid", 200.0)):
        ckpt = tmp_path / "runs" / name / "checkpoints" / "step_00000002"
        ckpt.mkdir(parents=True)
        (ckpt / "amtrain_state.json").write_text(json.dumps({"time": t}))
    (tmp_path / "runs" / "new" / "checkpoints" / "step_00000004").mkdir()  # incomplete: not counted
    run, line = newest_run(tmp_path / "runs")
    assert run == tmp_path / "runs" / "new" and "step_00000002" in line and line.startswith("checkpoint: ")
    assert default_out(run, "infill") == run / "rollouts" / "infill_0"
    (run / "rollouts" / "infill_0").mkdir(parents=True)
    assert default_out(run / "checkpoints" / "step_00000002", "infill") == run / "rollouts" / "infill_1"


@pytest.mark.slow
def test_readme_main_job_then_rollout_infill_with_defaults(kjv_gpt2, tmp_path, monkeypatch):
    """The README's main job (the default run config, fewer steps), then `amtrain rollout --mode
    infill` exactly as typed: the newest run, a held-out document, an output folder in the run."""
    from typer.testing import CliRunner

    from amtrain.cli import app
    from amtrain.config import parse_args
    from amtrain.models.io import load_pretrained
    from amtrain.tokens import get_tokenizer
    from amtrain.train.loop import train

    monkeypatch.chdir(tmp_path)
    train(parse_args(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--data", str(kjv_gpt2),
                      "--train.max_steps", "6", "--train.progress", "false"]))
    r = CliRunner().invoke(app, ["rollout", "--mode", "infill"])
    assert r.exit_code == 0, r.output
    said = {k: re.search(f"{k}: .*", r.output).group(0) for k in ("checkpoint", "prompt", "out")}  # stderr: DeepSpeed's bars
    assert said["checkpoint"].startswith("checkpoint: runs/default/checkpoints/step_00000006 (the newest run under runs/")
    assert said["prompt"].startswith(f"prompt: val document 0 of 7 in {kjv_gpt2}, its first ") and "held out" in said["prompt"], r.output
    assert said["out"] == "out: runs/default/rollouts/infill_0"
    out = tmp_path / "runs" / "default" / "rollouts" / "infill_0"
    sample, original = np.load(out / "sample_0.npy"), np.load(out / "original_0.npy")
    tok = get_tokenizer("gpt2")
    doc = next(iter(Dataset(kjv_gpt2).documents("val")))
    assert np.array_equal(original, doc[1:1 + len(original)])  # the document's opening, its EOT header aside
    a, b = (int(x) for x in said["prompt"].split("<gap: [")[1].split(")")[0].split(", "))
    assert np.array_equal(sample[:a], original[:a]) and np.array_equal(sample[len(sample) - (len(original) - b):], original[b:])
    assert sample.max() < tok.vocab_size and (out / "sample_0.txt").read_text().startswith(tok.decode(original[:a].tolist()))
    assert "sample_0: " in r.output and "tokens (in the gap)" in r.output
    r = CliRunner().invoke(app, ["export", "runs/default", "exp"])  # the layout travels with an export
    assert r.exit_code == 0, r.output
    assert load_pretrained(tmp_path / "exp")[1]["fim"]["middle_id"] == 50259
    r = CliRunner().invoke(app, ["rollout", "exp", "--mode", "infill", "--seed", "1", "-n", "2"])
    assert r.exit_code == 0 and "prompt: val document 1 of 7" in r.output and "out: exp/rollouts/infill_0" in r.output


def test_default_prompt_skips_documents_too_short_for_a_gap():
    """A title line is no prompt: the first document from the seed's on with room for a gap, or
    the longest when none has."""
    from amtrain.rollout.defaults import MIN_PROMPT_IDS, _long_enough

    docs = [np.zeros(6), np.zeros(MIN_PROMPT_IDS + 5), np.zeros(3)]
    assert _long_enough(docs, 0) == 1 and _long_enough(docs, 1) == 1 and _long_enough(docs, 2) == 1
    assert _long_enough([np.zeros(4), np.zeros(9)], 0) == 1
