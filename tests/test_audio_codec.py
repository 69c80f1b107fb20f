"""EnCodec: weights in both user forms load through one path, names map like the official
conversion, codes are not degenerate, encode -> decode keeps length and rate."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_helpers import JOPLIN, random_model, save_codec

from amtrain.codec import Codec, build_model, debug_config, encodec_config, load_codec
from amtrain.codec.encodec import (
    ENV_DIR,
    original_state_dict,
    original_to_hf_key,
    save_hf_folder,
    save_original_checkpoint,
)
from amtrain.errors import UserError


@pytest.fixture(scope="module")
def net24():
    return random_model("24khz")


@pytest.fixture(scope="module")
def joplin():
    y, sr = sf.read(JOPLIN, dtype="float32")
    assert sr == 24000
    return y[None]  # (1, N)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("form,weights", [("hf", "model.safetensors"), ("hf", "pytorch_model.bin"),
                                          ("original", None)])
def test_both_weight_forms_load_through_the_same_code(tmp_path, net24, joplin, form, weights):
    path = save_codec(net24, tmp_path, form, weights or "model.safetensors")
    codec = load_codec(path, "24khz")
    _same_weights(codec.model, net24)
    x = joplin[:, : 3 * 24000]
    ref, _ = Codec(net24, "ref").encode(x, 6.0)
    codes, scales = codec.encode(x, 6.0)
    assert np.array_equal(codes, ref) and scales is None
    assert codec.codec_id.startswith("encodec_24khz@")


def test_original_names_match_the_official_conversion():
    """Names as facebookresearch/encodec writes them, mapped as transformers'
    convert_encodec_checkpoint_to_pytorch.py maps them (MAPPING_24K / MAPPING_48K)."""
    net = build_model(encodec_config("24khz"))  # the real 24 kHz architecture
    orig = original_state_dict(net)
    for name in ["encoder.model.0.conv.conv.weight_g", "encoder.model.0.conv.conv.weight_v",
                 "encoder.model.1.block.1.conv.conv.bias", "encoder.model.1.shortcut.conv.conv.weight_v",
                 "encoder.model.13.lstm.weight_hh_l1", "encoder.model.15.conv.conv.bias",
                 "decoder.model.3.convtr.convtr.weight_g", "decoder.model.1.lstm.bias_ih_l0",
                 "decoder.model.13.shortcut.conv.conv.weight_g", "decoder.model.15.conv.conv.weight_v",
                 "quantizer.vq.layers.0._codebook.embed", "quantizer.vq.layers.31._codebook.embed_avg",
                 "quantizer.vq.layers.5._codebook.cluster_size", "quantizer.vq.layers.5._codebook.inited"]:
        assert name in orig, name
    assert not any("parametrizations" in k or ".layers." in k and "quantizer" not in k for k in orig)
    assert original_to_hf_key("decoder.model.3.convtr.convtr.weight_g") == "decoder.layers.3.conv.parametrizations.weight.original0"
    assert original_to_hf_key("encoder.model.13.lstm.weight_ih_l0") == "encoder.layers.13.lstm.weight_ih_l0"
    assert original_to_hf_key("quantizer.vq.layers.7._codebook.embed") == "quantizer.layers.7.codebook.embed"
    assert {original_to_hf_key(k) for k in orig} == set(net.state_dict())
    net48 = build_model(debug_config("48khz"))
    orig48 = original_state_dict(net48)
    assert "encoder.model.0.conv.norm.weight" in orig48 and "decoder.model.3.convtr.norm.bias" in orig48
    assert original_to_hf_key("decoder.model.3.convtr.norm.bias") == "decoder.layers.3.norm.bias"
    assert {original_to_hf_key(k) for k in orig48} == set(net48.state_dict())


@pytest.mark.slow
def test_real_architecture_checkpoint_loads_without_config(tmp_path):
    """A bare encodec_24khz-d7cc33bc.th (no config.json, as users download it) gets the
    standard 24 kHz architecture."""
    torch.manual_seed(1)
    net = build_model(encodec_config("24khz"))
    save_original_checkpoint(net, tmp_path / "encodec_24khz-d7cc33bc.th")
    assert not (tmp_path / "config.json").exists()
    codec = load_codec(tmp_path / "encodec_24khz-d7cc33bc.th", "24khz")
    _same_weights(codec.model, net)
    assert sum(p.numel() for p in codec.model.parameters()) == 14_851_810


def test_legacy_hf_weight_norm_names_load(tmp_path, net24):
    """Hub folders converted before torch's parametrized weight norm use weight_g / weight_v."""
    sd = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
          for k, v in net24.state_dict().items()}
    save_hf_folder(net24, tmp_path, "pytorch_model.bin")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _same_weights(load_codec(tmp_path, "24khz").model, net24)


def test_missing_weights_error_names_the_path(tmp_path, monkeypatch):
    where = tmp_path / "nothing-here"
    with pytest.raises(UserError, match=str(where)) as e:
        load_codec(where, "24khz")
    assert "encodec_24khz-d7cc33bc.th" in str(e.value) and "facebook/encodec_24khz" in str(e.value)
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "env-dir"))
    with pytest.raises(UserError, match="env-dir"):
        load_codec(None, "24khz")
    monkeypatch.delenv(ENV_DIR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=r"\.cache/amtrain/encodec"):
        load_codec(None, "24khz")


def test_env_dir_and_subfolder_are_searched(tmp_path, monkeypatch, net24):
    save_hf_folder(net24, tmp_path / "encodec_24khz")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    _same_weights(load_codec(None, "24khz").model, net24)


def test_corrupt_or_mismatched_weights_are_user_errors(tmp_path, net24):
    save_hf_folder(net24, tmp_path)
    with pytest.raises(UserError, match="a 24 kHz EnCodec, but --codec-model is 48khz"):
        load_codec(tmp_path, "48khz")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.safetensors"):
        load_codec(tmp_path, "24khz")
    th = tmp_path / "other" / "encodec_24khz-d7cc33bc.th"
    th.parent.mkdir()
    torch.save({"encoder.model.0.conv.conv.weight_g": torch.zeros(1)}, th)
    with pytest.raises(UserError, match="do not fit the EnCodec 24khz architecture"):
        load_codec(th, "24khz")


def test_bandwidth_to_codebooks(net24):
    codec = Codec(net24, "x")
    assert [codec.num_codebooks(b) for b in (1.5, 3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16, 32]
    assert codec.frame_rate == 75 and codec.hop_length == 320
    c48 = Codec(build_model(debug_config("48khz")), "x")
    assert [c48.num_codebooks(b) for b in (3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16]
    assert c48.frame_rate == 150 and c48.channels == 2
    with pytest.raises(UserError, match="bandwidth 5"):
        codec.num_codebooks(5.0)


def test_codes_are_not_degenerate(net24, joplin):
    codes, _ = Codec(net24, "x").encode(joplin, 24.0)
    assert codes.shape == (32, 2250)
    used = [np.unique(row).size for row in codes]
    assert min(used) >= 100, used  # every RVQ stage uses many of its 1024 entries


def test_encode_decode_length_and_rate_24k(net24, joplin):
    codec = Codec(net24, "x")
    for n in (24000 * 7, 24000 * 7 + 123):  # whole and partial last frame
        codes, _ = codec.encode(joplin[:, :n], 6.0)
        assert codes.shape == (8, -(-n // 320))
        wave = codec.decode(codes)
        assert wave.shape == (1, codes.shape[1] * 320) and np.all(np.isfinite(wave))
        assert wave.std() > 0


def test_encode_decode_48k_stereo_chunks(joplin):
    import librosa

    net = random_model("48khz")
    codec = Codec(net, "x")
    y = librosa.resample(joplin[0, : 24000 * 3 + 77], orig_sr=24000, target_sr=48000)
    x = np.stack([y, 0.5 * y])  # (2, N)
    codes, scales = codec.encode(x, 6.0)
    assert codes.shape == (4, -(-x.shape[1] // 320)) and scales.shape == (4,)  # 4 normalised 1 s chunks
    wave = codec.decode(codes, scales)
    assert wave.shape == (2, codes.shape[1] * 320) and np.all(np.isfinite(wave))


def test_codec_init_makes_a_loadable_stand_in_from_real_audio(tmp_path):
    """`amtrain codec init` (the documented offline stand-in): loads through --codec-path like
    real weights, and its codes spread over the codebooks on real audio not used for the fit."""
    import subprocess
    import sys

    import soundfile as sf

    from amtrain.codec import load_codec
    from tests.audio_helpers import JOPLIN, MELODY, REPO

    out = tmp_path / "codec"
    r = subprocess.run([sys.executable, "-m", "amtrain", "codec", "init", str(out), "--from-audio", str(JOPLIN),
                        "--size", "debug", "--seconds", "5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"use it with --codec-path {out}" in r.stdout and (out / "config.json").is_file()
    codec = load_codec(out, "24khz")
    y, sr = sf.read(MELODY, dtype="float32", frames=5 * 24000)
    import librosa

    codes, _ = codec.encode(librosa.resample(y, orig_sr=sr, target_sr=24000)[None], codec.bandwidths[0])
    assert codes.shape[0] >= 2 and all(np.unique(row).size > 20 for row in codes), [np.unique(r).size for r in codes]
    bad = subprocess.run([sys.executable, "-m", "amtrain", "codec", "init", str(tmp_path / "x"), "--from-audio",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no audio files" in bad.stderr and "Traceback" not in bad.stderr
