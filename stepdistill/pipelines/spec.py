"""The export contract objectives import: what a student's export will be, decided before anything is written.

:class:`ExportSpec` is what ``Objective.export_spec()`` returns; :func:`pipeline_for` picks the pipeline class of a
backbone, :func:`export_scheduler` / :func:`export_timesteps` give the scheduler and timesteps the exported
pipeline runs (a K-step student trains at exactly those), :func:`guidance_plan` how it is guided. The folder
writing is :mod:`stepdistill.pipelines.export`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import backbones
from ..denoiser import Denoiser
from ..guided import guidance_range_of
from .recipes import ExportError, Recipe, as_loaded
from .sampling import student_timesteps

#: pipelines of this package (need stepdistill and trust_remote_code to load)
OWN_PIPELINES = ("ClassConditionalPipeline", "ImageConditionedPipeline")


PIPELINES_FOR = {
    "UNet2DModel": ("DDPMPipeline", "ClassConditionalPipeline", "ImageConditionedPipeline"),
    "UNet2DConditionModel": ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                             "LatentConsistencyModelPipeline"),
    "DiTTransformer2DModel": ("DiTPipeline",),
    "PixArtTransformer2DModel": ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline",),
    "FluxTransformer2DModel": ("FluxPipeline",),
}


CFG_PIPELINES = ("ClassConditionalPipeline", "DiTPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                 "PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline")


@dataclass
class ExportSpec:
    """What an objective tells export about its student (``Objective.export_spec()``).

    ``student``: the Denoiser to export (its backbone, schedule and prediction type; LoRA adapters if any).
    ``recipe``: the scheduler, steps and guidance it samples with. ``base_scheduler``: the teacher's scheduler
    (the noise schedule the recipe's scheduler is built on). ``base_folder``: a Diffusers folder to take the VAE
    and text components from (the teacher's). ``timesteps``: the timesteps the student was trained at, if the
    objective fixed them — export checks that the pipeline runs exactly these. The rest describes the model card.
    """

    student: Denoiser
    recipe: Recipe
    base_scheduler: Any = None
    method: str = "unknown"
    base_model: str | None = None
    base_folder: str | Path | None = None
    num_classes: int | None = None
    image_size: int | None = None
    timesteps: list[float] | None = None
    training_steps: int | None = None
    metrics: dict = field(default_factory=dict)
    config: Any = None
    meta: dict = field(default_factory=dict)
    pipeline: str | None = None  # override the pipeline class (e.g. StableDiffusionPipeline for an LCM student)

    @property
    def pipeline_name(self) -> str:
        return pipeline_for(self.student, _base_class(self.base_folder), self.pipeline)

    @property
    def scheduler(self):
        """The scheduler the student samples with, as the exported pipeline will hold it."""
        return export_scheduler(self.student, self.recipe, self.base_scheduler, self.pipeline_name)

    def run_timesteps(self) -> list[float]:
        """The timesteps the exported pipeline runs: the ones a K-step student must be trained at."""
        return student_timesteps(self.scheduler, self.recipe.num_inference_steps, self.pipeline_name)


def _base_class(base_folder) -> str | None:
    if not base_folder:
        return None
    index = Path(base_folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return name if isinstance(name, str) else None


def export_scheduler(student: Denoiser, recipe: Recipe, base_scheduler=None, pipeline: str | None = None):
    """The scheduler an export of ``student`` with ``recipe`` writes (as ``pipeline`` will hold it)."""
    pipeline = pipeline or pipeline_for(student)
    base = base_scheduler if base_scheduler is not None else scheduler_from_schedule(student)
    with quiet_diffusers():
        return as_loaded(recipe.make_scheduler(base, student.prediction_type, pipeline), pipeline)


def export_timesteps(student: Denoiser, recipe: Recipe, base_scheduler=None,
                     pipeline: str | None = None) -> list[float]:
    """The timesteps an export of ``student`` with ``recipe`` runs — what a K-step student must be trained at.

    Trainers call this once (with the teacher's scheduler) and train at exactly these timesteps."""
    pipeline = pipeline or pipeline_for(student)
    scheduler = export_scheduler(student, recipe, base_scheduler, pipeline)
    return student_timesteps(scheduler, recipe.num_inference_steps, pipeline)


def pipeline_for(student: Denoiser, base_class: str | None = None, override: str | None = None) -> str:
    """The pipeline class name an export of ``student`` uses (``override`` if it fits the backbone)."""
    fam = student.family
    config = backbones.unwrap(student.backbone).config
    allowed = list(PIPELINES_FOR[fam])
    if fam == "UNet2DModel":
        has_classes = bool(config.get("num_class_embeds")) or config.get("class_embed_type") is not None
        if config.in_channels != config.out_channels:  # the source image is concatenated on channels
            if has_classes:
                raise ExportError("a class-conditional image-conditioned UNet2DModel has no pipeline yet")
            allowed, default = ["ImageConditionedPipeline"], "ImageConditionedPipeline"
        else:
            allowed.remove("ImageConditionedPipeline")
            default = "ClassConditionalPipeline" if has_classes else "DDPMPipeline"
            if has_classes:
                allowed.remove("DDPMPipeline")
    elif fam == "UNet2DConditionModel":
        if config.get("addition_embed_type") == "text_time":
            allowed = ["StableDiffusionXLPipeline"]
        else:
            allowed.remove("StableDiffusionXLPipeline")
            if not config.get("time_cond_proj_dim"):
                allowed.remove("LatentConsistencyModelPipeline")
        default = ("StableDiffusionXLPipeline" if allowed == ["StableDiffusionXLPipeline"] else
                   "LatentConsistencyModelPipeline" if config.get("time_cond_proj_dim") else "StableDiffusionPipeline")
        if config.get("class_embed_type") or config.get("num_class_embeds"):
            raise ExportError("a class-conditional UNet2DConditionModel has no stock text-to-image pipeline")
    elif fam == "PixArtTransformer2DModel":
        default = "PixArtSigmaPipeline" if base_class and "Sigma" in base_class else "PixArtAlphaPipeline"
    else:
        default = allowed[0]
    if override is None:
        return default
    if override not in allowed:
        raise ExportError(f"pipeline {override!r} does not fit this {fam} student; use one of {', '.join(allowed)}")
    return override


def one_call_pipeline(student: Denoiser) -> str | None:
    """The stock pipeline an SD-style UNet that takes the guidance scale (``time_cond_proj_dim``) exports to with a
    scheduler of its own: StableDiffusionPipeline (it passes its ``guidance_scale`` as ``timestep_cond`` and skips
    CFG), not the default LatentConsistencyModelPipeline (LCMScheduler sampling); other backbones: None (the
    default, e.g. ClassConditionalPipeline or StableDiffusionXLPipeline, which do the same)."""
    config = backbones.unwrap(student.backbone).config
    if student.family == "UNet2DConditionModel" and config.get("addition_embed_type") != "text_time":
        return "StableDiffusionPipeline"
    return None


def guidance_plan(student: Denoiser, recipe: Recipe, pipeline: str,
                  trained_range: list[float] | None = None) -> tuple[str, float]:
    """(mode, guidance_scale): ``embedded`` (fed to a guidance embedding), ``cfg`` (CFG at that scale) or ``none``.

    A guidance-embedded student is exported only at a scale inside ``trained_range`` (the scales it was trained for;
    default: what its backbone records): outside it the export is refused (an ExportError naming the range), since
    the student would extrapolate; ClassConditionalPipeline warns when called outside it."""
    config = backbones.unwrap(student.backbone).config
    embedded = bool(config.get("time_cond_proj_dim")) or bool(config.get("guidance_embeds"))
    s = recipe.guidance_scale
    if embedded:
        if s is None:
            raise ExportError("this student has a guidance embedding (time_cond_proj_dim / guidance_embeds): give "
                              "the recipe the guidance_scale it was trained for (the value fed to the embedding)")
        trained_range = trained_range if trained_range is not None else guidance_range_of(student.backbone)
        if trained_range is not None and not trained_range[0] - 1e-6 <= float(s) <= trained_range[1] + 1e-6:
            raise ExportError(f"guidance_scale {float(s):g} is outside the range {list(trained_range)} the student "
                              "was trained for (its guidance input would extrapolate): export with a guidance_scale "
                              "in that range, or train with a guidance_range that covers it")
        return "embedded", float(s)
    s = 1.0 if s is None else float(s)
    if s < 1:
        raise ExportError(f"guidance_scale {s} < 1: use 1.0 for a student without guidance (CFG baked in) or the "
                          "CFG scale (> 1) the student samples with")
    if s == 1:
        return "none", 1.0
    if pipeline not in CFG_PIPELINES:
        raise ExportError(f"{pipeline} has no classifier-free guidance, but the recipe asks for guidance_scale={s}: "
                          "distil the guidance into the student and export with guidance_scale=1.0")
    if pipeline == "DiTPipeline" and student.null_class != 1000:
        raise ExportError(f"DiTPipeline's CFG uses the null class 1000, but this student's null class is "
                          f"{student.null_class}: export with guidance_scale=1.0 (guidance distilled)")
    if pipeline == "ClassConditionalPipeline" and student.null_class is None:
        raise ExportError("CFG with class labels needs the student's null class (Denoiser.null_class)")
    return "cfg", s


def quiet_diffusers():
    """Silence Diffusers' deprecation chatter while pipelines are assembled (we set the values it warns about)."""
    from diffusers.utils import logging as dlogging

    class _Ctx:
        def __enter__(self):
            self.level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()
            self.w = warnings.catch_warnings()
            self.w.__enter__()
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)

        def __exit__(self, *exc):
            self.w.__exit__(*exc)
            dlogging.set_verbosity(self.level)

    return _Ctx()


def scheduler_from_schedule(student: Denoiser):
    """A scheduler config for a Denoiser's own schedule (when no teacher scheduler is given)."""
    schedule = student.schedule
    if schedule.kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
    from diffusers import DDPMScheduler

    abar = schedule.alphas_cumprod.to(torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = (1 - abar / prev).clamp(0, 1)
    return DDPMScheduler(num_train_timesteps=len(abar), trained_betas=betas.tolist(),
                         prediction_type=student.prediction_type if student.prediction_type != "flow" else "epsilon",
                         timestep_spacing="trailing")
