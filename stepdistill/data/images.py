"""Images: the embedded digits, a user's image folders, super-resolution sources and sample grids.

Every data set yields dicts: ``image`` (float CxHxW in [-1, 1], or latents for a latent denoiser) and, where
known, ``class_label`` (int64).
"""
from __future__ import annotations

import math
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


def class_order(name: str) -> tuple:
    """Sort key of class folder names: whole numbers by value and first, then the other names as text."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


class ImageFolder(TensorImages):
    """A folder of PNG/JPEG images, searched recursively.

    If every image sits in a first-level sub-folder, the sub-folders are the classes: label ``i`` is
    ``classes[i]``, in :func:`class_order` (names that are numbers by value: "2" before "10").
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
        self.classes = sorted(parents, key=class_order) if labelled else []
        index = {c: i for i, c in enumerate(self.classes)}
        labels = (torch.tensor([index[p.relative_to(root).parts[0]] for p in self.paths]) if self.classes else None)
        super().__init__(torch.stack([load_image(p, resolution, channels) for p in self.paths]), labels,
                         len(self.classes) or None)


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


def grid_columns(num_classes: int | None) -> int | None:
    """Columns of a sample grid: one per class (sample i has class i % classes, so column j shows class j) when
    there are at most 16 classes; otherwise a square grid (None)."""
    return num_classes if num_classes and num_classes <= 16 else None


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
