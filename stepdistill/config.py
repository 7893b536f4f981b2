"""Dataclass configs, loaded from YAML with dotted overrides, validated with errors that name the key.

A run config has the sections ``model``, ``data``, ``train``, ``optim`` (one entry per phase of the method)
and ``objective`` (the method's own dataclass, registered with the method), plus ``method`` and
``output_dir``. Unknown keys, wrong types and bad values raise :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and what is allowed."""


def ranged(default, *, ge=None, gt=None, le=None, lt=None, note: str = ""):
    """A dataclass field whose number must lie in a range (checked by :func:`build` where the schema is read, with
    the key and the range in the error); ``None`` stays allowed where the type allows it. ``note`` says what an
    edge value means (e.g. ``0: off``)."""
    return field(default=default, metadata={"range": {"ge": ge, "gt": gt, "le": le, "lt": lt}, "note": note})


def _check_range(value, spec: dict, note: str, key: str) -> None:
    if value is None or isinstance(value, bool):
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    bounds = [(">=", spec["ge"], lambda v, b: v >= b), (">", spec["gt"], lambda v, b: v > b),
              ("<=", spec["le"], lambda v, b: v <= b), ("<", spec["lt"], lambda v, b: v < b)]
    for v in values:
        for sign, bound, ok in bounds:
            if bound is not None and not ok(v, bound):
                allowed = " and ".join(f"{s} {b}" for s, b, _ in bounds if b is not None)
                raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}" + (f" ({note})" if note
                                                                                              else ""))


@dataclass
class ModelConfig:
    """Where the teacher comes from, or (for ``train-teacher``) how to build one.

    ``source``: a local Diffusers folder, a Hub id (read from the local cache; offline, a missing model is
    an error saying how to get it), or ``digits-teacher`` (the shipped teacher). For teacher training,
    ``source`` is empty and ``backbone``/``backbone_config``/``scheduler_config`` describe a new model.
    ``attention``: ``sdpa`` (PyTorch's scaled-dot-product attention, Diffusers' default) or ``xformers`` (its
    memory-efficient kernels; CUDA only, ``pip install -e ".[xformers]"``).
    """

    source: str = "digits-teacher"
    subfolder: str | None = None
    revision: str | None = None
    variant: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    backbone: str | None = None
    backbone_config: dict = field(default_factory=dict)
    scheduler: str = "DDPMScheduler"
    scheduler_config: dict = field(default_factory=dict)
    prediction_type: str | None = None
    attention: Literal["sdpa", "xformers"] = "sdpa"


@dataclass
class DataConfig:
    """``digits`` (embedded), ``folder`` (``path`` to PNG/JPEG, optional class sub-folders), ``prompts``
    (``path`` to a prompt file), ``pairs`` (``path`` to teacher pairs from ``stepdistill make-pairs``) or
    ``none`` (data-free methods). For a latent teacher ``resolution`` is the LATENT resolution (SD 1.5 at 512 px:
    64); ``prompts`` are encoded by the teacher's own text encoders, and images a ``.jsonl`` names are read at
    ``resolution`` times the VAE's factor and served as latents. ``channels`` are image channels (digits, folder)."""

    dataset: Literal["digits", "folder", "prompts", "pairs", "none"] = "digits"
    path: str | None = None
    resolution: int = ranged(16, ge=1)
    channels: int = ranged(1, ge=1)
    split: Literal["all", "train", "test"] = "all"
    # image-to-image (super-resolution) data: each item also carries ``source_image``, the image reduced to this
    # resolution (area) and brought back to ``resolution`` (nearest), for teachers that take it concatenated
    source_resolution: int | None = ranged(None, ge=1)


@dataclass
class OptimConfig:
    """An optimizer (AdamW, or RAdam as iCT trains with) and an LR schedule for one phase; ``every``: update on steps
    where step % every == 0.

    ``lr_schedule`` is one of Diffusers' schedules, or ``warmup_stable_decay``: the warm-up, then ``lr`` held, then a
    linear fall to 0 over the last ``decay_steps`` updates, a number of updates (2000) or, below 1, a fraction of the
    phase's updates (0.25: the last quarter); the other schedules ignore it. A resumed run with a larger
    ``train.max_steps`` moves the decay to its new end."""

    optimizer: Literal["adamw", "radam"] = "adamw"
    lr: float = ranged(1e-4, gt=0)
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = ranged(0.0, ge=0)
    eps: float = ranged(1e-8, gt=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine",
                         "warmup_stable_decay"] = "constant_with_warmup"
    warmup_steps: int = ranged(0, ge=0)
    decay_steps: float = ranged(0, ge=0)
    max_grad_norm: float | None = ranged(1.0, gt=0, note="null: no clipping")
    every: int = ranged(1, ge=1, note="1: every step")


@dataclass
class TrainConfig:
    max_steps: int = ranged(1000, ge=1)
    batch_size: int = ranged(64, ge=1)
    grad_accum: int = ranged(1, ge=1, note="1: no accumulation")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = ranged(None, ge=1, note="null: torch's default")
    checkpoint_every: int = ranged(500, ge=0, note="0: only at the end and on a signal")
    keep_checkpoints: int = ranged(2, ge=0, note="0: keep all")
    log_every: int = ranged(10, ge=1)
    sample_every: int = ranged(0, ge=0, note="0: no sample grids")
    num_samples: int = ranged(64, ge=1)
    ema_decay: float = ranged(0.0, ge=0, lt=1, note="0: no EMA")
    ema_warmup: bool = False
    ema_update_after: int = ranged(0, ge=0)
    trackers: list[str] = field(default_factory=list)
    progress: bool = True
    # settings (dotted keys) a resume may change on purpose besides those that always may (see
    # stepdistill.trainers.checkpoint.RESUMABLE), e.g. [train.batch_size] to continue a run at a larger batch
    allow_changed: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    method: str = "teacher"
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: dict[str, OptimConfig] = field(default_factory=dict)
    objective: Any = None

    @property
    def cache_dir(self) -> Path:
        """Where the run caches what it derives from its inputs (encoded prompts, the null prompt, VAE latents)."""
        return Path(self.output_dir) / "cache"


# ---------------------------------------------------------------------------------------- typing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against the type hint ``tp`` (converting YAML strings like '1e-4' to float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; allowed keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            _check_range(getattr(obj, f.name), f.metadata["range"], f.metadata["note"],
                         f"{prefix}.{f.name}" if prefix else f.name)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


# ---------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


def load_raw(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model, data, train, ...)")
    return raw


def build_run(raw: dict, method) -> RunConfig:
    """Turn a raw mapping into a RunConfig for ``method`` (an objective class: its ``Config`` dataclass, its
    ``phases(config)`` and ``optim_defaults(config)``); ``objective`` becomes the method's config dataclass and
    ``optim`` gets one :class:`OptimConfig` per phase, the method's defaults under the user's settings."""
    raw = dict(raw)
    method_name = raw.get("method", "teacher")
    objective = raw.pop("objective", None)
    optim = raw.pop("optim", None) or {}
    config = build(RunConfig, raw)
    config.objective = build(method.Config, objective, "objective")
    phases = [phase.name for phase in method.phases(config.objective)]
    if not isinstance(optim, dict):
        raise ConfigError(f"optim: expected a mapping of phase names ({', '.join(phases)}) to optimizer settings")
    for name in optim:
        if name not in phases:
            raise ConfigError(f"unknown key 'optim.{name}'; method {method_name!r} has the phases: {', '.join(phases)}")
    config.optim = {}
    for name in phases:
        merged = {**method.optim_defaults(config.objective).get(name, {}), **(optim.get(name) or {})}
        config.optim[name] = build(OptimConfig, merged, f"optim.{name}")
        _check_schedule(config.optim[name], f"optim.{name}", max(1, config.train.max_steps // config.optim[name].every))
    return config


def decay_updates(oc: OptimConfig, updates: int) -> int:
    """``oc.decay_steps`` as a number of updates of a phase that makes ``updates`` of them."""
    return max(1, round(oc.decay_steps * updates)) if oc.decay_steps < 1 else int(oc.decay_steps)


def _check_schedule(oc: OptimConfig, key: str, updates: int) -> None:
    if oc.warmup_steps < 0 or oc.decay_steps < 0:
        raise ConfigError(f"{key}: warmup_steps and decay_steps must be >= 0")
    if oc.lr_schedule != "warmup_stable_decay":
        return
    if oc.decay_steps == 0:
        raise ConfigError(f"{key}: lr_schedule=warmup_stable_decay needs decay_steps > 0: the updates over which the "
                          "lr falls to 0 at the end of the run (e.g. 2000), or their fraction of the run (e.g. 0.25)")
    if oc.decay_steps > 1 and oc.decay_steps != int(oc.decay_steps):
        raise ConfigError(f"{key}.decay_steps={oc.decay_steps} is neither a whole number of updates nor a fraction "
                          "below 1 of the run")
    decay = decay_updates(oc, updates)
    if oc.warmup_steps + decay > updates:
        raise ConfigError(f"{key}: warmup_steps + decay_steps ({oc.warmup_steps} + {decay}) exceed the run's "
                          f"{updates} updates of this phase; lower them, give decay_steps as a fraction of the run "
                          "(e.g. 0.25), or raise train.max_steps")


def read_config(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None) -> dict:
    """The raw mapping of a YAML recipe with ``defaults`` under it and dotted ``overrides`` over it."""
    return apply_overrides({**(defaults or {}), **load_raw(path)}, list(overrides))


def to_dict(config) -> dict:
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()[:16]
