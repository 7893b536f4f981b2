"""Prompts, encoded by a pipeline's own text encoders into :class:`~stepdistill.conditioning.Cond` fields (cached)."""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch

from .cache import file_digests, load_tensor_cache, module_fingerprint, save_tensor_cache, tokenizer_fingerprint
from .conditioning import Cond

TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")

#: family -> (the Diffusers pipeline class whose ``encode_prompt`` is used, the text components it needs)
PROMPT_FAMILIES = {
    "sd": ("StableDiffusionPipeline", ("tokenizer", "text_encoder")),
    "sdxl": ("StableDiffusionXLPipeline", ("tokenizer_2", "text_encoder_2")),
    "sd3": ("StableDiffusion3Pipeline", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")),
    "flux": ("FluxPipeline", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")),
    "pixart": ("PixArtAlphaPipeline", ("tokenizer", "text_encoder")),
    "pixart_sigma": ("PixArtSigmaPipeline", ("tokenizer", "text_encoder")),
}


def prompt_family(pipeline_class_name: str) -> str | None:
    """The prompt family of a Diffusers pipeline class name (``StableDiffusionXLImg2ImgPipeline`` -> ``sdxl``)."""
    name = pipeline_class_name
    if "StableDiffusion3" in name:
        return "sd3"
    if "StableDiffusionXL" in name:
        return "sdxl"
    if "Flux" in name:
        return "flux"
    if "PixArtSigma" in name:
        return "pixart_sigma"
    if "PixArt" in name:
        return "pixart"
    if "StableDiffusion" in name or "LatentConsistencyModel" in name:
        return "sd"
    return None


def _is_t5(module) -> bool:
    return "T5" in type(module).__name__


def _family_from_components(components: dict) -> str | None:
    if components.get("text_encoder_3") is not None:
        return "sd3"
    if components.get("text_encoder_2") is not None:
        return "flux" if _is_t5(components["text_encoder_2"]) else "sdxl"
    if components.get("text_encoder") is not None:
        return "pixart" if _is_t5(components["text_encoder"]) else "sd"
    return None


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or (height, width), not {value}")
    return value


class PromptEncoder:
    """Encodes prompts with a pipeline's own text encoders into :class:`Cond` fields.

    It calls the ``encode_prompt`` method of the family's stock Diffusers pipeline, built from the text
    components only (the denoiser, VAE and scheduler are ``None``), so the embeddings are exactly those the
    teacher's pipeline would give:

    ========  ================================================  ==========================================
    family    components                                        Cond fields
    ========  ================================================  ==========================================
    sd        CLIP (SD 1.x / 2.x, LCM)                          ``encoder_hidden_states``
    sdxl      CLIP + CLIP with projection (refiner: the second) ``encoder_hidden_states`` (penultimate layers
                                                                concatenated), ``pooled`` (``text_embeds``),
                                                                ``time_ids`` (orig size, crop, target size)
    sd3       CLIP-L + CLIP-G (+ T5, optional)                  ``encoder_hidden_states`` (joint), ``pooled``
    flux      CLIP + T5                                         ``encoder_hidden_states`` (T5), ``pooled``
    pixart    T5 (``pixart_sigma``: 300 tokens, else 120)       ``encoder_hidden_states``,
                                                                ``encoder_attention_mask``
    ========  ================================================  ==========================================

    Build it from components (``PromptEncoder("sd", tokenizer=..., text_encoder=...)``), from a loaded
    pipeline (:meth:`from_pipeline`), or lazily from a pipeline folder (:meth:`from_pretrained`: the text
    encoders are loaded only when something must be encoded, so a run whose prompts are cached never loads
    them). Encoding runs under ``torch.no_grad()``. Options: ``max_sequence_length`` (T5 families; default
    the pipeline's), ``clip_skip`` (sd, sdxl, sd3), ``size`` / ``original_size`` / ``crops_coords_top_left``
    (sdxl ``time_ids``; ``size`` defaults to 1024), ``force_zeros_for_empty_prompt`` (sdxl's null
    condition; default True as in SDXL base), ``batch_size`` (prompts per text-encoder call).
    """

    def __init__(self, family: str | None = None, *, tokenizer=None, text_encoder=None, tokenizer_2=None,
                 text_encoder_2=None, tokenizer_3=None, text_encoder_3=None, max_sequence_length: int | None = None,
                 clip_skip: int | None = None, size=None, original_size=None, crops_coords_top_left=(0, 0),
                 force_zeros_for_empty_prompt: bool = True, batch_size: int = 32):
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                          text_encoder_2=text_encoder_2, tokenizer_3=tokenizer_3, text_encoder_3=text_encoder_3)
        family = family or _family_from_components(components)
        self._configure(family, max_sequence_length=max_sequence_length, clip_skip=clip_skip, size=size,
                        original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, batch_size=batch_size)
        missing = [n for n in PROMPT_FAMILIES[self.family][1] if components[n] is None]
        if missing:
            raise ValueError(f"a {self.family!r} prompt encoder needs {', '.join(missing)}")
        self._root = None
        self._pipe = self._build(components)

    # ---- construction -------------------------------------------------------------------------------------
    def _configure(self, family, *, max_sequence_length, clip_skip, size, original_size, crops_coords_top_left,
                   force_zeros_for_empty_prompt, batch_size):
        if family not in PROMPT_FAMILIES:
            raise ValueError(f"unknown prompt family {family!r}; supported: {', '.join(PROMPT_FAMILIES)}"
                             + ("" if family else " (could not tell it from the components: pass family=...)"))
        self.family = family
        cls = self._pipeline_class()
        default_len = inspect.signature(cls.encode_prompt).parameters.get("max_sequence_length")
        if max_sequence_length is None and default_len is not None:
            max_sequence_length = default_len.default
        elif max_sequence_length is not None and default_len is None:
            raise ValueError(f"max_sequence_length does not apply to the {family!r} family (CLIP only)")
        if clip_skip is not None and family not in ("sd", "sdxl", "sd3"):
            raise ValueError(f"clip_skip does not apply to the {family!r} family")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if family != "sdxl" and (size is not None or original_size is not None):
            raise ValueError(f"size / original_size (SDXL time_ids) do not apply to the {family!r} family")
        size = _pair(size if size is not None else 1024, "size")
        self.options = {
            "max_sequence_length": max_sequence_length,
            "clip_skip": clip_skip,
        }
        if family == "sdxl":
            self.options.update(
                size=list(size),
                original_size=list(_pair(original_size if original_size is not None else size, "original_size")),
                crops_coords_top_left=list(_pair(crops_coords_top_left, "crops_coords_top_left")),
                force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self.batch_size = batch_size

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, PROMPT_FAMILIES[self.family][0])

    def _build(self, components: dict):
        """The family's pipeline with only the text components (everything else ``None``)."""
        cls = self._pipeline_class()
        kwargs = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name in components:
                kwargs[name] = components[name]
            elif param.default is inspect.Parameter.empty:
                kwargs[name] = None
        if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
            kwargs["requires_safety_checker"] = False
        if self.family == "sdxl":
            kwargs["add_watermarker"] = False
            kwargs["force_zeros_for_empty_prompt"] = self.options["force_zeros_for_empty_prompt"]
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def from_pipeline(cls, pipe, family: str | None = None, **options) -> "PromptEncoder":
        """Use the text components of a loaded Diffusers pipeline (any variant: img2img, LCM, ...)."""
        components = {name: getattr(pipe, name, None) for name in TEXT_COMPONENTS}
        family = family or prompt_family(type(pipe).__name__) or _family_from_components(components)
        config = getattr(pipe, "config", {})
        if family == "sdxl":
            options.setdefault("force_zeros_for_empty_prompt", config.get("force_zeros_for_empty_prompt", True))
            sample, scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
            if sample and scale and getattr(pipe, "unet", None) is not None:
                options.setdefault("size", int(sample) * int(scale))
        return cls(family, **components, **options)

    @classmethod
    def from_pretrained(cls, path, family: str | None = None, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, device=None, **options) -> "PromptEncoder":
        """Lazily use the text components of a local Diffusers pipeline folder.

        Nothing is loaded until a prompt must be encoded; the cache key (:meth:`fingerprint`) comes from the
        content of the folder's ``tokenizer*`` / ``text_encoder*`` files, so cached prompts are found
        without loading the text encoders.
        """
        root = Path(path).expanduser()
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{root} is not a Diffusers pipeline folder (no model_index.json)")
        index = json.loads(index_path.read_text())
        family = family or prompt_family(index.get("_class_name", ""))
        entries = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
        text = sorted(k for k, v in entries.items() if k in TEXT_COMPONENTS and v[0] is not None)
        if family is None:
            raise ValueError(f"cannot tell the prompt family of {index.get('_class_name')!r}; pass family=... "
                             f"({', '.join(PROMPT_FAMILIES)})")
        if family == "sdxl":
            options.setdefault("force_zeros_for_empty_prompt", index.get("force_zeros_for_empty_prompt", True))
        self = cls.__new__(cls)
        self._configure(family, **{**dict(max_sequence_length=None, clip_skip=None, size=None, original_size=None,
                                          crops_coords_top_left=(0, 0), force_zeros_for_empty_prompt=True,
                                          batch_size=32), **options})
        missing = [n for n in PROMPT_FAMILIES[family][1] if n not in text]
        if missing:
            raise ValueError(f"{root} has no {', '.join(missing)}, which a {family!r} prompt encoder needs")
        self._root, self._text_names = root, text
        self._load_kwargs = {"torch_dtype": torch_dtype, "variant": variant, "device": device,
                             "skip": sorted(set(entries) - set(text))}
        self._pipe = None
        return self

    @property
    def loaded(self) -> bool:
        """Whether the text encoders are in memory (a lazy encoder loads them on first use)."""
        return self._pipe is not None

    @property
    def pipeline(self):
        """The text-only Diffusers pipeline whose ``encode_prompt`` is used (loaded on first use)."""
        if self._pipe is None:
            from diffusers import DiffusionPipeline

            kw = self._load_kwargs
            loaded = DiffusionPipeline.from_pretrained(
                self._root, **{name: None for name in kw["skip"]},
                **{k: kw[k] for k in ("torch_dtype", "variant") if kw[k] is not None})
            components = {name: getattr(loaded, name, None) for name in TEXT_COMPONENTS}
            self._pipe = self._build(components)
            if kw["device"] is not None:
                self.to(kw["device"])
        return self._pipe

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipeline, n) for n in TEXT_COMPONENTS
                if n.startswith("text_encoder") and getattr(self.pipeline, n, None) is not None}

    @property
    def device(self) -> torch.device:
        for module in self.text_encoders().values():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    def to(self, *args, **kwargs) -> "PromptEncoder":
        """Move the text encoders (``.to(device)``, ``.to(dtype)``)."""
        for module in self.text_encoders().values():
            module.to(*args, **kwargs)
        return self

    def __repr__(self):
        where = f"from {self._root}" if self._root is not None else "from components"
        return f"PromptEncoder({self.family!r}, {where}, loaded={self.loaded}, options={self.options})"

    # ---- encoding -----------------------------------------------------------------------------------------
    def _call(self, prompts: list[str], negative: bool) -> Cond:
        """One ``encode_prompt`` call; ``negative`` takes the pipeline's own unconditional (CFG) outputs."""
        pipe, device, f, o = self.pipeline, self.device, self.family, self.options
        kw = {"clip_skip": o["clip_skip"]} if o["clip_skip"] is not None else {}
        if o["max_sequence_length"] is not None:
            kw["max_sequence_length"] = o["max_sequence_length"]
        if f == "sd":
            emb, neg = pipe.encode_prompt(prompts, device, 1, negative, **kw)
            return Cond(encoder_hidden_states=neg if negative else emb)
        if f in ("sdxl", "sd3"):
            extra_prompts = (None,) if f == "sdxl" else (None, None)
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompts, *extra_prompts, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=negative, **kw)
            if negative:
                emb, pooled = neg, neg_pooled
            cond = Cond(encoder_hidden_states=emb, pooled=pooled)
            if f == "sdxl":
                ids = o["original_size"] + o["crops_coords_top_left"] + o["size"]
                cond.time_ids = torch.tensor([ids], dtype=emb.dtype, device=emb.device).repeat(len(prompts), 1)
            return cond
        if f == "flux":  # no unconditional branch in Flux: its null is the empty prompt
            emb, pooled, _text_ids = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1, **kw)
            return Cond(encoder_hidden_states=emb, pooled=pooled)
        emb, mask, neg, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=negative,
                                                      negative_prompt="", device=device, **kw)
        return Cond(encoder_hidden_states=neg if negative else emb,
                    encoder_attention_mask=neg_mask if negative else mask)

    def encode(self, prompts: str | list[str]) -> Cond:
        """Encode prompts (batch first, on the text encoders' device), under ``torch.no_grad()``."""
        prompts = _prompt_list(prompts)
        with torch.no_grad():
            parts = [self._call(prompts[i:i + self.batch_size], negative=False)
                     for i in range(0, len(prompts), self.batch_size)]
        return parts[0] if len(parts) == 1 else Cond.cat(parts)

    def null(self, cache_dir=None) -> Cond:
        """The unconditional condition for CFG, batch of one: exactly what the pipeline uses when no negative
        prompt is given — the encoded empty prompt, or zeros for SDXL with ``force_zeros_for_empty_prompt``.
        With ``cache_dir`` it is cached like :meth:`encode_cached`."""
        def compute():
            with torch.no_grad():
                return self._call([""], negative=self.family != "flux")

        if cache_dir is not None:
            return self._cached("null", [], cache_dir, compute)
        return compute()

    # ---- caching ------------------------------------------------------------------------------------------
    def fingerprint(self, cache_dir=None) -> str:
        """A hash of the family, the options and the text encoders' configs and weights and tokenizers.

        From components: hashes of the loaded modules' configs and tensors. From :meth:`from_pretrained`: hashes
        of the folder's text files' content (memoized in ``cache_dir/file-digests.json`` by path, size and
        mtime), so that finding a cache entry loads nothing.
        """
        h = hashlib.sha256(json.dumps({"family": self.family, **self.options}, sort_keys=True).encode())
        if self._root is not None:
            kw = self._load_kwargs
            h.update(json.dumps({"dtype": str(kw["torch_dtype"]), "variant": kw["variant"]}).encode())
            files = sorted(p for name in self._text_names for p in (self._root / name).rglob("*") if p.is_file())
            for rel, digest in file_digests(files, self._root, cache_dir):
                h.update(f"{rel}:{digest};".encode())
        else:
            for name in TEXT_COMPONENTS:
                component = getattr(self._pipe, name, None)
                if component is None:
                    continue
                digest = (module_fingerprint(component) if isinstance(component, torch.nn.Module)
                          else tokenizer_fingerprint(component))
                h.update(f"{name}:{digest};".encode())
        return h.hexdigest()

    def cache_key(self, prompts: list[str], kind: str = "prompts", cache_dir=None) -> str:
        payload = json.dumps({"kind": kind, "encoder": self.fingerprint(cache_dir), "prompts": prompts})
        return hashlib.sha256(payload.encode()).hexdigest()

    def _cached(self, kind: str, prompts: list[str], cache_dir, compute) -> Cond:
        key = self.cache_key(prompts, kind, cache_dir)
        path = Path(cache_dir).expanduser() / f"{kind}-{self.family}-{key[:32]}.safetensors"
        cached = load_tensor_cache(path, key)
        if cached is not None:
            return Cond.from_dict(cached)
        cond = compute().to("cpu")
        save_tensor_cache(path, cond.as_dict(), key, {"family": self.family, "kind": kind, "count": str(len(prompts))})
        return cond

    def encode_cached(self, prompts: str | list[str], cache_dir) -> Cond:
        """:meth:`encode`, stored in ``cache_dir`` as one safetensors file keyed by the prompts and
        :meth:`fingerprint`; a later call with the same key reads the file and runs no text encoder.
        Returns CPU tensors."""
        prompts = _prompt_list(prompts)
        return self._cached("prompts", prompts, cache_dir, lambda: self.encode(prompts))
