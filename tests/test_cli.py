"""The CLI through typer's runner and as a subprocess: help, version, errors, prep + inspect."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from amtrain import __version__
from amtrain.cli import app
from tests.conftest import KJV, REPO

runner = CliRunner()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "amtrain", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_with_a_summary():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for name, cmd in ((c.name, c) for c in app.registered_commands):
        assert name in r.output
        assert (cmd.callback.__doc__ or "").strip(), f"{name} has no one-line summary"


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"amtrain {__version__}"


def test_prep_and_inspect_through_runner(tmp_path):
    out = tmp_path / "ds"
    r = runner.invoke(app, ["prep-text", str(KJV), "--out", str(out), "--tokenizer", "ascii"])
    assert r.exit_code == 0, r.output
    assert "187 documents" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--validate"])
    assert r.exit_code == 0, r.output
    assert "ascii" in r.output and "valid" in r.output and "Genesis" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--ids", "--split", "train", "--limit", "3"])
    lines = r.output.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[0] == "256" for line in lines)
    ids = [int(x) for x in lines[0].split()[1:]]
    assert bytes(ids).decode().startswith("Genesis")


def test_user_error_is_one_line_and_nonzero(tmp_path):
    r = _run("inspect", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no manifest.json; the folder is not a finished dataset, run `amtrain prep-text` (or prep-midi/prep-audio) into it"]
    r = _run("--debug", "inspect", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_subprocess_prep_validate_detects_corruption(tmp_path):
    out = tmp_path / "ds"
    assert _run("prep-text", str(KJV), "--out", str(out)).returncode == 0
    shard = next((out / "train").glob("*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x55
    shard.write_bytes(raw)
    r = _run("inspect", str(out), "--validate")
    assert r.returncode == 1 and "checksum mismatch" in r.stderr


def test_bad_inputs_exit_nonzero_but_keep_good_work(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "good.txt").write_text("a fine document")
    r = _run("prep-text", str(tmp_path / "*.txt"), "--out", str(tmp_path / "ds"), "--errors", "strict", "--tokenizer", "ascii")
    assert r.returncode == 1
    assert "bad.txt: invalid UTF-8" in r.stderr
    assert (tmp_path / "ds" / "manifest.json").exists()
    r = _run("prep-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "missing.txt: no such file" in r.stderr


def test_models_lists_every_family_size_with_its_pinned_count_unwrapped():
    """`amtrain models` reads the registry: every family and size, counts as pinned in the
    model tests (decoder debug 3,317,952 for gpt2), rows unwrapped when piped."""
    from amtrain.registry import family, family_names

    r = _run("models")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in family_names():
        for size in family(name).sizes:
            assert any(f" {name} " in line and f" {size} " in line for line in lines), (name, size)
    assert any(" decoder " in line and " debug " in line and "3,317,952" in line for line in lines)
    assert ("abc (tokenizers abc); audio (tokenizers audio); midi (tokenizers midi); nvd (tokenizers nvd); "
            "text (tokenizers gpt2, ascii); tokens (tokenizers any other)") in r.stdout
