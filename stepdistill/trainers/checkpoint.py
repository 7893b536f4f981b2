"""Checkpoint I/O without pickles: tensors go to safetensors, everything else to JSON.

A *tree* is any nesting of dicts, lists, tuples, tensors, numpy arrays and JSON scalars (an optimizer's
``state_dict``, RNG states, an EMA). ``save_tree(stem, tree)`` writes ``stem.safetensors`` and
``stem.json``; ``load_tree(stem)`` reads them back.

A checkpoint is published whole: written to a temporary folder, its files flushed to disk with a sha256 each in
``files.json``, then renamed; resuming checks every file against its hash. ``settings`` in ``trainer.json`` are
the run's settings, so that a resume with other run-defining settings is refused (:func:`changed_settings`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..cache import file_sha256


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match the run's modules."""


def _flatten(obj, tensors: dict, prefix: str):
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        return {"__items__": [[_flatten(k, tensors, prefix), _flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(node, tensors: dict):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return tensors[node["__ndarray__"]].numpy()
        if "__tuple__" in node:
            return tuple(_unflatten(v, tensors) for v in node["__tuple__"])
        if "__items__" in node:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in node["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in node["__dict__"].items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def save_tree(stem: Path, tree) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(tree, tensors, stem.name)
    save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(structure))


def load_tree(stem: Path):
    try:
        tensors = load_file(f"{stem}.safetensors")
        structure = json.loads(Path(f"{stem}.json").read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {exc.filename} is missing") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {stem}.* is corrupt ({exc}); delete {stem.parent} "
                              "to resume from the previous checkpoint") from exc
    return _unflatten(structure, tensors)


def save_module(module: torch.nn.Module, path: Path, names: list[str]) -> None:
    """Save the named parameters (the trainable ones) of ``module`` as safetensors."""
    params = dict(module.named_parameters())
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(path))


def load_module(module: torch.nn.Module, path: Path, names: list[str]) -> None:
    """Load trainable parameters saved by :func:`save_module`, insisting that the names match exactly."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({exc}); delete {path.parent} "
                              "to resume from the previous checkpoint") from exc
    missing, unexpected = set(names) - set(tensors), set(tensors) - set(names)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the module built from the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was the checkpoint written with another config?")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n in names:
            if params[n].shape != tensors[n].shape:
                raise CheckpointError(f"{path}: {n} has shape {tuple(tensors[n].shape)} in the checkpoint but "
                                      f"{tuple(params[n].shape)} in the model built from the config")
            params[n].copy_(tensors[n])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (``step_XXXXXXX`` folders) under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


FILES = "files.json"
#: settings a resumed run may change: its length and the end of its schedules, how it logs, samples and saves, and
#: how fast it runs; any other difference from the checkpoint's settings is refused (``train.allow_changed`` lists
#: keys to change on purpose)
RESUMABLE = ("output_dir", "train.max_steps", "train.threads", "train.progress", "train.log_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.sample_every", "train.num_samples",
             "train.trackers", "train.gradient_checkpointing", "train.allow_changed", "model.attention",
             "optim.*.lr_schedule", "optim.*.decay_steps")


def flat_settings(tree, prefix: str = "") -> dict:
    """A config as ``{dotted key: value}`` (what ``trainer.json`` records and a resume compares)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(flat_settings(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def changed_settings(saved: dict, current: dict, allowed=()) -> list[str]:
    """The run-defining keys whose values differ between a checkpoint's settings and this run's, as
    ``key: old -> new``; keys in :data:`RESUMABLE` (``*`` for any phase) and in ``allowed`` may differ."""
    def free(key):
        parts = key.split(".")
        wild = ".".join(["optim", "*", *parts[2:]]) if parts[0] == "optim" and len(parts) > 2 else key
        return key in RESUMABLE or wild in RESUMABLE or any(key == a or key.startswith(f"{a}.") for a in allowed)

    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if not free(k) and json.dumps(saved.get(k), default=str) != json.dumps(current.get(k), default=str)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(tmp: Path, final: Path, keep: int) -> None:
    """Publish a fully written checkpoint: record each file's sha256, flush the files and the folder to disk (a
    power loss cannot leave a published checkpoint with empty files), rename it, then keep only the newest ``keep``
    (the one just published is always kept)."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    (tmp / FILES).write_text(json.dumps({p.name: file_sha256(p) for p in files}, indent=1))
    for path in [*files, tmp / FILES, tmp]:
        _fsync(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in step_dirs(final.parent)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> None:
    """Check every file of a published checkpoint against the sha256 recorded when it was written (a checkpoint
    written before hashes were recorded is taken as it is)."""
    record = path / FILES
    if not record.is_file():
        return
    try:
        hashes = json.loads(record.read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable {FILES} ({exc}); delete {path} to resume from "
                              "the previous checkpoint") from exc
    for name, digest in hashes.items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint file {path / name} is missing; delete {path} to resume from the "
                                  "previous checkpoint")
        if file_sha256(path / name) != digest:
            raise CheckpointError(f"checkpoint file {path / name} is not what was written (its sha256 differs: "
                                  f"damaged or changed); delete {path} to resume from the previous checkpoint")


def check_finite(tensors, what: str) -> None:
    """Raise :class:`NonFiniteWeights` naming the first tensor of ``tensors`` (name -> tensor) with NaN or inf."""
    for name, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeights(f"{what} {name} holds NaN or inf values")


class NonFiniteWeights(FloatingPointError):
    """Weights or optimizer state became NaN or inf; the checkpoint was not written."""
