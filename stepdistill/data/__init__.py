"""Data: the embedded digits, a user's image folders, prompt data, teacher pairs and a resumable batch order.

Every data set yields dicts: ``image`` (float CxHxW in [-1, 1], or latents for a latent denoiser) and, where
known, ``class_label`` (int64); prompt data sets add ``prompt`` and the text conditioning (``Cond`` field names).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from . import captions
from .batches import ResumableBatches, collate, sample_seed
from .captions import (HELD_OUT_COMBINATIONS, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, CaptionRecord,
                       attribute_words, captioned_digits, measure_attributes, parse_prompt,
                       prompt_matches, write_prompt_file)
from .images import (DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, IMAGE_SUFFIXES, DataError, ImageFolder, TensorImages,
                     WithSource, class_order, digits_dataset, digits_tensors, grid_columns, image_grid, load_image,
                     low_resolution, save_grid, to_uint8)
from .pairs import PairDataset
from .prompts import PromptDataset, PromptRecord, cache_latents, latent_dataset, prompt_dataset, read_prompts

__all__ = ["CaptionRecord", "DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "DataError", "HELD_OUT_COMBINATIONS",
           "HELD_OUT_TEMPLATES", "IMAGE_SUFFIXES", "ImageFolder", "PairDataset", "PromptDataset", "PromptRecord",
           "ResumableBatches", "TRAIN_TEMPLATES", "TensorImages", "WithSource", "attribute_words", "build_dataset",
           "cache_latents", "captioned_digits", "class_order", "collate", "describe", "digits_dataset",
           "digits_tensors", "grid_columns", "image_grid", "latent_dataset", "load_image", "low_resolution",
           "measure_attributes", "parse_prompt", "prompt_matches", "prompt_dataset", "read_prompts", "sample_seed",
           "save_grid", "to_uint8", "write_prompt_file"]


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
        if str(cfg.path or "").startswith(captions.SPEC):  # the captioned digits, written once into the cache
            folder = Path(cache_dir) / "captions" if cache_dir is not None else Path(tempfile.mkdtemp())
            cfg = dataclasses.replace(cfg, path=str(captions.spec_prompt_file(cfg.path, folder)))
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
        return PairDataset(cfg.path)
    if cfg.dataset == "none":
        return None
    raise DataError(f"data.dataset={cfg.dataset!r} is not a training data set here; use digits, folder, prompts, "
                    "pairs or none")


def describe(data, cfg) -> str:
    """One line saying what a run loaded: how many items of what kind, their size and resize, and the classes with
    their labels (an image folder's sub-folders, in label order)."""
    if data is None:
        return "data: none (the method needs no data)"
    base = getattr(data, "dataset", data)  # WithSource wraps the images
    size = f"{cfg.resolution}x{cfg.resolution}x{cfg.channels}"
    if isinstance(base, PairDataset):
        m = base.manifest
        what = (f"{len(data):,} teacher pairs from {base.folder} ({m.get('solver')}, {m.get('steps')} steps, guidance "
                f"{m.get('guidance_scale')})")
    elif isinstance(base, PromptDataset):
        what = f"{len(data):,} prompts from {cfg.path} (encoded by the teacher's text encoders)"
    elif isinstance(base, ImageFolder):
        what = (f"{len(data):,} images from {cfg.path}, {size} (shorter side resized bicubic, then center-cropped)")
    else:
        what = f"{len(data):,} digits, {size} (bilinear from 8x8)"
    classes = getattr(base, "classes", None)
    if classes:
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(classes[:20])) + (", ..." if len(classes) > 20 else "")
        what += f"; {len(classes)} classes, label: folder = {shown}"
    elif getattr(base, "num_classes", None):
        what += f"; {base.num_classes} classes"
    if cfg.source_resolution:
        what += f"; with {cfg.source_resolution}x{cfg.source_resolution} sources"
    return f"data: {what}"

