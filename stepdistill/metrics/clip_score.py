"""CLIP score through open_clip, with weights from a local file or a local open_clip folder (no download).

``score = scale * max(cos(image_embedding, text_embedding), 0)`` per image, averaged; ``scale`` is 100 by default
(torchmetrics' and the diffusers docs' convention; SwiftBrush-style papers report the 0-1 cosine: ``scale=1``).
The backbone, its weights hash and the scale are part of every result: CLIP scores from different backbones or
scales are not comparable (DMD2 uses ViT-g/14 laion2b_s12b_b42k, the diffusers docs ViT-B/16).

Images go in as float tensors in [0, 1] (B x C x H x W, grayscale repeated to RGB) and are resized (shorter side,
bicubic with antialias) and center-cropped to the model's input size in torch, then normalised with the model's
own mean and std: no PIL round trip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .features import FeatureError, file_sha256

LOCAL_DIR = "local-dir:"
#: the shipped open_clip folder trained on the captioned digits (``scripts/train_digits_clip.py``), for evaluation;
#: ``load_clip("digits-clip")`` loads it
DIGITS_CLIP = Path(__file__).resolve().parents[1] / "assets" / "digits-clip"
DIGITS_CLIP_NAME = "digits-clip"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class ClipModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    weights: str | None  # file, pretrained tag, or None (random: tests only)
    weights_sha256: str | None
    image_size: int
    mean: tuple
    std: tuple

    def protocol(self, scale: float) -> dict:
        return {"metric": "clip_score", "formula": f"{scale:g} * max(cos(image, text), 0), mean over images",
                "backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "image_size": self.image_size, "scale": scale,
                "preprocess": "shorter side bicubic+antialias, center crop, model mean/std (in torch)"}


def _local_dir_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_clip(model: str, weights: str | None = None, device: str = "cpu", allow_random: bool = False) -> ClipModel:
    """An open_clip model for CLIP score.

    ``model``: ``digits-clip`` (the shipped folder :data:`DIGITS_CLIP`, trained on the captioned digits, for
    evaluation only), ``local-dir:DIR`` (``open_clip_config.json`` + ``open_clip_model.safetensors``; for both,
    ``weights`` is ignored), an open_clip architecture name (``ViT-B-32``) or the path of an architecture config
    JSON.
    ``weights``: a local ``.safetensors``/``.pt``/``.bin`` file, or a pretrained tag already in the local Hugging
    Face cache. Without weights the model is random, which only ``allow_random=True`` (tests) accepts.
    """
    import open_clip

    weights_path = None
    shipped = model == DIGITS_CLIP_NAME
    if shipped or model.startswith(LOCAL_DIR):
        folder = DIGITS_CLIP if shipped else Path(model[len(LOCAL_DIR):]).expanduser()
        what = f"the shipped {DIGITS_CLIP_NAME} folder {folder}" if shipped else str(folder)
        fix = " (rebuild it with scripts/train_digits_clip.py)" if shipped else ""
        if not (folder / "open_clip_config.json").is_file():
            raise FeatureError(f"{what} is not an open_clip folder: it needs open_clip_config.json and "
                               f"open_clip_model.safetensors{fix}")
        weights_path = _local_dir_weights(folder)
        if weights_path is None and not allow_random:
            raise FeatureError(f"{what} has no CLIP weights: it needs one of {', '.join(WEIGHT_FILES[:2])}, ... "
                               f"beside open_clip_config.json{fix}")
        name, pretrained = f"{LOCAL_DIR}{folder}", None
    else:
        name = model
        if model.endswith(".json"):
            path = Path(model).expanduser()
            if not path.is_file():
                raise FeatureError(f"open_clip config {path} does not exist")
            open_clip.add_model_config(path)
            name = path.stem
        elif model not in open_clip.list_models():
            raise FeatureError(f"unknown open_clip model {model!r}: give an architecture name (e.g. ViT-B-32), a "
                               f"config .json, local-dir:FOLDER, or {DIGITS_CLIP_NAME!r} (the shipped digits CLIP)")
        pretrained = weights
        if weights is None and not allow_random:
            raise FeatureError("CLIP score needs trained weights: pass a local weights file (.safetensors/.pt) or a "
                               "local-dir:FOLDER with open_clip_config.json + open_clip_model.safetensors")
        if weights is not None and (os.path.sep in weights or weights.endswith(WEIGHT_SUFFIXES)
                                    or Path(weights).expanduser().is_file()):
            weights_path = Path(weights).expanduser()
            if not weights_path.is_file():
                raise FeatureError(f"CLIP weights file {weights_path} does not exist")
            pretrained = str(weights_path)
    try:
        net, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as exc:
        raise FeatureError(f"cannot load CLIP {model!r} with weights {weights!r} offline: {exc}. Copy the weights "
                           "file here and pass its path, or a local-dir:FOLDER") from exc
    net.eval().requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(net)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    sha = file_sha256(weights_path) if weights_path is not None else None
    shown = str(weights_path) if weights_path is not None else weights
    mean, std = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return ClipModel(net, tokenizer, model, shown, sha, int(size), tuple(mean), tuple(std))


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[0, 1] float B x C x H x W -> the CLIP input (RGB, resized, center-cropped, normalised)."""
    x = images.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=nh < h).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def clip_scores(clip: ClipModel, images: torch.Tensor, prompts: list[str], scale: float = 100.0,
                batch_size: int = 64) -> torch.Tensor:
    """Per-image CLIP score of ``images`` ([0, 1]) against their ``prompts`` (one per image)."""
    if len(prompts) != len(images):
        raise FeatureError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    device = next(clip.model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = preprocess(images[s:s + batch_size].to(device), clip.image_size, clip.mean, clip.std)
            tokens = clip.tokenizer(list(prompts[s:s + batch_size])).to(device)
            img = F.normalize(clip.model.encode_image(x).float(), dim=-1)
            txt = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
            out.append(scale * (img * txt).sum(-1).clamp(min=0).cpu())
    return torch.cat(out)


def clip_score(clip: ClipModel, images: torch.Tensor, prompts: list[str], scale: float = 100.0,
               batch_size: int = 64) -> dict:
    """Mean and std of the per-image CLIP score, with its protocol."""
    scores = clip_scores(clip, images, prompts, scale, batch_size)
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "n": len(scores), "protocol": clip.protocol(scale)}
