"""The user's DeepSpeed JSON checked against DeepSpeed's own config schema, before any engine.

DeepSpeed ignores a top-level key it does not read (`zero_optimisation` silently trains at
ZeRO-0), keeps scalars it does not type (`steps_per_print: "x"` crashes at the first step) and
raises a pydantic traceback for a bad section value (a ZeRO stage of 7) only inside
`deepspeed.initialize`. `check_ds_config` turns each into one `UserError` line at start:

  * ZeRO stage: one of DeepSpeed's `ZeroStageEnum` values (0-3);
  * sections: DeepSpeed's own `DeepSpeedConfig` parses the file (its pydantic models such as
    `DeepSpeedZeroConfig` validate every section); its first complaint becomes the line, with
    the closest field name for an unknown one inside a section;
  * top-level keys: the known keys are the ones `DeepSpeedConfig` looks up while parsing this
    very config (recorded by handing it a dict that notes every lookup), plus
    `data_parallel_size` and `sequence_parallel_size`, which `deepspeed.initialize` reads
    itself. Any other key is an error naming the closest known one;
  * scalar types: the type of DeepSpeed's default for the key in `deepspeed.runtime.constants`
    (`<KEY>_DEFAULT`: bool, int, float or str), and int for `steps_per_print`, whose default
    there is None but which DeepSpeed uses as a step modulus.
"""

from __future__ import annotations

import difflib

from amtrain.errors import UserError

READ_BY_INITIALIZE = ("data_parallel_size", "sequence_parallel_size")
"""Top-level keys `deepspeed.initialize` reads outside `DeepSpeedConfig`."""
NONE_DEFAULT_TYPES = {"steps_per_print": int}
"""Scalars whose DeepSpeed default is None, so the constants do not give their type."""
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_ds_config(ds: dict, name: str) -> None:
    """One UserError line for the first mistake in the DeepSpeed config `ds` (read from `name`)."""
    check_zero_stage(ds, name)
    known = read_keys(ds, name) | set(READ_BY_INITIALIZE)
    for key in ds:
        if key not in known:
            raise UserError(f"{name}: unknown DeepSpeed key {key!r} (DeepSpeed would ignore it){closest(key, known)}")
    for key, typ in scalar_types().items():
        if key in ds and not _is(ds[key], typ):
            raise UserError(f"{name}: {key} = {ds[key]!r} is not {_article(typ)} {typ.__name__}")


def check_zero_stage(ds: dict, name: str) -> None:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    zero = ds.get("zero_optimization", {})
    stages = sorted({s.value for s in ZeroStageEnum})
    if isinstance(zero, dict) and "stage" in zero and not (_is(zero["stage"], int) and zero["stage"] in stages):
        raise UserError(f"{name}: zero_optimization.stage = {zero['stage']!r} is not a ZeRO stage; use one of "
                        f"{', '.join(map(str, stages))}")


class _Recorder(dict):
    """A dict that notes every key looked up in it (copies share the notes)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: set[str] = set()

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, d: _Recorder):
        self.d = d

    def __contains__(self, key):
        return key in self.d

    def __iter__(self):
        return iter(dict.keys(self.d))


def read_keys(ds: dict, name: str) -> set[str]:
    """Parse `ds` with DeepSpeed's `DeepSpeedConfig` (batch keys replaced by 1s: amtrain derives
    them, `amtrain.config.apply_batch_plan`) -> the top-level keys it looked up. Its complaint,
    if any, is one UserError line."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    body = {k: v for k, v in ds.items() if k not in BATCH_KEYS}
    rec = _Recorder(body, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    try:
        DeepSpeedConfig(rec)
    except pydantic.ValidationError as e:
        raise UserError(f"{name}: {_describe(e, ds)}") from None
    except (DeepSpeedConfigError, TypeError, ValueError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name}: DeepSpeed cannot read this config: {first}") from None
    return rec.seen


def _describe(e, ds: dict) -> str:
    """A pydantic error of one DeepSpeed section as 'section.field = value: what is wrong'."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    section = next((k for k, v in ds.items() if isinstance(v, dict) and _dig(v, loc) is not _MISSING), e.title)
    key = ".".join([section, *loc])
    if err["type"] == "extra_forbidden":
        fields = _model_fields(e.title) if len(loc) == 1 else set()
        return f"unknown key {key}{closest(loc[-1], fields)}"
    return f"{key} = {err['input']!r}: {err['msg']}"


_MISSING = object()


def _dig(d, path: list[str]):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return _MISSING
        d = d[p]
    return d


def _model_fields(title: str) -> set[str]:
    """Field names and aliases of DeepSpeed's config model class named `title`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, out = [DeepSpeedConfigModel], set()
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__name__ == title:
            for field_name, info in cls.model_fields.items():
                out |= {field_name, info.alias} - {None}
    return out


def scalar_types() -> dict[str, type]:
    """Top-level key -> type, from DeepSpeed's `<NAME>_DEFAULT` constants (module doc)."""
    import deepspeed.runtime.constants as c

    names = vars(c)
    out = {value: type(names[n + "_DEFAULT"]) for n, value in names.items()
           if n.isupper() and isinstance(value, str) and isinstance(names.get(n + "_DEFAULT"), bool | int | float | str)}
    return out | NONE_DEFAULT_TYPES


def _is(value, typ: type) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _article(typ: type) -> str:
    return "an" if typ.__name__[0] in "aeiou" else "a"


def closest(key: str, known) -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""
