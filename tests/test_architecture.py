"""The architecture holds: imports run one way (docs/architecture.md), and a model family and
a modality are added through the registry alone (tests/toy_plugin.py) and then train and roll
out through the real commands."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from amtrain.errors import UserError
from tests.conftest import REPO
from tests.train_helpers import BIN, LAUNCHER, argv, env, metrics, run, tiny


def test_imports_follow_the_layers():
    """import-linter's layers contract in pyproject.toml: a layer imports only layers below it
    (function-level imports included)."""
    p = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in p.stdout


def test_type_checker_passes():
    """mypy over amtrain/ (settings in pyproject.toml): the Tokenizer protocol, the SequenceModel
    contract and the registry's specs are checked where they are used."""
    p = subprocess.run([str(BIN / "mypy"), "amtrain"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]


def test_registry_lists_the_builtin_families_and_modalities():
    from amtrain.registry import family, family_names, modality_of, study_families

    assert {"decoder", "lstm", "t5"} <= set(family_names())
    assert family("decoder").left_to_right and family("lstm").left_to_right and not family("t5").left_to_right
    assert {k: f.name for k, f in study_families().items()} == {"transformer": "decoder", "lstm": "lstm"}
    assert [modality_of(t).name for t in ("gpt2", "ascii", "midi", "audio", "some-bin")] == \
        ["text", "text", "midi", "audio", "tokens"]
    with pytest.raises(UserError, match="model.arch: 'gpt9' is not a model family; known: decoder"):
        family("gpt9")
    with pytest.raises(UserError, match="model.overrides: 'num_layer' is not a DecoderConfig field"):
        family("decoder").config("debug", vocab_size=300, num_layer=3)


def test_every_size_of_every_family_builds_on_meta():
    import torch

    from amtrain.registry import family, family_names

    for name in family_names():
        fam = family(name)
        for size in fam.sizes:
            with torch.device("meta"):
                model = fam.build(fam.config(size, vocab_size=512))
            assert model.num_params() > 0, (name, size)


def _dna_dataset(folder):
    """Sequences of a Markov chain over A C G T (each base most often followed by the next one),
    so a bigram model can learn them: entropy ~1.0 bit per base against log2(5) at the start."""
    from amtrain.store import DatasetBuilder

    rng = np.random.default_rng(0)
    step = np.array([[0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05], [0.05, 0.05, 0.05, 0.85],
                     [0.85, 0.05, 0.05, 0.05]])
    docs = []
    for _ in range(160):
        seq = [int(rng.integers(4))]
        for _ in range(int(rng.integers(80, 160))):
            seq.append(int(rng.choice(4, p=step[seq[-1]])))
        docs.append(np.array([4, *seq], np.uint16))  # every document opens with <eot>
    b = DatasetBuilder(folder, "dna", 5, {"eot": 4})
    b.write_unit("u0", {"train": docs[:140], "val": docs[140:]})
    b.finalize(["u0"])
    return folder


@pytest.mark.slow
def test_toy_family_and_modality_train_and_roll_out_through_the_launcher(tmp_path):
    plugin = env(AMTRAIN_PLUGINS="tests.toy_plugin")
    data = _dna_dataset(tmp_path / "dna")
    out = tmp_path / "run"
    args = tiny(data, out, **{"model.arch": "bigram", "train.max_steps": 30, "train.eval_every": 0,
                               "optim.lr": 0.03, "optim.min_lr": 0.003})
    p = run([sys.executable, LAUNCHER, *argv(args)], env=plugin)
    assert "bigram" in p.stdout
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0]["loss"], rows[-1]["loss"])
    val = metrics(out, "val")[-1]
    assert val["bits_per_base"] == pytest.approx(val["val_loss"] / np.log(2), rel=1e-9)
    assert "arch: bigram" in (out / "config.yaml").read_text()

    prompt = tmp_path / "p.txt"
    prompt.write_text("ACGTACGT")
    cmd = [sys.executable, "-m", "amtrain", "rollout", str(out), "--prompt", str(prompt), "--out",
           str(tmp_path / "o"), "--length", "24", "--temperature", "0"]
    r = run(cmd, env=plugin)
    text = (tmp_path / "o" / "sample_0.txt").read_text().strip()
    assert text.startswith("ACGTACGT") and len(text) == 8 + 24 and set(text) <= set("ACGT"), (text, r.stdout)
    # greedy from T follows the chain's most likely step, A C G T A ...
    assert text[8:16] == "ACGTACGT"

    # without the plugin, nothing else in the tree knows the family
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "bigram" in p.stderr and "known: decoder, lstm, t5" in p.stderr, p.stderr[-2000:]
