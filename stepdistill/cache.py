"""Content hashes (tensors, modules, tokenizers, files) and atomic safetensors caches keyed by them."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch


def _update_tensor(h, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(memoryview(tensor.reshape(-1).cpu().contiguous().view(torch.uint8).numpy()))


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    _update_tensor(h, "", tensor)
    return h.hexdigest()


def _config_dict(config) -> dict:
    config = dict(config) if isinstance(config, dict) else config.to_dict()
    # Leave out what names the origin or the library version, not the model.
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's class, config (Diffusers or transformers ``config``, if any) and state dict."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(_config_dict(config), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        _update_tensor(h, name, tensor)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's class, maximum length, and its full serialization (vocabulary, merges, added
    tokens) where it has a ``tokenizers`` backend, else its vocabulary."""
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'model_max_length', None)}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Padding and truncation settings are changed by each call; they are call options, not the tokenizer.
        state.pop("padding", None), state.pop("truncation", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(files, root: Path, memo_dir=None) -> list[tuple[str, str]]:
    """(path relative to ``root``, sha256 of the content) per file. With ``memo_dir`` the digests are memoized
    in ``memo_dir/file-digests.json`` by absolute path, size and mtime, so large weights are read once."""
    memo_path = Path(memo_dir).expanduser() / "file-digests.json" if memo_dir is not None else None
    memo = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    out, changed = [], False
    for path in files:
        path = Path(path)
        stat = path.stat()
        tag = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = memo.get(tag)
        if digest is None:
            digest, changed = file_sha256(path), True
            memo[tag] = digest
        out.append((path.relative_to(root).as_posix(), digest))
    if memo_path is not None and changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, memo_path)
    return out


def save_tensor_cache(path: str | Path, tensors: dict[str, torch.Tensor], key: str,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (to CPU) as a safetensors file whose metadata holds ``key``; atomic (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={**(metadata or {}), "key": key})
    os.replace(tmp, path)
    return path


def load_tensor_cache(path: str | Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written with the same ``key``; None if absent, stale or unreadable."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # a damaged file is recomputed, not fatal
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}")
        return None


# --------------------------------------------------------------------------------------------------------------
