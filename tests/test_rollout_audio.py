"""Audio rollouts through a debug EnCodec: decoder continuation (delay layout, prompt kept
exactly, WAV of the expected length and rate), T5 and fill-in-the-middle in-filling (prefix and
suffix kept, duration kept), prompts chosen by priority score, alternate driven by the priority
table, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from amtrain.rollout.load import load_rollout_model
from amtrain.rollout.run import RolloutConfig, read_prompt, rollout, write_tapes
from tests.audio_helpers import JOPLIN
from tests.rollout_helpers import codec_folder, decoder_ckpt, fim_decoder_ckpt, t5_ckpt

K = 2  # EnCodec 24 kHz at 1.5 kbps


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from amtrain.codec import load_codec

    d = tmp_path_factory.mktemp("audio")
    params = {"num_codebooks": K, "layout": "delay"}
    codec_dir = codec_folder(d / "codec")
    wav = d / "prompt.wav"
    y, sr = sf.read(JOPLIN, dtype="float32", frames=24000)  # 1 s
    sf.write(wav, y, sr)
    return {"dir": d, "codec_dir": codec_dir, "codec": load_codec(codec_dir), "wav": wav,
            "dec": decoder_ckpt(d / "dec", "audio", params, max_seq_len=64),
            "fim": fim_decoder_ckpt(d / "fim", "audio", params, max_seq_len=128),
            "t5": t5_ckpt(d / "t5", "audio", params)}


def test_decoder_continuation_keeps_prompt_and_writes_wav(env, tmp_path):
    codec = env["codec"]
    rm = load_rollout_model(env["dec"])
    cfg = RolloutConfig(length=1.0, seconds=True, num_samples=2, seed=0, frame_rate=codec.frame_rate)
    codes = read_prompt(rm, env["wav"], cfg, codec)
    assert codes.shape == (K, 75)
    out = rollout(rm, codes, cfg)  # 75 new frames = 154 tokens through a 64-token window
    for c in out:
        assert c.shape == (K, 150) and np.array_equal(c[:, :75], codes)
    again = rollout(rm, codes, RolloutConfig(length=1.0, seconds=True, num_samples=2, seed=0,
                                             frame_rate=codec.frame_rate, use_cache=False))
    assert all(np.array_equal(a, b) for a, b in zip(out, again, strict=True))
    files = write_tapes(rm, out, tmp_path, codec)
    info = sf.info(str(files[0]))
    assert info.samplerate == 24000 and info.frames == 150 * codec.hop_length
    assert np.array_equal(rm.tokenizer.codes(np.load(files[1])), out[0])


def test_t5_infill_keeps_prefix_and_suffix_and_duration(env, tmp_path):
    codec = env["codec"]
    rm = load_rollout_model(env["t5"])
    cfg = RolloutConfig(mode="infill", infill_range=(0.2, 0.6), num_samples=2, seed=1, frame_rate=codec.frame_rate)
    codes = read_prompt(rm, env["wav"], cfg, codec)
    a, b = 15, 45
    stream = rm.tokenizer.encode(codes).astype(np.int64)
    for c in rollout(rm, codes, cfg):
        assert c.shape == codes.shape
        s = rm.tokenizer.encode(c).astype(np.int64)
        assert np.array_equal(s[:a * K], stream[:a * K]) and np.array_equal(s[(b + K - 1) * K:], stream[(b + K - 1) * K:])
        assert not np.array_equal(c[:, a:b], codes[:, a:b])
        assert np.array_equal(c[:, :a], codes[:, :a]) and np.array_equal(c[:, b:], codes[:, b:])
    again = rollout(rm, codes, cfg)  # a fixed seed reproduces the output
    files = write_tapes(rm, again, tmp_path, codec)
    assert all(np.array_equal(x, y) for x, y in zip(again, rollout(rm, codes, cfg), strict=True))
    assert sf.info(str(files[0])).frames == codes.shape[1] * codec.hop_length


def test_fim_decoder_infill_keeps_prefix_suffix_duration_and_codebooks(env, tmp_path):
    """A decoder trained to fill in the middle writes the range as the middle of a FIM prompt:
    exactly the gap's steps, codebook k at position k, the delay layout's forced ids kept."""
    codec = env["codec"]
    rm = load_rollout_model(env["fim"])
    assert rm.modality.can_infill(rm)
    cfg = RolloutConfig(mode="infill", infill_range=(0.2, 0.6), num_samples=2, seed=1, frame_rate=codec.frame_rate)
    codes = read_prompt(rm, env["wav"], cfg, codec)
    a, b = 15, 45
    stream = rm.tokenizer.encode(codes).astype(np.int64)
    out = rollout(rm, codes, cfg)
    for c in out:
        assert c.shape == codes.shape
        s = rm.tokenizer.encode(c).astype(np.int64)
        assert np.array_equal(s[:a * K], stream[:a * K]) and np.array_equal(s[(b + K - 1) * K:], stream[(b + K - 1) * K:])
        assert np.array_equal(c[:, :a], codes[:, :a]) and np.array_equal(c[:, b:], codes[:, b:])
        assert not np.array_equal(c[:, a:b], codes[:, a:b]) and (c >= 0).all() and (c < 1024).all()
    nocache = rollout(rm, codes, RolloutConfig(mode="infill", infill_range=(0.2, 0.6), num_samples=2, seed=1,
                                               frame_rate=codec.frame_rate, use_cache=False))
    assert all(np.array_equal(x, y) for x, y in zip(out, nocache, strict=True))
    assert sf.info(str(write_tapes(rm, out, tmp_path, codec)[0])).frames == codes.shape[1] * codec.hop_length


def _prep_tables(folder, codes, priorities, frame_rate):
    """A prep-audio shaped folder: codes/<unit>.npz + scores/<unit>.parquet (schema 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amtrain.data.priority import SCHEMA_VERSION, SCORES_FORMAT

    (folder / "codes").mkdir(parents=True)
    (folder / "scores").mkdir()
    np.savez(folder / "codes" / "song-0123456789.npz", codes=codes.astype(np.int16))
    n = len(priorities)
    bounds = np.linspace(0, codes.shape[1], n + 1).astype(np.int64)
    table = pa.table({"file": ["song.wav"] * n, "chunk": np.arange(n, dtype=np.int32),
                      "start_frame": bounds[:-1], "end_frame": bounds[1:],
                      "start_s": bounds[:-1] / frame_rate, "end_s": bounds[1:] / frame_rate,
                      "priority": np.asarray(priorities, np.float64)})
    meta = {"format": SCORES_FORMAT, "schema_version": str(SCHEMA_VERSION)}
    pq.write_table(table.replace_schema_metadata(meta), folder / "scores" / "song-0123456789.parquet")
    return bounds


def test_prompt_from_priority_and_alternate_by_priority(env, tmp_path):
    from amtrain.rollout.priority import prompt_from_priority

    codec = env["codec"]
    rm = load_rollout_model(env["t5"])
    codes = read_prompt(rm, env["wav"], RolloutConfig(), codec)
    bounds = _prep_tables(tmp_path / "prep", codes, [0.2, 0.9, 0.1, 0.5], codec.frame_rate)
    tape, chunks, info = prompt_from_priority(tmp_path / "prep", rm.tokenizer)
    assert np.array_equal(tape, codes[:, bounds[1]:bounds[2]]) and "priority 0.900" in info
    tape, chunks, _ = prompt_from_priority(tmp_path / "prep", rm.tokenizer, whole_file=True)
    cfg = RolloutConfig(mode="alternate", iterations=3, length=0.2, seconds=True, seed=0,
                        frame_rate=codec.frame_rate, priorities=chunks)
    out = rollout(rm, tape, cfg)[0]
    # iterations 1-2 re-generate the two chunks below the median (0.1 then 0.2), 3 continues 15 frames
    assert out.shape == (K, codes.shape[1] + 15)
    keep = slice(bounds[1], bounds[2])
    assert np.array_equal(out[:, keep], codes[:, keep])  # the strongest chunk is untouched


def test_cli_audio_continuation(env, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app

    r = CliRunner().invoke(app, ["rollout", str(env["dec"]), "--prompt", str(env["wav"]), "--out", str(tmp_path),
                                 "--length", "0.5", "--seconds", "--codec-path", str(env["codec_dir"])])
    assert r.exit_code == 0, r.output
    info = sf.info(str(tmp_path / "sample_0.wav"))
    assert info.samplerate == 24000 and info.frames == (75 + 38) * env["codec"].hop_length
    assert "sample_0: 38 frames added, +0.51 s; 113 frames in all" in r.output


def test_t5_audio_continuation_keeps_prompt(env):
    codec = env["codec"]
    rm = load_rollout_model(env["t5"])
    codes = read_prompt(rm, env["wav"], RolloutConfig(), codec)[:, :30]
    cfg = RolloutConfig(length=0.2, seconds=True, seed=0, frame_rate=codec.frame_rate, t5_context=32, stride=16)
    out = rollout(rm, codes, cfg)[0]
    assert out.shape == (K, 45) and np.array_equal(out[:, :30], codes)


def test_cli_prompt_from_priority(env, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app

    rm = load_rollout_model(env["dec"])
    codes = read_prompt(rm, env["wav"], RolloutConfig(), env["codec"])
    bounds = _prep_tables(tmp_path / "prep", codes, [0.3, 0.1, 0.8], env["codec"].frame_rate)
    r = CliRunner().invoke(app, ["rollout", str(env["dec"]), "--prompt-from-priority", str(tmp_path / "prep"),
                                 "--out", str(tmp_path / "o"), "--length", "20", "--codec-path", str(env["codec_dir"])])
    assert r.exit_code == 0, r.output
    assert "priority 0.800" in r.output
    out = rm.tokenizer.codes(np.load(tmp_path / "o" / "sample_0.npy"))
    assert np.array_equal(out[:, :bounds[3] - bounds[2]], codes[:, bounds[2]:bounds[3]])
    assert out.shape[1] == bounds[3] - bounds[2] + 10


def test_rollout_hook_writes_wav(env, tmp_path):
    from amtrain.models.io import load_pretrained
    from amtrain.tokens import get_tokenizer
    from amtrain.train.rollouts import rollout_hook

    codec = env["codec"]
    model, meta = load_pretrained(env["dec"])
    tok = get_tokenizer("audio", **meta["tokenizer_params"])
    codes = read_prompt(load_rollout_model(env["dec"]), env["wav"], RolloutConfig(), codec)[:, :20]
    out = rollout_hook(model, [codes], tokenizer=tok, step=3, run_dir=tmp_path, length=20, codec=codec)
    wav = tmp_path / "rollouts" / "step_3" / "prompt_0.wav"
    assert str(wav) in out["files"] and sf.info(str(wav)).frames == (20 + 10) * codec.hop_length
