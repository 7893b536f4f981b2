"""Data: the embedded digits, a user's image folders, and a resumable batch order.

Every data set yields dicts: ``image`` (float CxHxW in [-1, 1], or latents for a latent denoiser) and, where
known, ``class_label`` (int64); prompt data sets add ``prompt`` and the text conditioning (``Cond`` field names).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DIGITS_TEST_FRACTION = 0.2  # held out for the digits feature extractor's accuracy
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """Bad input data, with a message that says what is wrong and how to fix it."""


def digits_tensors(resolution: int = 16, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits (1,797 images, 8x8, values 0..16) as ``[-1, 1]`` images.

    They are upsampled bilinearly from 8x8 to ``resolution`` (16 by default): 16x16 lets a UNet2DModel
    downsample twice (16 -> 8 -> 4) while bilinear keeps strokes smooth instead of the 2x2 blocks of
    nearest-neighbour, so the teacher learns strokes rather than block edges. ``split`` is ``all``,
    ``train`` or ``test`` (a fixed, class-stratified 80/20 split).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    if split == "all":
        return images, labels
    if split not in ("train", "test"):
        raise DataError(f"digits split must be 'all', 'train' or 'test', not {split!r}")
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        test[rng.choice(idx, size=round(len(idx) * DIGITS_TEST_FRACTION), replace=False)] = True
    keep = torch.from_numpy(test if split == "test" else ~test)
    return images[keep], labels[keep]


class TensorImages(torch.utils.data.Dataset):
    """Images (and optional labels) held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None):
        self.images, self.labels = images, labels
        self.num_classes = num_classes if num_classes is not None else (
            int(labels.max()) + 1 if labels is not None else None)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["class_label"] = self.labels[i]
        return item


def digits_dataset(resolution: int = 16, split: str = "all") -> TensorImages:
    images, labels = digits_tensors(resolution, split)
    return TensorImages(images, labels, num_classes=10)


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """Read an image, resize its shorter side to ``resolution``, center-crop, map to [-1, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            scale = resolution / min(w, h)
            img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BICUBIC)
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises many types
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    return tensor * 2 - 1


class ImageFolder(torch.utils.data.Dataset):
    """A folder of PNG/JPEG images, searched recursively.

    If every image sits in a first-level sub-folder, the sorted sub-folder names become class labels.
    Images are decoded once, resized (shorter side) and center-cropped to ``resolution``, and kept in memory.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist (data.path); give a folder of PNG/JPEG images")
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), not {channels}")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise DataError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        parents = {p.relative_to(root).parts[0] for p in self.paths if len(p.relative_to(root).parts) > 1}
        labelled = all(len(p.relative_to(root).parts) > 1 for p in self.paths)
        self.classes = sorted(parents) if labelled else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.images = torch.stack([load_image(p, resolution, channels) for p in self.paths])
        self.labels = (torch.tensor([index[p.relative_to(root).parts[0]] for p in self.paths])
                       if self.classes else None)
        self.num_classes = len(self.classes) or None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["class_label"] = self.labels[i]
        return item


class ResumableBatches:
    """An endless, deterministic order of batches that can resume at any position.

    Epoch ``e`` is a permutation drawn from ``seed + e``; each process takes every ``world``-th batch. The
    position (epoch, batch) is all the state there is, so a resumed run sees exactly the batches the
    uninterrupted run would have.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0):
        if len(dataset) < batch_size * world:
            raise DataError(f"the data set has {len(dataset)} items, fewer than one global batch "
                            f"({batch_size} x {world} processes); lower train.batch_size or add data")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.batches_per_epoch = len(dataset) // (batch_size * world)
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch:
                start = (self.position * self.world + self.rank) * self.batch_size
                idx = order[start:start + self.batch_size].tolist()
                self.position += 1
                yield collate([self.dataset[i] for i in idx])
            self.epoch, self.position = self.epoch + 1, 0


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8 (rounded), as saved to PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """A [-1, 1] batch (B, C, H, W) as one HxWxC uint8 grid with 1-pixel gaps."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.zeros(c, rows * (h + 1) + 1, nrow * (w + 1) + 1, dtype=torch.uint8)
    pixels = to_uint8(images.cpu())
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    from PIL import Image

    img = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def low_resolution(image: torch.Tensor, source_resolution: int) -> torch.Tensor:
    """A super-resolution source: ``image`` (C, H, W) reduced to ``source_resolution`` by area averaging, then
    brought back to H x W by nearest neighbour (so that it can be concatenated to the noisy sample)."""
    small = F.interpolate(image[None].float(), size=(source_resolution, source_resolution), mode="area")
    return F.interpolate(small, size=image.shape[-2:], mode="nearest")[0]


class WithSource(torch.utils.data.Dataset):
    """Items of ``dataset`` plus ``source_image`` = :func:`low_resolution` of their image."""

    def __init__(self, dataset, source_resolution: int):
        self.dataset, self.source_resolution = dataset, source_resolution
        self.num_classes = getattr(dataset, "num_classes", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item["source_image"] = low_resolution(item["image"], self.source_resolution)
        return item


def build_dataset(cfg, model_cfg=None, cache_dir: str | Path | None = None):
    """The data set a :class:`~stepdistill.config.DataConfig` names (None for ``dataset: none``), with source
    images when ``source_resolution`` is set.

    ``prompts`` needs the teacher (``model_cfg``): its own text encoders encode the prompts (cached in
    ``cache_dir``), see :func:`prompt_dataset`.
    """
    dataset = _build_dataset(cfg, model_cfg, cache_dir)
    if cfg.source_resolution is None:
        return dataset
    if cfg.dataset not in ("digits", "folder"):
        raise DataError("data.source_resolution (super-resolution sources) is for digits or folder images")
    if not 1 <= cfg.source_resolution < cfg.resolution:
        raise DataError(f"data.source_resolution must be below data.resolution ({cfg.resolution}), not "
                        f"{cfg.source_resolution}")
    return WithSource(dataset, cfg.source_resolution)


def _build_dataset(cfg, model_cfg=None, cache_dir: str | Path | None = None):
    if cfg.dataset == "prompts":
        return prompt_dataset(cfg, model_cfg, cache_dir)
    if cfg.dataset == "digits":
        if cfg.channels != 1:
            raise DataError("the digits are grayscale: set data.channels=1")
        return digits_dataset(cfg.resolution, cfg.split)
    if cfg.dataset == "folder":
        if not cfg.path:
            raise DataError("data.dataset=folder needs data.path, a folder of PNG/JPEG images")
        return ImageFolder(cfg.path, cfg.resolution, cfg.channels)
    if cfg.dataset == "pairs":
        if not cfg.path:
            raise DataError("data.dataset=pairs needs data.path, a folder written by `stepdistill make-pairs`")
        from .pairs import PairDataset

        return PairDataset(cfg.path)
    if cfg.dataset == "none":
        return None
    raise DataError(f"data.dataset={cfg.dataset!r} is not a training data set here; use digits, folder, prompts, "
                    "pairs or none")


# --------------------------------------------------------------------------------------------------------------
# Hashes and safetensors caches
# --------------------------------------------------------------------------------------------------------------

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
# Prompt files and prompt data sets
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt file; ``image`` is an absolute path (from a ``.jsonl`` ``image`` field)."""

    prompt: str
    image: Path | None = None
    line: int = field(default=0, compare=False)


_JSONL_EXAMPLE = '{"prompt": "a photo of a cat", "image": "images/cat.png"}'


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a prompt file.

    - ``.jsonl``: one JSON object per line with a ``prompt`` string and an optional ``image`` path, relative to
      the ``.jsonl`` file's folder (checked to exist).
    - anything else: plain UTF-8 text, one prompt per line, surrounding spaces stripped.

    Blank lines are skipped in both. Raises :class:`DataError` for a missing or empty file and for a bad line
    (naming its line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; give a .txt file with one prompt per line or a "
                        f".jsonl file with lines like {_JSONL_EXAMPLE}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompt file {path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    records = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        if not jsonl:
            records.append(PromptRecord(line, None, number))
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be like {_JSONL_EXAMPLE}") from exc
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise DataError(f"{where}: no \"prompt\" field; each line must be like {_JSONL_EXAMPLE}")
        if not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: \"prompt\" must be a string, not {type(obj['prompt']).__name__}")
        image = obj.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise DataError(f"{where}: \"image\" must be a path string, not {type(image).__name__}")
            image = (path.parent / image).expanduser()
            if not image.is_file():
                raise DataError(f"{where}: image {image} does not exist (image paths are relative to the "
                                f".jsonl file's folder)")
            image = image.resolve()
        records.append(PromptRecord(obj["prompt"], image, number))
    if not records:
        raise DataError(f"prompt file {path} has no prompts (it is empty or blank)")
    return records


class PromptDataset(torch.utils.data.Dataset):
    """Prompts with their precomputed text conditioning and, when a ``.jsonl`` names them, their images.

    Items: ``prompt`` (str); the tensors the encoder's family gives, named as :class:`~stepdistill.Cond` fields
    (``encoder_hidden_states``, ``pooled``, ``time_ids``, ``encoder_attention_mask``), so that
    ``Cond.from_batch(batch)`` reads them; and ``image`` when there are images: read with :func:`load_image`
    at ``resolution`` when the item is asked for, or taken from ``images`` (a tensor aligned with the prompts,
    e.g. cached latents; see :meth:`with_latents`).

    ``prompts`` is a prompt file (:func:`read_prompts`), or a list of strings / :class:`PromptRecord`. All
    prompts are encoded once, with ``encoder.encode_cached(prompts, cache_dir)`` when ``cache_dir`` is given
    (a later run reuses the file and loads no text encoder) and ``encoder.encode`` otherwise. ``null`` is the
    encoder's unconditional condition (batch of one, cached alike) for CFG.
    """

    def __init__(self, prompts, encoder, cache_dir: str | Path | None = None, *, resolution: int | None = None,
                 channels: int = 3, images: torch.Tensor | None = None):
        if isinstance(prompts, (str, Path)):
            records = read_prompts(prompts)
        else:
            records = [p if isinstance(p, PromptRecord) else PromptRecord(p, None, i + 1)
                       for i, p in enumerate(prompts)]
        if not records:
            raise DataError("no prompts given")
        bad = [r for r in records if not isinstance(r.prompt, str)]
        if bad:
            raise DataError(f"prompts must be strings; prompt {bad[0].line} is {type(bad[0].prompt).__name__}")
        self.records = records
        self.prompts = [r.prompt for r in records]
        self.encoder, self.cache_dir = encoder, cache_dir
        self.resolution, self.channels = resolution, channels
        cond = (encoder.encode_cached(self.prompts, cache_dir) if cache_dir is not None
                else encoder.encode(self.prompts).to("cpu"))
        self.tensors = {k: v for k, v in cond.as_dict().items() if not k.startswith("extra.")}
        self._null = None
        self.image_paths = None
        self.images = None
        has_image = [r.image is not None for r in records]
        if images is not None:
            self.set_images(images)
        elif any(has_image):
            if not all(has_image):
                first = records[has_image.index(False)]
                raise DataError(f"prompt {first.line} ({first.prompt!r}) has no image while others do; give an "
                                f"image on every line or on none")
            if resolution is None:
                raise DataError("the prompts name images: give the resolution to load them at (data.resolution)")
            self.image_paths = [r.image for r in records]

    def set_images(self, images: torch.Tensor) -> None:
        """Serve ``images`` (aligned with the prompts: pixels or latents) as ``image``."""
        if len(images) != len(self.records):
            raise DataError(f"{len(images)} images for {len(self.records)} prompts; they must match one to one")
        self.images = images

    def load_images(self) -> torch.Tensor:
        """All the images the prompt file names, read at ``resolution``, as one (N, C, H, W) tensor."""
        if self.image_paths is None:
            raise DataError("these prompts have no image paths (give a .jsonl with an \"image\" field per line)")
        return torch.stack([load_image(p, self.resolution, self.channels) for p in self.image_paths])

    def with_latents(self, vae, batch_size: int = 16, cache_path: str | Path | None = None) -> "PromptDataset":
        """Replace the images by their VAE latents (:func:`cache_latents`); returns ``self``."""
        self.set_images(cache_latents(self.load_images() if self.images is None else self.images, vae,
                                      batch_size, cache_path))
        return self

    @property
    def null(self):
        """The encoder's unconditional :class:`~stepdistill.Cond` (batch of one), for CFG."""
        if self._null is None:
            self._null = self.encoder.null(self.cache_dir).to("cpu")
        return self._null

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        item = {"prompt": self.prompts[i]}
        item.update({k: v[i] for k, v in self.tensors.items()})
        if self.images is not None:
            item["image"] = self.images[i]
        elif self.image_paths is not None:
            item["image"] = load_image(self.image_paths[i], self.resolution, self.channels)
        return item


def prompt_dataset(cfg, model_cfg, cache_dir: str | Path | None = None) -> "PromptDataset":
    """``data.dataset: prompts``: the prompt file ``data.path`` encoded by the teacher's own text encoders.

    Batches carry ``encoder_hidden_states`` (and ``pooled``, ``time_ids``, ``encoder_attention_mask`` as the
    family has them), which ``Cond.from_batch`` reads. When a ``.jsonl`` names images (real data, e.g. for a GAN
    term) and the teacher has a VAE, the images are read at ``data.resolution`` times the VAE's scale factor
    (``data.resolution`` is the LATENT resolution of a latent teacher) and served as their VAE latents (the
    posterior mean), cached in ``cache_dir``; without a VAE they are pixels at ``data.resolution``.
    """
    from .models import load_vae, prompt_encoder_for, teacher_folder, vae_scale_factor

    if not cfg.path:
        raise DataError("data.dataset=prompts needs data.path, a prompt file (.txt with one prompt per line, or "
                        f".jsonl with lines like {_JSONL_EXAMPLE})")
    encoder = prompt_encoder_for(model_cfg, cfg.resolution) if model_cfg is not None else None
    if encoder is None:
        raise DataError("data.dataset=prompts encodes the prompts with the teacher's text encoders, but the teacher "
                        f"({getattr(model_cfg, 'source', None)!r}) is not a Diffusers pipeline folder with text "
                        "encoders (model_index.json with tokenizer/text_encoder)")
    vae = None
    resolution, channels = cfg.resolution, cfg.channels
    records = read_prompts(cfg.path)
    if any(r.image is not None for r in records):
        vae = load_vae(model_cfg)
        if vae is not None:
            resolution = cfg.resolution * vae_scale_factor(teacher_folder(model_cfg))
            channels = int(_config_value(vae.config, "in_channels") or 3)
    data = PromptDataset(records, encoder, cache_dir, resolution=resolution, channels=channels)
    if vae is not None:
        latents_path = Path(cache_dir) / "latents" if cache_dir is not None else None
        data.with_latents(vae.to(_local_device()), cache_path=latents_path)
    return data


# --------------------------------------------------------------------------------------------------------------
# Cached VAE latents
# --------------------------------------------------------------------------------------------------------------

def _local_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun / accelerate launch) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _config_value(config, name):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def cache_latents(images, vae, batch_size: int = 16, cache_path: str | Path | None = None) -> torch.Tensor:
    """Encode ``[-1, 1]`` images to the latents a latent denoiser is trained on; float32, on the CPU.

    ``z = (mean - shift_factor) * scaling_factor`` (no shift when the VAE's ``shift_factor`` is None, as for
    SD/SDXL; SD3 and Flux have one), where ``mean`` is the mean of the VAE posterior (``latent_dist.mean``; for
    VAEs without a distribution, their ``latent(s)``). The mean, not a sample: a cache must not freeze one
    random draw into every epoch, and the mean is deterministic, so the cache key can name it.

    ``images`` is an (N, C, H, W) tensor or a data set of ``{"image": ...}`` items. ``vae`` runs on its own
    device and dtype, ``batch_size`` images at a time, under ``torch.no_grad()``. With ``cache_path`` the
    result is stored as safetensors keyed by a hash of the VAE (class, config, weights) and of the images:
    a ``.safetensors`` path is one file (rewritten when the key changes); any other path is a folder holding
    one ``latents-<key>.safetensors`` per key. Wrap the result in :class:`TensorImages` (or use
    :func:`latent_dataset`) to train on it.
    """
    if not torch.is_tensor(images):
        images = torch.stack([images[i]["image"] for i in range(len(images))])
    if images.ndim != 4:
        raise DataError(f"images must be (N, C, H, W), not {tuple(images.shape)}")
    config = vae.config
    in_channels = _config_value(config, "in_channels")
    if in_channels is not None and images.shape[1] != in_channels:
        raise DataError(f"the VAE takes {in_channels}-channel images, these have {images.shape[1]} channels")
    if len(images) and (images.min() < -1.001 or images.max() > 1.001):
        raise DataError(f"images must be in [-1, 1] (they span [{images.min():.3g}, {images.max():.3g}])")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, not {batch_size}")
    key = hashlib.sha256(json.dumps({"what": "latents:mean", "vae": module_fingerprint(vae),
                                     "images": tensor_digest(images)}).encode()).hexdigest()
    path = None
    if cache_path is not None:
        cache_path = Path(cache_path).expanduser()
        path = cache_path if cache_path.suffix == ".safetensors" else cache_path / f"latents-{key[:32]}.safetensors"
        cached = load_tensor_cache(path, key)
        if cached is not None:
            return cached["latents"]
    scaling = _config_value(config, "scaling_factor")
    shift = _config_value(config, "shift_factor")
    param = next(vae.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(param.device, param.dtype)
            encoded = vae.encode(x)
            if hasattr(encoded, "latent_dist"):
                z = encoded.latent_dist.mean
            elif hasattr(encoded, "latents") or hasattr(encoded, "latent"):
                z = getattr(encoded, "latents", None)
                z = z if z is not None else encoded.latent
            else:
                raise TypeError(f"{type(vae).__name__}.encode gives {type(encoded).__name__}: no latent_dist/latents")
            z = z.float()
            if shift is not None:
                z = z - shift
            if scaling is not None:
                z = z * scaling
            out.append(z.cpu())
    latents = torch.cat(out)
    if path is not None:
        save_tensor_cache(path, {"latents": latents}, key,
                          {"vae": type(vae).__name__, "count": str(len(latents)), "latent_dist": "mean"})
    return latents


def latent_dataset(dataset, vae, batch_size: int = 16, cache_path: str | Path | None = None) -> TensorImages:
    """A data set of images (``TensorImages``, ``ImageFolder``, digits) as its cached VAE latents, labels kept."""
    latents = cache_latents(dataset, vae, batch_size, cache_path)
    return TensorImages(latents, getattr(dataset, "labels", None), getattr(dataset, "num_classes", None))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``: ``(seed * 0x9E3779B1 + index) mod 2**32``.

    Torch's CPU generator keeps only the low 32 bits of a seed, so ``(seed << 32) + index`` would ignore ``seed``.
    This Weyl sequence gives each seed its own stream (seed 0 is ``index`` itself), disjoint from the others'
    for any realistic number of samples.
    """
    return (int(seed) * 0x9E3779B1 + int(index)) % 2**32
