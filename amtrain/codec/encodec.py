"""EnCodec through transformers' `EncodecModel`: configs, weight loading/writing, windowed encode.

Why transformers and not the `encodec` package: `encodec` 0.1.1 imports torchaudio, whose
wheels are built against one exact torch and do not import beside the CPU torch this project
pins; transformers' implementation needs only torch (see docs/audio.md).

Weights are read from a local path only (never a hub), in the two forms users have:

- the original facebookresearch/encodec checkpoint `encodec_24khz-d7cc33bc.th` /
  `encodec_48khz-7e698e3e.th` (a plain state dict; keys converted here, see
  `original_to_hf_key`), architecture = the standard one for its rate, or a `config.json`
  (transformers' EncodecConfig) beside it;
- a Hugging Face `facebook/encodec_24khz` folder: `config.json` + `model.safetensors` or
  `pytorch_model.bin` (old `weight_g/weight_v` or new parametrization key names).

Where: `--codec-path`, else `$AMTRAIN_CODEC_DIR`, else `~/.cache/amtrain/encodec`.

Shapes: C audio channels, N samples, K codebooks, T frames (frame rate = sample rate / hop).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amtrain.errors import UserError
from amtrain.fileio import atomic_target, file_sha256, write_json_atomic

CODEBOOK_SIZE = 1024
ENV_DIR = "AMTRAIN_CODEC_DIR"
DEFAULT_DIR = Path("~/.cache/amtrain/encodec")
MODELS = ("24khz", "48khz")
ORIGINAL_NAMES = {"24khz": "encodec_24khz-d7cc33bc.th", "48khz": "encodec_48khz-7e698e3e.th"}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def encodec_config(model: str = "24khz", **overrides):
    """The published architecture of EnCodec 24 kHz (mono, causal, 1.5-24 kbps) or 48 kHz
    (stereo, non-causal, time-group norm, normalised 1 s chunks, 3-24 kbps).
    48 kHz is set from facebookresearch/encodec `model.py:encodec_model_48khz`; overlap is 0
    here so that chunks tile the time axis and codes stay one K x T grid (docs/audio.md)."""
    from transformers import EncodecConfig

    if model not in MODELS:
        raise UserError(f"--codec-model {model!r}: choose one of {', '.join(MODELS)}")
    kw: dict = {}
    if model == "48khz":
        kw = dict(sampling_rate=48_000, audio_channels=2, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
                  use_causal_conv=False, norm_type="time_group_norm", normalize=True,
                  chunk_length_s=1.0, overlap=0.0)
    kw.update(overrides)
    return EncodecConfig(**kw)


def debug_config(model: str = "24khz"):
    """A tiny model with the real hop (320), frame rate and codebook counts, for tests."""
    return encodec_config(model, num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          num_residual_layers=1)


# ---------------------------------------------------------------- original <-> transformers keys
# Naming from facebookresearch/encodec (modules/seanet.py SConv1d -> NormConv1d -> conv / norm,
# SConvTranspose1d -> convtr, SLSTM -> lstm; quantization/core_vq.py `vq.layers.i._codebook`) to
# transformers' (models/encodec/modeling_encodec.py); the same correspondences as transformers'
# convert_encodec_checkpoint_to_pytorch.py MAPPING_24K / MAPPING_48K, written as rewrite rules.
_RULES = [
    (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook."),
    (r"^(encoder|decoder)\.model\.", r"\1.layers."),
    (r"\.(conv\.conv|convtr\.convtr)\.", ".conv."),
    (r"\.(conv|convtr)\.norm\.", ".norm."),
]
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0",
                "weight_v": "parametrizations.weight.original1"}


def original_to_hf_key(key: str) -> str:
    for pat, rep in _RULES:
        key = re.sub(pat, rep, key)
    return _modern_weight_norm(key)


def _modern_weight_norm(key: str) -> str:
    head, _, last = key.rpartition(".")
    return f"{head}.{_WEIGHT_NORM[last]}" if last in _WEIGHT_NORM else key


def hf_to_original_key(key: str, module_kinds: dict[str, str]) -> str:
    """Inverse of `original_to_hf_key`. module_kinds: HF module path -> 'conv' | 'convtr' | 'norm'."""
    for new, old in _WEIGHT_NORM.items():
        key = key.replace("." + old, "." + new)
    m = re.match(r"^quantizer\.layers\.(\d+)\.codebook\.(.*)$", key)
    if m:
        return f"quantizer.vq.layers.{m[1]}._codebook.{m[2]}"
    head, _, last = key.rpartition(".")
    part, _, tail = head.rpartition(".")
    kind = module_kinds.get(head)
    if tail == "conv" and kind in ("conv", "convtr"):
        head = f"{part}.{kind}.{kind}"
    elif tail == "norm" and kind in ("conv", "convtr"):
        head = f"{part}.{kind}.norm"
    head = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", head)
    return f"{head}.{last}"


def _module_kinds(model) -> dict[str, str]:
    from transformers.models.encodec.modeling_encodec import EncodecConvTranspose1d

    kinds = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "conv") and hasattr(mod, "norm_type"):
            kind = "convtr" if isinstance(mod, EncodecConvTranspose1d) else "conv"
            kinds[f"{name}.conv"] = kind
            kinds[f"{name}.norm"] = kind
    return kinds


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under facebookresearch/encodec names (what a `.th` checkpoint holds)."""
    kinds = _module_kinds(model)
    return {hf_to_original_key(k, kinds): v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- writing (tests, conversion)
def save_original_checkpoint(model, path: str | Path, with_config: bool = False) -> Path:
    """Write a facebookresearch/encodec-style `.th` state dict (atomically). `with_config` puts
    the architecture in `config.json` beside it, needed only for non-standard sizes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        torch.save(original_state_dict(model), tmp)
    if with_config:
        write_json_atomic(path.parent / "config.json", model.config.to_dict())
    return path


def save_hf_folder(model, folder: str | Path, weights: str = "model.safetensors") -> Path:
    """Write a Hugging Face model folder: config.json + model.safetensors or pytorch_model.bin."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if weights not in HF_WEIGHTS:
        raise ValueError(f"weights must be one of {HF_WEIGHTS}")
    with atomic_target(folder / weights) as tmp:
        if weights == "model.safetensors":
            save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(sd, tmp)
    write_json_atomic(folder / "config.json", model.config.to_dict())
    return folder


# ---------------------------------------------------------------- loading
@dataclass(frozen=True)
class WeightsFile:
    path: Path  # the weights file
    form: str  # "original" | "hf"
    config_path: Path | None


def codec_search_dir(path: str | Path | None) -> Path:
    if path:
        return Path(path).expanduser()
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()


def find_weights(path: str | Path | None, model: str = "24khz") -> WeightsFile:
    """Locate the weights: `path` (a .th file, an HF folder, or a folder holding either, also
    under `encodec_<model>/`), else $AMTRAIN_CODEC_DIR, else ~/.cache/amtrain/encodec."""
    where = codec_search_dir(path)
    if where.is_file():
        cfg = where.parent / "config.json"
        return WeightsFile(where, "original", cfg if cfg.is_file() else None)
    for folder in (where, where / f"encodec_{model}"):
        for name in HF_WEIGHTS:
            if (folder / name).is_file() and (folder / "config.json").is_file():
                return WeightsFile(folder / name, "hf", folder / "config.json")
        ths = sorted(folder.glob(f"encodec_{model}*.th")) if folder.is_dir() else []
        if ths:
            cfg = folder / "config.json"
            return WeightsFile(ths[0], "original", cfg if cfg.is_file() else None)
    raise UserError(
        f"no EnCodec {model} weights at {where}: put the original {ORIGINAL_NAMES[model]} "
        f"(facebookresearch/encodec) or the Hugging Face facebook/encodec_{model} folder "
        f"(config.json + model.safetensors) there, or pass --codec-path / set ${ENV_DIR}; without the "
        f"pretrained weights, `amtrain codec init {where}` makes a stand-in there (random weights) to try the path")


def load_state(wf: WeightsFile) -> dict[str, torch.Tensor]:
    try:
        if wf.path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(wf.path))
        else:
            sd = torch.load(wf.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise UserError(f"{wf.path}: cannot read EnCodec weights ({type(e).__name__}: {e}); re-download the file") from None
    if not isinstance(sd, dict):
        raise UserError(f"{wf.path}: not a state dict; expected an EnCodec checkpoint")
    if wf.form == "original" or any(k.startswith("quantizer.vq.") for k in sd):
        return {original_to_hf_key(k): v for k, v in sd.items()}
    return {_modern_weight_norm(k): v for k, v in sd.items()}


def build_model(config):
    from transformers import EncodecModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return EncodecModel(config).eval()


def load_codec(path: str | Path | None = None, model: str = "24khz") -> Codec:
    wf = find_weights(path, model)
    if wf.config_path is not None:
        from transformers import EncodecConfig

        try:
            config = EncodecConfig.from_dict(json.loads(wf.config_path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise UserError(f"{wf.config_path}: not an EncodecConfig ({e}); fix or remove it") from None
        if config.sampling_rate != int(model[:2]) * 1000:
            raise UserError(f"{wf.config_path}: a {config.sampling_rate // 1000} kHz EnCodec, but --codec-model is {model}; "
                            f"pass --codec-model {config.sampling_rate // 1000}khz or point --codec-path at the {model} weights")
        if model == "48khz":
            config.overlap = 0.0
    else:
        config = encodec_config(model)
    net = build_model(config)
    sd = load_state(wf)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{wf.path}: weights do not fit the EnCodec {model} architecture ({detail}); "
                        "use the matching checkpoint, or a config.json beside it for a non-standard size") from None
    return Codec(net, codec_id=f"encodec_{config.sampling_rate // 1000}khz@{file_sha256(wf.path)[:12]}")


# ---------------------------------------------------------------- the codec
class Codec:
    """An EnCodec model with the facts prep needs. encode/decode work on one window of audio;
    `amtrain.prep.audio` slides windows over files of any length."""

    def __init__(self, model, codec_id: str):
        self.model = model
        self.config = model.config
        self.codec_id = codec_id

    @property
    def sample_rate(self) -> int:
        return int(self.config.sampling_rate)

    @property
    def channels(self) -> int:
        return int(self.config.audio_channels)

    @property
    def hop_length(self) -> int:
        return int(self.config.hop_length)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def bandwidths(self) -> list[float]:
        return [float(b) for b in self.config.target_bandwidths]

    @property
    def chunk_frames(self) -> int | None:
        """Frames per normalised chunk (48 kHz: 150); None when the model encodes any length."""
        cl = self.config.chunk_length
        return None if cl is None else cl // self.hop_length

    def num_codebooks(self, bandwidth: float) -> int:
        """EnCodec's rule: floor(bandwidth / (frame rate x 10 bits)); 24 kHz: 1.5..24 kbps -> 2..32."""
        if bandwidth not in self.bandwidths:
            raise UserError(f"--bandwidth {bandwidth}: EnCodec {self.sample_rate // 1000} kHz supports "
                            f"{', '.join(f'{b:g}' for b in self.bandwidths)} kbps")
        return self.model.quantizer.get_num_quantizers_for_bandwidth(bandwidth)

    @torch.inference_mode()
    def encode(self, wave: np.ndarray, bandwidth: float) -> tuple[np.ndarray, np.ndarray | None]:
        """wave (C, N) float32 at `sample_rate` -> codes (K, ceil(N / hop)) int64 and, for
        normalising models, one scale per chunk."""
        self.num_codebooks(bandwidth)
        x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]  # (1, C, N)
        out = self.model.encode(x, bandwidth=bandwidth, return_dict=True)
        frames = out.audio_codes[:, 0]  # (S, K, Tc): S chunks
        codes = torch.cat(list(frames), dim=-1)  # (K, S*Tc)
        num_frames = -(-wave.shape[-1] // self.hop_length)
        scales = None
        if out.audio_scales[0] is not None:
            scales = torch.stack([s.reshape(()) for s in out.audio_scales]).float().numpy()
        return codes[:, :num_frames].numpy(), scales

    @torch.inference_mode()
    def decode(self, codes: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
        """codes (K, T) -> wave (C, T * hop) float32."""
        c = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (K, T)
        step = self.chunk_frames or c.shape[-1]
        parts = list(torch.split(c, step, dim=-1))
        pad = step - parts[-1].shape[-1]
        if pad:
            parts[-1] = torch.nn.functional.pad(parts[-1], (0, pad))
        frames = torch.stack(parts)[:, None]  # (S, 1, K, step)
        sc = [None] * len(parts) if scales is None else [torch.tensor([[float(s)]]) for s in scales]
        wave = self.model.decode(frames, sc, last_frame_pad_length=pad, return_dict=True).audio_values
        return wave[0, :, : c.shape[-1] * self.hop_length].float().numpy()


# ---------------------------------------------------------------- codebooks for random models
def stand_in_model(model: str, size: str, waves: list[np.ndarray], seed: int = 0):
    """A stand-in EnCodec: the `model` ("24khz" / "48khz") architecture (`size` "full", or the
    small "debug" one) with random weights seeded by `seed`, and codebooks fitted to `waves`
    ((C, N) at the model's rate). `amtrain codec init` writes one; tests use the debug size."""
    torch.manual_seed(seed)
    net = build_model(debug_config(model) if size == "debug" else encodec_config(model))
    init_codebooks_from_audio(net, waves, seed=seed)
    return net


@torch.inference_mode()
def init_codebooks_from_audio(model, waves: list[np.ndarray], num_iters: int = 4, seed: int = 0) -> None:
    """Give a randomly initialised model usable codebooks from encoder outputs of real audio:
    the first RVQ stage gets k-means centroids (random data points, then `num_iters` Lloyd
    steps); every later stage gets vectors drawn from a Gaussian matching the mean and spread
    of the residual the stages before it leave (k-means there would fit the few thousand
    frames exactly and leave zero residual, so deep stages would collapse onto one code).
    Codes from such a model use many entries at every stage; the weights stay random."""
    g = torch.Generator().manual_seed(seed)
    emb = []
    for w in waves:
        x = torch.from_numpy(np.asarray(w, dtype=np.float32))[None]  # (1, C, N)
        emb.append(model.encoder(x)[0].T)  # (T, D)
    residual = torch.cat(emb)  # (M, D)
    for i, layer in enumerate(model.quantizer.layers):
        book = layer.codebook
        k, dim = book.embed.shape
        if i == 0:
            cent = _kmeans(residual, k, num_iters, g)
        else:
            cent = residual.mean(0) + residual.std(0) * torch.randn(k, dim, generator=g)
        book.embed.copy_(cent)
        book.embed_avg.copy_(cent)
        residual = residual - cent[torch.cdist(residual, cent).argmin(1)]


def _kmeans(points: torch.Tensor, k: int, num_iters: int, g: torch.Generator) -> torch.Tensor:
    cent = points[torch.randint(0, points.shape[0], (k,), generator=g)].clone()  # (k, D)
    for _ in range(num_iters):
        assign = torch.cdist(points, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
    return cent
