"""Prompt files, prompt data sets encoded by the teacher's own text encoders, and cached VAE latents."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import load_tensor_cache, module_fingerprint, save_tensor_cache, tensor_digest
from ..models import load_vae, pipeline_folder, prompt_encoder_for, teacher_folder, vae_scale_factor
from .captions import SPEC as CAPTION_PROMPTS, captioned_digits, parse_spec
from .images import DataError, TensorImages, load_image


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt file; ``image`` is an absolute path (from a ``.jsonl`` ``image`` field)."""

    prompt: str
    image: Path | None = None
    line: int = field(default=0, compare=False)


_JSONL_EXAMPLE = '{"prompt": "a photo of a cat", "image": "images/cat.png"}'


def caption_prompts(spec: str = "digits-captions:eval") -> list[PromptRecord]:
    """The prompts of :func:`~stepdistill.data.captions.captioned_digits` (seed 0) that ``spec`` names:
    ``digits-captions:eval`` the held-out phrasings of the digits' test split, one per digit (359 prompts),
    ``digits-captions:train`` the training phrasings of the train split, ``digits-captions:train:COPIES`` each digit
    captioned COPIES times. ``line`` is the prompt's 1-based index."""
    split, copies = parse_spec(spec)
    return [PromptRecord(r.prompt, None, i + 1) for i, r in enumerate(captioned_digits(split, 0, copies))]


def is_prompt_set(spec) -> bool:
    """Whether ``spec`` names a prompt set (``digits-captions:...``) rather than a file (an existing file wins)."""
    return str(spec).startswith(CAPTION_PROMPTS) and not Path(spec).expanduser().exists()


def read_prompts(path: str | Path, allow_empty: bool = True) -> list[PromptRecord]:
    """Read a prompt file, or a named prompt set (:func:`caption_prompts`, e.g. ``digits-captions:eval``).

    - ``.jsonl``: one JSON object per line with a ``prompt`` string and an optional ``image`` path, relative to
      the ``.jsonl`` file's folder (checked to exist).
    - anything else: plain UTF-8 text, one prompt per line, surrounding spaces stripped.

    Blank lines are skipped in both. Raises :class:`DataError` for a missing or empty file and for a bad line
    (naming its line number). A ``.jsonl`` line may ask for the empty prompt (``"prompt": ""``: unconditional
    training data) unless ``allow_empty=False`` (evaluation: there is nothing to score a sample against), when a
    prompt that is empty or only spaces is an error naming its line.
    """
    if is_prompt_set(path):
        return caption_prompts(str(path))
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; give a .txt file with one prompt per line, a "
                        f".jsonl file with lines like {_JSONL_EXAMPLE}, or a named set such as digits-captions:eval")
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
        if not allow_empty and not obj["prompt"].strip():
            raise DataError(f"{where}: the prompt is empty ({obj['prompt']!r}); give the text to generate from, or "
                            "delete the line")
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
            resolution = cfg.resolution * vae_scale_factor(pipeline_folder(teacher_folder(model_cfg)))
            channels = int(_config_value(vae.config, "in_channels") or 3)
    data = PromptDataset(records, encoder, cache_dir, resolution=resolution, channels=channels)
    if vae is not None:
        latents_path = Path(cache_dir) / "latents" if cache_dir is not None else None
        data.with_latents(vae.to(_local_device()), cache_path=latents_path)
    return data


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
