"""Checkpoint I/O without pickles: tensors go to safetensors, everything else to JSON.

A *tree* is any nesting of dicts, lists, tuples, tensors, numpy arrays and JSON scalars (an optimizer's
``state_dict``, RNG states, an EMA). ``save_tree(stem, tree)`` writes ``stem.safetensors`` and
``stem.json``; ``load_tree(stem)`` reads them back.
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


def finish(tmp: Path, final: Path, keep: int) -> None:
    """Publish a fully written checkpoint by renaming it, then keep only the newest ``keep``."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in step_dirs(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
