"""Run configuration: one typed dataclass per concern, YAML files, dotted CLI overrides.

    RunConfig
      model   ModelConfig   which network (arch, size from the size table, overrides, compile)
      data    DataConfig    which token dataset, window length, sequence-length warm-up
      optim   OptimConfig   AdamW (or 8-bit AdamW), warm-up + cosine schedule, clipping
      batch   BatchConfig   micro-batch, accumulation or a global batch in tokens
      train   TrainConfig   steps, seed, eval/log/checkpoint cadence, run directory, precision,
                            rollouts during training
      denoise DenoiseConfig the T5 objective (model.arch t5): input length, span unit, curriculum
      ds_config             the DeepSpeed JSON (engine knobs only: ZeRO stage, offload, buckets)

A YAML run config states only what differs from the defaults:

    model: {size: small}
    train: {max_steps: 2000, out_dir: runs/kjv-small}

Command-line overrides use dotted keys and win over the YAML: `--model.size small
--train.max_steps 200`; `--data DIR` is short for `--data.path DIR`; `--config run.yaml` names
the YAML. Values are parsed as YAML scalars (`--optim.betas [0.9,0.95]` works).

The batch arithmetic (micro x accumulation x world = global; tokens per step) lives in ONE
function, `batch_plan`, and `apply_batch_plan` writes it into the DeepSpeed config.

Standard library only; PyYAML is imported lazily where a YAML file or value is read.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from amtrain.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT / "data" / "kjv" / "kjv_pentateuch.txt"
DEFAULT_DATA = REPO_ROOT / "data" / "kjv" / "prepped"
DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero2.json"

OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("auto", "fp32", "bf16")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"config {key}: {msg}")


@dataclass
class ModelConfig:
    arch: str = "decoder"
    """Model family (`amtrain.registry`): `decoder` (the parallel-block decoder), `lstm` (the
    recurrent baseline of scaling studies) or `t5` (the encoder-decoder denoiser, trained on the
    `denoise` objective); plugins add more."""
    size: str = "debug"
    """Row of the family's size table (`amtrain models` lists them): decoder debug, tiny, small,
    medium, large, xl, amt-gpt2; lstm debug ... large; t5 debug, tiny, small, base, large (each also
    as SIZE-parallel: one norm per layer, sub-blocks side by side)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the family's config (DecoderConfig, LSTMConfig, T5Config) to change from the
    size's row, e.g. {block: serial, dropout: 0.1}."""
    vocab_size: int | None = None
    """Model vocabulary; None = the dataset's. Must be >= the dataset's vocabulary. (t5: leave
    unset; its vocabulary is the dataset's plus the T5 specials and sentinels.)"""
    compile: bool = False
    """Wrap the model in torch.compile before handing it to DeepSpeed."""

    def __post_init__(self):
        from amtrain.registry import family_names

        _check(self.arch in family_names(), "model.arch", f"{self.arch!r} is not one of {', '.join(family_names())}")
        _check(isinstance(self.overrides, dict), "model.overrides", "must be a mapping of DecoderConfig fields")
        _check(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size", "must be positive")


@dataclass
class DataConfig:
    path: str = ""
    """Token dataset folder (made by `amtrain prep-text`/prep-midi/prep-audio). Empty = the bundled
    KJV corpus, prepped with gpt2 into data/kjv/prepped on first use."""
    seq_len: int = 128
    """Tokens per training window (the model sees seq_len inputs and seq_len targets)."""
    seq_len_warmup_steps: int = 0
    """Sequence-length warm-up: over this many steps the window grows linearly from
    seq_len_warmup_start to seq_len (0 = off). Windows are cut from the full-length ones."""
    seq_len_warmup_start: int = 32
    """First window length of the warm-up."""
    split: str = "train"
    """Split trained on."""
    val_split: str = "val"
    """Split evaluated on (empty = no validation)."""
    fim_rate: float = 0.5
    """Left-to-right families (decoder, LSTM): share of training windows turned into
    fill-in-the-middle examples (Bavarian et al. 2022; `amtrain.data.fim`), so the model can
    in-fill (`amtrain rollout --mode infill`); 0 = plain left-to-right windows. > 0 adds three
    sentinel ids above the dataset's vocabulary (model vocab_size + 3). Validation windows stay
    plain left-to-right. 0.5 measured at no left-to-right loss on the quickstart
    (docs/training.md, "Fill-in-the-middle"). The T5 denoiser in-fills by its own sentinels and
    ignores it."""
    fim_spm_rate: float = 0.5
    """Share of fill-in-the-middle examples in suffix-prefix-middle order (the rest
    prefix-suffix-middle)."""

    def __post_init__(self):
        _check(self.seq_len >= 2, "data.seq_len", f"{self.seq_len} is too short; use at least 2")
        _check(0.0 <= self.fim_rate <= 1.0, "data.fim_rate", f"{self.fim_rate} must lie in [0, 1]")
        _check(0.0 <= self.fim_spm_rate <= 1.0, "data.fim_spm_rate", f"{self.fim_spm_rate} must lie in [0, 1]")
        shortest = self.seq_len_warmup_start if self.seq_len_warmup_steps else self.seq_len
        _check(self.fim_rate == 0 or shortest >= 8, "data.fim_rate",
               "fill-in-the-middle needs windows of at least 8 tokens (data.seq_len, data.seq_len_warmup_start)")
        _check(self.seq_len_warmup_steps >= 0, "data.seq_len_warmup_steps", "must be >= 0")
        _check(1 <= self.seq_len_warmup_start <= self.seq_len, "data.seq_len_warmup_start",
               f"{self.seq_len_warmup_start} must lie in [1, data.seq_len={self.seq_len}]")

    def resolved_path(self) -> Path:
        return Path(self.path) if self.path else DEFAULT_DATA

    def seq_len_at(self, step: int) -> int:
        """Window length used at optimizer step `step` (0-based)."""
        if step >= self.seq_len_warmup_steps:
            return self.seq_len
        frac = step / self.seq_len_warmup_steps
        return int(self.seq_len_warmup_start + frac * (self.seq_len - self.seq_len_warmup_start))


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    """adamw (torch.optim.AdamW) or adamw8bit (bitsandbytes, `pip install amtrain[bnb]`, CUDA)."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay (train.max_steps)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices (2-D weights) only."""
    grad_clip: float | None = None
    """Global grad-norm clip. None = the DeepSpeed config's `gradient_clipping` (1.0 if absent);
    a value that contradicts the DeepSpeed config is an error."""

    def __post_init__(self):
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"{self.min_lr} must lie in [0, optim.lr={self.lr}]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        self.betas = tuple(self.betas)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two numbers in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip is None or self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")

    def lr_at(self, step: int, max_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up, cosine to min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


@dataclass
class BatchConfig:
    micro_batch: int = 8
    """Windows per rank per forward/backward (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum: int | None = None
    """Micro-batches accumulated per optimizer step. None = derived from global_tokens (or 1)."""
    global_tokens: int | None = None
    """Tokens per optimizer step over all ranks. When set, grad_accum is derived from it and the
    world size, so the global batch stays the same whatever the number of ranks."""

    def __post_init__(self):
        _check(self.micro_batch >= 1, "batch.micro_batch", "must be >= 1")
        _check(self.grad_accum is None or self.grad_accum >= 1, "batch.grad_accum", "must be >= 1")
        _check(self.global_tokens is None or self.global_tokens >= 1, "batch.global_tokens", "must be >= 1")


@dataclass
class TrainConfig:
    max_steps: int = 150
    """Optimizer steps to train for (the cosine schedule ends here)."""
    seed: int = 1337
    """Seed of the model init, the data order and every RNG."""
    out_dir: str = "runs/default"
    """Run directory: config, engine JSON, metrics, TensorBoard events, checkpoints/."""
    init_from: str = ""
    """Fine-tune: start from the weights and model config of an export folder (`amtrain export`,
    `amtrain import-hf`) instead of a fresh init; model.size is then unused, model.overrides
    may change only shape-free fields (dropout...). A checkpoint to resume from still wins."""
    resume: str = "auto"
    """auto: continue from out_dir's complete checkpoint with the highest step if there is one
    (found by scanning checkpoints/step_*, whatever `latest` says); never: start fresh (refused
    if out_dir holds complete checkpoints); or a checkpoint folder to start from."""
    log_every: int = 10
    """Steps between metric records (JSONL, TensorBoard, console)."""
    eval_every: int = 50
    """Steps between validation passes (0 = only at the end)."""
    eval_batches: int = 4
    """Micro-batches per rank per validation pass."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0 = only time-based and final)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint after the first step that starts this many minutes after the last
    checkpoint (0 = off); ranks agree through the step's all-reduce."""
    keep_last: int = 2
    """Complete checkpoints kept, counting down from the one just saved; older ones are deleted,
    newer ones (left by a run resumed from an earlier checkpoint) never (0 = keep all)."""
    precision: str = "auto"
    """auto: bf16 on CUDA, fp32 on CPU; or fp32 / bf16 explicitly."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device that MFU is stated against. None = measured at start (a dense
    matmul in the training precision)."""
    max_bad_steps: int = 5
    """Steps whose loss is NaN/inf are skipped (no update) and counted; this many in a row stop."""
    dist_timeout_s: float = 120.0
    """Collectives (and process-group start-up) give up after this long: a dead or hung rank
    makes the others exit with an error instead of hanging."""
    progress: bool = True
    """Rich progress bar on rank 0."""
    ep_size: int = 1
    """Expert parallelism (mixture-of-experts models): ranks per expert-parallel group; each
    computes model.n_routed_experts / ep_size of the experts for the tokens of the whole group,
    exchanged all-to-all (amtrain.train.experts). 1 = every rank computes every expert."""
    rollout_every: int = 0
    """Steps between rollouts of `rollout_prompts` during training (0 = off); rank 0 generates,
    text goes into metrics.jsonl (kind "rollout") and TensorBoard, MIDI/WAV files into
    out_dir/rollouts/step_N/."""
    rollout_prompts: list[str] = field(default_factory=list)
    """Prompts rolled out every `rollout_every` steps: text strings, or paths of prompt files
    (.txt text, .npy token ids, .mid MIDI, .npz audio codes)."""
    rollout_length: int = 64
    """Tokens generated per prompt and rollout."""
    codec_path: str = ""
    """Audio runs: the EnCodec weights the data was prepped with (as `amtrain rollout
    --codec-path`); rollouts during training are then written as .wav beside the codes, and
    the command printed after training names it. Empty: rollouts write the codes (.npy) only."""

    def __post_init__(self):
        _check(self.rollout_every >= 0, "train.rollout_every", "must be >= 0 (0 = off)")
        _check(self.rollout_length >= 1, "train.rollout_length", "must be >= 1")
        _check(not self.rollout_every or bool(self.rollout_prompts), "train.rollout_prompts",
               "is empty but train.rollout_every is set; give prompts or set train.rollout_every 0")
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_last", "max_bad_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0")
        _check(self.precision in PRECISIONS, "train.precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(self.peak_flops is None or self.peak_flops > 0, "train.peak_flops", "must be positive")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s", "must be positive")
        _check(self.ep_size >= 1, "train.ep_size", "must be >= 1")


@dataclass
class DenoiseConfig:
    """The T5 denoising objective (used when model.arch is t5): fixed-shape span-corruption / UL2
    batches (`amtrain.data.span_corruption.DenoisingBatcher`) whose mixture and difficulty a
    curriculum (`amtrain.data.curriculum`) decides every step."""

    inputs_length: int = 128
    """Encoder tokens per example (mode token, kept tokens, sentinels, EOS). The targets length
    is derived: the longest any denoiser the curriculum can reach needs
    (`required_targets_length`)."""
    num_sentinels: int = 100
    """Sentinel ids above the dataset's vocabulary (T5Vocab)."""
    unit: int | None = None
    """Tokens per span unit; None = from the tokenizer: 1 for text, 3 for MIDI (arrival-time
    triples), K for audio (one frame of K codebooks)."""
    unit_offset: int | None = None
    """Tokens skipped at each document start before the first unit; None = from the tokenizer
    (1 for MIDI: the AMT sequence flag; else 0)."""
    curriculum: dict[str, Any] = field(default_factory=dict)
    """CurriculumConfig fields (amtrain/data/curriculum.py), e.g. {mode: schedule,
    schedule_steps: 2000} or {mode: adaptive, window: 20, level_step: 0.25}."""
    priority: bool = False
    """Audio datasets: draw training chunks through the priority sampler (amtrain.data.priority)
    with the dataset's priority scores instead of uniformly."""
    priority_temperature: float = 1.0
    """P(chunk) ∝ priority ** (1 / temperature): 1 = proportional, -> 0 = the best chunks only,
    large = uniform."""
    exact_match_batches: int = 1
    """Validation micro-batches per span task (R, X) per rank decoded greedily for the exact
    match of reconstructed spans (0 = off)."""

    def __post_init__(self):
        _check(self.inputs_length >= 8, "denoise.inputs_length", f"{self.inputs_length} is too short; use at least 8")
        _check(self.num_sentinels >= 1, "denoise.num_sentinels", "must be >= 1")
        _check(self.unit is None or self.unit >= 1, "denoise.unit", "must be >= 1 (or null = from the tokenizer)")
        _check(self.unit_offset is None or self.unit_offset >= 0, "denoise.unit_offset", "must be >= 0")
        _check(self.exact_match_batches >= 0, "denoise.exact_match_batches", "must be >= 0")
        _check(self.priority_temperature > 0, "denoise.priority_temperature", "must be > 0")
        self.curriculum_config()  # a bad curriculum key is an error when the config is read

    def curriculum_config(self):
        """The CurriculumConfig these settings describe (UserError naming the key if wrong)."""
        from amtrain.data.curriculum import CurriculumConfig

        try:
            return CurriculumConfig(**self.curriculum)
        except (TypeError, ValueError) as e:
            raise UserError(f"config denoise.curriculum: {e}") from None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    ds_config: str = ""
    """DeepSpeed JSON (engine knobs). Empty = ds_configs/zero2.json."""

    def resolved_ds_config(self) -> Path:
        return Path(self.ds_config) if self.ds_config else DEFAULT_DS_CONFIG

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def diff_from_defaults(self) -> dict:
        """Only the values that differ from the defaults (what a YAML needs to say)."""
        return _diff(self.to_dict(), RunConfig().to_dict())


def _diff(d: dict, base: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("overrides", "curriculum"):
            sub = _diff(v, base[k])
            if sub:
                out[k] = sub
        elif v != base.get(k):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------- building from dicts / YAML / argv

def from_dict(d: dict, where: str = "config") -> RunConfig:
    """Build a RunConfig from a nested dict that states only what differs from the defaults."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections (model, data, optim, batch, train, denoise)")
    return _build(RunConfig, d, "", where)


def _build(cls, d: dict, prefix: str, where: str):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        key = prefix + unknown[0]
        raise UserError(f"{where}: unknown key {key}{_suggest(key)} (known: {', '.join(sorted(prefix + n for n in names))})")
    kwargs = {}
    for name, value in d.items():
        typ = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key} must be a mapping, got {value!r}")
            kwargs[name] = _build(typ, value, key + ".", where)
        else:
            kwargs[name] = _coerce(value, typ, key, where)
    return cls(**kwargs)


def all_keys() -> list[str]:
    """Every dotted key of a RunConfig (`model.size`, ..., `ds_config`)."""
    out = []
    for section in fields(RunConfig):
        typ = get_type_hints(RunConfig)[section.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            out += [f"{section.name}.{f.name}" for f in fields(typ)]
        else:
            out.append(section.name)
    return out


def _suggest(key: str) -> str:
    """'; did you mean --train.max_steps?' for a key that is a known leaf without its section,
    or close to a known key; else ''."""
    import difflib

    keys = all_keys()
    leaf = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = leaf or difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"; did you mean --{close[0]}?" if close else ""


def _coerce(value, typ, key: str, where: str):
    """Check/convert one YAML value against a field's annotation."""
    origin, args = get_origin(typ), get_args(typ)
    if value is None:
        if type(None) in args:
            return None
        raise UserError(f"{where}: {key} may not be null")
    if args and type(None) in args:  # X | None
        typ = next(a for a in args if a is not type(None))
        origin, args = get_origin(typ), get_args(typ)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is bool and isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, list | tuple) and len(value) == len(args):
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, args, strict=True))
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is list and isinstance(value, list):
        return [_coerce(v, args[0], key, where) for v in value]
    if origin is list and isinstance(value, str):  # one item given alone
        return [_coerce(value, args[0], key, where)]
    name = getattr(typ, "__name__", str(typ))
    article = "an" if name[:1] in "aeiou" else "a"
    raise UserError(f"{where}: {key} = {value!r} is not {article} {name}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: run config not found; pass an existing YAML with --config")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if d is not None and not isinstance(d, dict):
        raise UserError(f"{path}: a run config is a mapping of sections (model:, data:, optim:, batch:, train:, "
                        f"denoise:), this YAML is a {type(d).__name__}")
    return d or {}


def set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise UserError(f"--{key}: {p} is not a section")
    d[parts[-1]] = value


def parse_value(text: str):
    """A command-line value, read as a YAML scalar/list (`3e-4`, `true`, `[0.9,0.95]`, `null`)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(argv: list[str]) -> RunConfig:
    """`[--config run.yaml] [--data DIR] [--ds_config JSON] [--section.key value ...]` -> RunConfig.
    `--local_rank N` (added by the deepspeed launcher) is accepted and ignored: ranks come from the
    environment."""
    yaml_path, pairs = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options are --config FILE, --data DIR, --ds_config FILE, --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            yaml_path = value
        elif key == "local_rank":
            continue
        elif key == "data":
            pairs.append(("data.path", value))
        elif key == "ds_config":
            pairs.append(("ds_config", value))
        else:
            pairs.append((key, parse_value(value)))
    d = load_yaml(yaml_path) if yaml_path else {}
    if yaml_path:
        from_dict(copy.deepcopy(d), where=yaml_path)  # the YAML alone: its own mistakes name it
    for key, value in pairs:
        set_dotted(d, key, value)
    return from_dict(d, where="command line" if pairs or not yaml_path else yaml_path)


def to_yaml(cfg: RunConfig, full: bool = True) -> str:
    import yaml

    d = cfg.to_dict() if full else cfg.diff_from_defaults()
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)


# ---------------------------------------------------------------- batch arithmetic (the one place)

@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Windows per rank per micro-step."""
    grad_accum: int
    """Micro-steps per optimizer step."""
    world_size: int
    """Data-parallel ranks."""
    seq_len: int
    """Tokens per window."""

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def batch_plan(batch: BatchConfig, seq_len: int, world_size: int) -> BatchPlan:
    """micro x accumulation x world = global; tokens per step = global x seq_len."""
    accum = batch.grad_accum
    if batch.global_tokens is not None:
        per_micro = batch.micro_batch * world_size * seq_len
        derived, rem = divmod(batch.global_tokens, per_micro)
        if rem or derived < 1:
            raise UserError(
                f"config batch.global_tokens = {batch.global_tokens} is not a multiple of batch.micro_batch "
                f"x world size x data.seq_len = {batch.micro_batch} x {world_size} x {seq_len} = {per_micro}; "
                f"choose a multiple of {per_micro}")
        if accum is not None and accum != derived:
            raise UserError(f"config batch.grad_accum = {accum} contradicts batch.global_tokens = {batch.global_tokens} "
                            f"(which gives {derived} at world size {world_size}); set only one of them")
        accum = derived
    return BatchPlan(batch.micro_batch, accum or 1, world_size, seq_len)


_BATCH_KEYS = {"train_micro_batch_size_per_gpu": "micro_batch", "gradient_accumulation_steps": "grad_accum",
               "train_batch_size": "global_batch"}


def apply_batch_plan(ds_config: dict, plan: BatchPlan, ds_name: str = "ds_config") -> dict:
    """Write the plan into a DeepSpeed config (a copy); a ds_config that already states a batch key
    with another value is an error naming both keys."""
    run_keys = {"micro_batch": "batch.micro_batch", "grad_accum": "batch.grad_accum / batch.global_tokens",
                "global_batch": "batch.micro_batch x batch.grad_accum x world size"}
    out = dict(ds_config)
    for ds_key, attr in _BATCH_KEYS.items():
        want = getattr(plan, attr)
        have = ds_config.get(ds_key)
        if have is not None and have != "auto" and have != want:
            raise UserError(f"{ds_name} {ds_key} = {have} contradicts the run config's {run_keys[attr]} = {want}; "
                            f"remove {ds_key} from {ds_name} (amtrain derives it)")
        out[ds_key] = want
    return out


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source), by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every dotted key with its type, default and the first sentence of its field doc."""
    lines = ["run config keys (--section.key VALUE; full docs per field in amtrain/config.py):"]
    top = field_docs(RunConfig)
    for section in fields(RunConfig):
        typ = get_type_hints(RunConfig)[section.name]
        if not (isinstance(typ, type) and dataclasses.is_dataclass(typ)):
            lines.append(f"  --{section.name:<32} default: {getattr(RunConfig(), section.name)!r}")
            lines.append(f"      {_first_sentence(top.get(section.name, ''))}")
            continue
        hints = get_type_hints(typ)
        docs = field_docs(typ)
        for f in fields(typ):
            default = getattr(typ(), f.name)
            name = getattr(hints[f.name], "__name__", None) or str(hints[f.name])
            lines.append(f"  --{section.name}.{f.name:<{31 - len(section.name)}} {name:<22} default: {default!r}")
            lines.append(f"      {_first_sentence(docs.get(f.name, ''))}")
    return "\n".join(lines)


def _first_sentence(doc: str) -> str:
    import re

    m = re.search(r"(?<!e\.g)(?<!i\.e)\.\s", doc)
    return doc if m is None else doc[:m.start() + 1]
