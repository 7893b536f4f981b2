"""What ``eval`` and ``bench`` sample from: a teacher with its own sampler at any NFE, or an exported student
pipeline at its trained steps — with the same labels and the same noise for every model.

Sources:
- ``digits-teacher``, a teacher folder (``unet/`` + ``scheduler/`` [+ ``stepdistill.json``]) or a run folder
  (its ``final/``): the teacher's DDIM sampler (eta 0, ``DDIMScheduler.from_config`` of its own scheduler; a flow
  teacher keeps its FlowMatch Euler scheduler) in :class:`ClassConditionalPipeline` for pixel UNets. Kind: teacher.
- a pipeline folder (``model_index.json``): ``ClassConditionalPipeline.from_pretrained`` for class-conditional
  digits pipelines, ``DiffusionPipeline.from_pretrained`` otherwise. Kind: student. Its default steps, timesteps,
  guidance and ``eta`` (TCD's gamma) are read from the pipeline config or ``stepdistill.json``
  (``num_inference_steps``, ``timesteps``, ``guidance_scale``, ``eta``, at the top level or under ``recipe``).

Sample ``i`` uses class ``i % num_classes`` (balanced) and a generator seeded ``data.sample_seed(seed, i)`` for all of its
noise (one generator per sample, so the samples do not depend on the batch size or on the model). An image-conditioned
pipeline (:class:`ImageConditionedPipeline`, super-resolution) gets as sample ``i``'s source the digit ``i % 1797``
reduced to the pipeline's ``source_resolution`` (as in training), and that digit is its target for PSNR / SSIM.
A text-to-image pipeline (its call takes ``prompt``) gets prompt ``i % P`` of its prompts
(:class:`~stepdistill.metrics.text_alignment.EvalPrompts`; ``digits-captions:eval`` by default in ``eval``/``bench``),
checked against its tokenizers' ``model_max_length`` when set (:meth:`EvalModel.use_prompts`).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import family, unwrap
from ..cache import module_fingerprint
from ..config import ModelConfig
from ..data import digits_tensors, low_resolution, sample_seed
from ..guided import load_guidance_adapters
from ..models import ModelLoadError, NAMED_MODELS, load_model
from ..pipelines import ClassConditionalPipeline, ImageConditionedPipeline
from ..pipelines._shim import only_stepdistill_shims
from .text_alignment import EvalPrompts, as_eval_prompts, check_prompt_lengths, load_eval_prompts


TEACHER_SAMPLER = "DDIM (eta 0) on DDIMScheduler.from_config(teacher scheduler config)"


def sample_generators(indices, seed: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in indices]


def _lookup(d: dict, key: str):
    if key in d:
        return d[key]
    recipe = d.get("recipe")
    return recipe.get(key) if isinstance(recipe, dict) else None


@dataclass
class EvalModel:
    """A model ready to sample: ``model.sample(indices, nfe, seed)`` -> float images in [0, 1] (B, C, H, W)."""

    name: str
    kind: str  # "teacher" | "student"
    pipe: object
    source: str
    default_nfe: list[int] = field(default_factory=list)
    guidance: float | None = None
    num_classes: int | None = None
    timesteps: list[int] | None = None  # a student's trained timesteps (used when nfe == len(timesteps))
    sampler: str = ""
    prompts: list[str] | None = None
    info: dict = field(default_factory=dict)
    sources: torch.Tensor | None = None  # image-conditioned: source i % len, (N, C, H, W) in [-1, 1]
    targets: torch.Tensor | None = None  # ... and the real image it should become, in [0, 1]
    eta: float | None = None  # the call's eta (a TCD student's gamma)
    prompt_set: EvalPrompts | None = None  # where ``prompts`` came from (use_prompts sets both)
    prompts_defaulted: bool = False  # the prompts are DEFAULT_PROMPTS because none were given

    def __post_init__(self):
        self._params = inspect.signature(self.pipe.__call__).parameters
        if self.prompts is not None:
            prompts, self.prompts = self.prompts, None
            self.use_prompts(prompts)

    @property
    def text(self) -> bool:
        """A text-to-image pipeline: its call takes ``prompt`` and it has no classes or source images."""
        return "prompt" in self._params and self.num_classes is None and self.sources is None

    @property
    def call_guidance(self) -> float | None:
        """The CFG scale the pipeline is called with: ``guidance``, else the call's own default."""
        if self.guidance is not None or "guidance_scale" not in self._params:
            return self.guidance
        default = self._params["guidance_scale"].default
        return float(default) if isinstance(default, (int, float)) else None

    def use_prompts(self, prompts) -> None:
        """Sample prompt ``i % P`` for sample ``i``. Errors (before any sampling): prompts for a pipeline that takes
        none (class-conditional, image-conditioned, unconditional), and prompts longer than the pipeline's
        tokenizers take (they would be cut silently)."""
        prompts = as_eval_prompts(prompts)
        if not self.text:
            what = ("class-conditional" if self.num_classes is not None else "image-conditioned"
                    if self.sources is not None else "not text-to-image")
            raise ModelLoadError(f"{self.source} ({type(self.pipe).__name__}) is {what}: it takes no prompts, so "
                                 f"there is nothing to score against {prompts.spec}; drop --prompts and --clip (they "
                                 "are for text-to-image pipelines), or give a text-to-image pipeline folder (bench: "
                                 "--teacher DIR or --teacher none)")
        check_prompt_lengths(self.pipe, prompts, f"{self.source} ({type(self.pipe).__name__})")
        self.prompt_set, self.prompts = prompts, list(prompts.prompts)

    def use_timesteps(self, timesteps: list[int]) -> None:
        """Sample the ``len(timesteps)``-step point at these timesteps (other NFE keep the pipeline's own)."""
        if self.kind != "student" or "timesteps" not in self._params:
            raise ModelLoadError(f"--timesteps needs a student pipeline whose call takes timesteps=; {self.source} is "
                                 f"a {self.kind} ({type(self.pipe).__name__})")
        self.timesteps = list(timesteps)
        self.default_nfe = [len(timesteps)]

    def use_eta(self, eta: float) -> None:
        """Sample with the pipeline call's ``eta`` (TCD's gamma) instead of the export's."""
        if self.kind != "student" or "eta" not in self._params:
            raise ModelLoadError(f"--eta needs a student pipeline whose call takes eta=; {self.source} is a "
                                 f"{self.kind} ({type(self.pipe).__name__})")
        self.eta = float(eta)

    def sample(self, indices, nfe: int, seed: int) -> torch.Tensor:
        if self.text and not self.prompts:
            raise ModelLoadError(f"{self.source} is a text-to-image pipeline: give prompts (--prompts FILE or "
                                 "digits-captions:eval; load_eval_model(..., prompts=...))")
        indices = list(indices)
        p = self._params
        kwargs = {"generator": sample_generators(indices, seed), "output_type": "np"}
        if self.timesteps is not None and nfe == len(self.timesteps) and "timesteps" in p:
            kwargs["timesteps"] = list(self.timesteps)
            if "num_inference_steps" in p:  # not the call's default too (ConsistencyModelPipeline warns on both)
                kwargs["num_inference_steps"] = None
        else:
            kwargs["num_inference_steps"] = nfe
        if self.sources is not None:
            kwargs["image"] = self.sources[[i % len(self.sources) for i in indices]]
        elif self.num_classes is not None and "class_labels" in p:
            kwargs["class_labels"] = [i % self.num_classes for i in indices]
            if "batch_size" in p:  # ConsistencyModelPipeline checks its generators against batch_size
                kwargs["batch_size"] = len(indices)
        elif "prompt" in p and self.prompts:
            kwargs["prompt"] = [self.prompts[i % len(self.prompts)] for i in indices]
        elif "batch_size" in p:
            kwargs["batch_size"] = len(indices)
        if self.guidance is not None and "guidance_scale" in p:
            kwargs["guidance_scale"] = self.guidance
        if self.eta is not None and "eta" in p:
            kwargs["eta"] = self.eta
        out = self.pipe(**kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        if isinstance(images, list):  # PIL
            images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if images.ndim == 3:
            images = images[..., None]
        return images.permute(0, 3, 1, 2).clamp(0, 1)

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "pipeline": type(self.pipe).__name__,
                "scheduler": type(getattr(self.pipe, "scheduler", None)).__name__, "sampler": self.sampler,
                "guidance": self.guidance, "timesteps": self.timesteps,
                "class_labels": f"i % {self.num_classes}" if self.num_classes else None,
                **({"eta": self.eta} if self.eta is not None else {}),
                **({"prompts": self.prompt_set.identity()} if self.prompt_set is not None else {}), **self.info}

    def targets_of(self, indices) -> torch.Tensor | None:
        return None if self.targets is None else self.targets[[i % len(self.targets) for i in indices]]


def to_uint8_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8, rounded (as a PNG stores them)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _resolve_folder(source: str) -> Path:
    if source in NAMED_MODELS:
        folder = NAMED_MODELS[source]
        if not folder.is_dir():
            raise ModelLoadError(f"the shipped model {source!r} is missing from {folder}: it is not trained yet or "
                                 "not installed")
        return folder
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{source} is not a folder: give a pipeline folder (model_index.json), a teacher folder "
                             "(unet/ + scheduler/), a run folder (final/) or 'digits-teacher'")
    if not (folder / "model_index.json").is_file() and (folder / "final").is_dir():
        folder = folder / "final"
    return folder


def _fingerprint(module) -> str | None:
    try:
        return module_fingerprint(module)
    except Exception:  # a fingerprint is informative, never fatal
        return None


def _teacher_scheduler(scheduler):
    from diffusers import DDIMScheduler

    if "FlowMatch" in type(scheduler).__name__:
        return scheduler, f"{type(scheduler).__name__} (the teacher's own flow sampler)"
    return DDIMScheduler.from_config(scheduler.config), TEACHER_SAMPLER


def load_eval_model(source: str, kind: str | None = None, name: str | None = None, device: str = "cpu",
                    guidance: float | None = None, prompts: list[str] | EvalPrompts | None = None,
                    trust_remote_code: bool = False, default_prompts: str | None = None) -> EvalModel:
    """Load ``source`` for evaluation (see the module docstring). ``kind`` overrides teacher/student.

    ``prompts`` (a list of strings or :class:`~stepdistill.metrics.text_alignment.EvalPrompts`) are for a
    text-to-image pipeline only (an error for any other, as is a prompt longer than its tokenizer takes); a text
    pipeline without them is an error unless ``default_prompts`` names the prompts to use then (e.g.
    ``digits-captions:eval``; the model's ``prompts_defaulted`` says so).

    Python code in a pipeline folder runs only when the caller says so (``trust_remote_code``, the CLI's
    ``--trust-remote-code``), never because the folder says so; a folder whose only code is this package's one-line
    import shims (what ``stepdistill export`` writes) loads without it."""
    folder = _resolve_folder(source)
    name = name or (source if source in NAMED_MODELS else folder.name if folder.name != "final"
                    else folder.parent.name)
    if (folder / "model_index.json").is_file():
        model = _load_pipeline(folder, source, kind or "student", name, device, guidance, trust_remote_code)
    else:
        model = _load_teacher_folder(folder, source, kind or "teacher", name, device, guidance)
    if prompts is not None:
        model.use_prompts(prompts)
    elif model.text and default_prompts:
        model.use_prompts(load_eval_prompts(default_prompts))
        model.prompts_defaulted = True
    elif model.text:
        raise ModelLoadError(f"{source} is a text-to-image pipeline: give prompts (--prompts FILE, or --prompts "
                             "digits-captions:eval for the captioned digits' held-out prompts)")
    return model


def _load_teacher_folder(folder, source, kind, name, device, guidance) -> EvalModel:
    loaded = load_model(ModelConfig(source=str(folder)))
    backbone = unwrap(loaded.denoiser.backbone)
    if family(backbone) != "UNet2DModel":
        raise ModelLoadError(f"{folder} holds a {type(backbone).__name__}; evaluate latent or text-to-image "
                             "teachers as a Diffusers pipeline folder (model_index.json)")
    if backbone.config.in_channels != backbone.config.out_channels:
        raise ModelLoadError(f"{folder} holds an image-conditioned UNet: export it (`stepdistill export RUN --out "
                             "DIR`) and evaluate that pipeline with --kind teacher")
    scheduler, sampler = _teacher_scheduler(loaded.scheduler)
    num_classes = loaded.meta.get("num_classes")
    if num_classes is None and backbone.config.get("num_class_embeds"):
        num_classes = int(backbone.config.num_class_embeds)
    pipe = ClassConditionalPipeline(unet=backbone, scheduler=scheduler, null_class=loaded.meta.get("num_classes"))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance = 1.0 if guidance is None else guidance
    default = loaded.meta.get("sample_steps") or 50
    return EvalModel(name, kind, pipe, str(source), [int(default)], guidance, num_classes, None, sampler, None,
                     {"weights_fingerprint": _fingerprint(backbone), "folder": str(folder.resolve())})


def _load_pipeline(folder, source, kind, name, device, guidance, trust_remote_code=False) -> EvalModel:
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    cls_name = index.get("_class_name")
    cls_name = cls_name[-1] if isinstance(cls_name, list) else cls_name
    meta = json.loads((folder / "stepdistill.json").read_text()) if (folder / "stepdistill.json").is_file() else {}
    code = sorted(str(p.relative_to(folder)) for p in [*folder.glob("*.py"), *folder.glob("*/*.py")])
    trust = trust_remote_code or (bool(code) and only_stepdistill_shims(folder))
    if code and not trust:
        raise ModelLoadError(f"{folder} holds Python code ({', '.join(code)}) that loading it would run, and it is not "
                             "only stepdistill's own import shims; read it, and if you trust it pass "
                             "--trust-remote-code (trust_remote_code=True)")
    try:
        if cls_name in ("ClassConditionalPipeline", "ImageConditionedPipeline"):
            pipe = (ClassConditionalPipeline if cls_name == "ClassConditionalPipeline"
                    else ImageConditionedPipeline).from_pretrained(folder, trust_remote_code=trust)
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load the pipeline in {folder}: {exc}") from exc
    lora = (meta.get("export") or {}).get("lora") or {}
    if lora.get("weight_name"):  # a LoRA student: the base weights plus its LoRA file, as its model card loads it
        pipe.load_lora_weights(folder, weight_name=lora["weight_name"])
    if (meta.get("export") or {}).get("guidance_adapters"):  # AGD: the base plus its guidance adapters
        load_guidance_adapters(pipe, folder)
    sampler = f"the pipeline's own ({type(pipe.scheduler).__name__})"
    if kind == "teacher":
        pipe.scheduler, sampler = _teacher_scheduler(pipe.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.config)
    steps = _lookup(meta, "num_inference_steps") or config.get("num_inference_steps")
    # a teacher is sampled by DDIM at each NFE: an exported teacher's recorded timesteps are its own sampler's
    timesteps = _lookup(meta, "timesteps") if kind == "student" else None
    if steps is None and timesteps:
        steps = len(timesteps)
    if guidance is None:
        guidance = _lookup(meta, "guidance_scale")
        guidance = config.get("guidance_scale") if guidance is None else guidance
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    num_classes = None
    # ClassConditionalPipeline (and MultiStudentPipeline), or a stock pipeline that takes class_labels (an iCT
    # ConsistencyModelPipeline): without labels the latter draws them from all num_class_embeds, the null class too
    takes_labels = (isinstance(pipe, ClassConditionalPipeline)
                    or "class_labels" in inspect.signature(pipe.__call__).parameters)
    if takes_labels and denoiser is not None and denoiser.config.get("num_class_embeds"):
        null = meta.get("num_classes", config.get("null_class"))
        num_classes = int(null) if null is not None else int(denoiser.config.num_class_embeds)
    default = [int(s) for s in (steps if isinstance(steps, list) else [steps])] if steps else []
    info = {"weights_fingerprint": _fingerprint(denoiser) if denoiser is not None else None,
            "folder": str(folder.resolve())}
    sources = targets = None
    if isinstance(pipe, ImageConditionedPipeline):
        sources, targets = super_resolution_pairs(denoiser.config.sample_size, pipe.config.source_resolution)
        info["sources"] = (f"digits i % {len(sources)} ({targets.shape[-1]}px, the PSNR/SSIM target) reduced to "
                           f"{pipe.config.source_resolution}px (area)")
    eta = _lookup(meta, "eta") if kind == "student" else None
    return EvalModel(name, kind, pipe, str(source), default, None if guidance is None else float(guidance),
                     num_classes, [int(t) for t in timesteps] if timesteps else None, sampler, None, info,
                     sources, targets, None if eta is None else float(eta))


def super_resolution_pairs(resolution: int, source_resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, targets): every digit at ``resolution`` in [0, 1] and its training-style source (area-down to
    ``source_resolution``, nearest-up), in [-1, 1]."""
    if not source_resolution:
        raise ModelLoadError("this image-conditioned pipeline does not record its source_resolution (config)")
    images, _ = digits_tensors(resolution)
    sources = torch.stack([low_resolution(im, source_resolution) for im in images])
    return sources, (images + 1) / 2
