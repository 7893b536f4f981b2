"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1) and
LoRA-enhanced distillation (Golnari 2023, "LoRA-Enhanced Distillation on Guided Diffusion Models").

Classifier-free guidance costs two network calls per step. Guidance distillation trains a student that takes the
guidance scale ``s`` as an input to give the teacher's guided prediction in one call, at every scale of a range::

    L = E_{x, c, t, eps, s ~ U[s_min, s_max]} || f_S(z_t, t, c; s) - [f_u + s (f_c - f_u)] ||^2,
    f_c = f_T(z_t, t, c), f_u = f_T(z_t, t, null)

(:func:`guidance_loss`; Meng et al. Eq. 5 write the target ``(1 + w) x_c - w x_u``: their ``w`` is ``s - 1``),
``z_t = alpha_t x + sigma_t eps`` the data noised at the teacher's own timesteps ``t ~ U{t_min..t_max}``, the loss in
the teacher's parameterization (v for the shipped teachers, eps for SD 1.5). The student is the teacher with a
guidance input added and zeroed, so it starts as the teacher at every scale (:meth:`stepdistill.Denoiser.
guidance_embedded`):

- UNet2DConditionModel (SD 1.5/2.1, SDXL, digits-t2i): ``time_cond_proj_dim`` (LCM's ``timestep_cond``, the sinusoidal
  embedding of ``w = s - 1``). Exported as a stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with
  DDIMScheduler: with ``time_cond_proj_dim`` set, those pipelines turn their ``guidance_scale`` into that embedding and
  skip CFG — one UNet call per step;
- UNet2DModel (the class-conditional digits): :class:`~stepdistill.guided.GuidedUNet2DModel`, the same ``cond_proj``
  on its time embedding; exported under ``ClassConditionalPipeline``, whose ``guidance_scale`` feeds it (one call);
- Flux-style transformers: their own guidance embedding (``guidance_embeds``, FluxPipeline passes ``guidance = s``).
- DiT, PixArt and SD3 have no such input: distil them with guidance adapters (method ``agd``).

A guidance scale outside the trained range is **refused at export** (an ExportError naming the range) and **warned
about at call time** by ClassConditionalPipeline (stock pipelines do not check).

LoRA-enhanced distillation (``student_lora_rank`` > 0; the ``LoRADistillTrainer`` binding): the student is LoRA on the
teacher's own weights (plus the new guidance embedding) and the teacher is that network with the adapters off — one
copy of the base weights in memory, the same tensors (:meth:`stepdistill.Denoiser.guidance_embedded` with
``share_weights``), as DMD's LoRA fake score and SwiftBrush's frozen base; Golnari reports about half the memory of a
full student copy. Exported as the base weights with the trained embedding plus a LoRA file (``load_lora_weights``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..backbones import in_channels, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..models import load_model, save_model, text_null_cond
from ..pipelines.recipes import get_recipe
from ..pipelines.sampling import sample_student
from ..pipelines.spec import ExportSpec, one_call_pipeline
from ..pipelines.weights import plain_denoiser
from .base import Objective, Phase
from .common import add_guidance_embedding, teacher_fingerprint
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def cfg_target(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The teacher's guided prediction ``u + s (c - u)`` with a scale per sample (``(B,)``); Meng's ``(1 + w) x_c -
    w x_u`` with ``w = s - 1``."""
    s = scale.float().reshape(-1, *([1] * (cond_pred.ndim - 1)))
    return uncond_pred.float() + s * (cond_pred.float() - uncond_pred.float())


def guidance_loss(student_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean || f_S(z_t, t, c; s) - sg(target) ||^2`` (Meng et al. Eq. 5 in the teacher's parameterization)."""
    return torch.mean((student_pred.float() - target.detach().float()) ** 2)


def draw_scales(n: int, lo_hi, device=None) -> torch.Tensor:
    """``s ~ U[s_min, s_max]`` per sample (standard CFG form)."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, device=device)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class GuidanceConfig:
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 5.0])  # [s_min, s_max] (Meng: w in [0, 4])
    guidance_embedding_dim: int = 256  # time_cond_proj_dim of the added embedding (LCM: 256)
    t_min: int = 0  # training timesteps ~ U{t_min..t_max} of the teacher's schedule
    t_max: int | None = None  # None: the last training timestep
    # LoRA-enhanced distillation: LoRA of this rank on the teacher's own weights (0: a full student copy)
    student_lora_rank: int = 0
    lora_alpha: float | None = None  # None: the rank
    lora_targets: list[str] | None = None  # None: the backbone's usual modules (stepdistill.denoiser)
    sample_steps: int = 25  # the exported pipeline's steps (DDIM, trailing spacing; flow teachers: Euler)
    sample_guidance: float | None = None  # the exported guidance_scale (None: the middle of guidance_range)

    def validate(self):
        r = self.guidance_range
        if len(r) != 2 or not 1 <= r[0] <= r[1]:
            raise ConfigError(f"objective.guidance_range is [s_min, s_max] with 1 <= s_min <= s_max (standard CFG "
                              f"form, s = 1 no guidance), not {r}")
        if self.sample_guidance is not None and not r[0] <= self.sample_guidance <= r[1]:
            raise ConfigError(f"objective.sample_guidance={self.sample_guidance} is outside guidance_range {r}: the "
                              "student is trained only in that range")
        if self.student_lora_rank < 0 or self.guidance_embedding_dim < 2 or self.sample_steps < 1:
            raise ConfigError("objective.student_lora_rank must be >= 0, guidance_embedding_dim >= 2 and "
                              "sample_steps >= 1")
        if self.lora_targets is not None and not self.student_lora_rank:
            raise ConfigError("objective.lora_targets are for a LoRA student: set objective.student_lora_rank")

    @property
    def export_guidance(self) -> float:
        return self.sample_guidance if self.sample_guidance is not None else sum(self.guidance_range) / 2


# ------------------------------------------------------------------------------------------------ objective
@register
class GuidanceDistillObjective(Objective):
    """Guidance distillation: one phase (``student``), the teacher's CFG output as the target."""

    name = "guidance"
    Config = GuidanceConfig

    def __init__(self, config: GuidanceConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        super().__init__(config)
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.schedule = teacher.schedule
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.null_cond = teacher.null_cond
        self.student = make_guided_student(teacher, config)
        flow = self.schedule.kind == "flow"
        self.recipe = get_recipe("flow_euler" if flow else "ddim_trailing", config.sample_steps,
                                 config.export_guidance)
        self.pipeline = one_call_pipeline(self.student)
        spec = ExportSpec(self.student, self.recipe, teacher_scheduler, pipeline=self.pipeline)
        self.timesteps = spec.run_timesteps()

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def phases(cls, config):
        return [Phase("student", ("student",))]

    @classmethod
    def optim_defaults(cls, config):
        # Meng et al.: Adam; a LoRA student takes a larger step (LoRA-enhanced distillation)
        lr = 1e-4 if config.student_lora_rank else 2e-5
        return {"student": {"lr": lr, "max_grad_norm": 1.0, "lr_schedule": "constant_with_warmup",
                            "warmup_steps": 100}}

    @classmethod
    def from_config(cls, run, data=None) -> "GuidanceDistillObjective":
        loaded = load_model(run.model)
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
        if data is None or len(data) == 0 or "image" not in data[0]:
            raise ConfigError(f"method {run.method} noises data samples (Meng et al. train on data): set data.dataset "
                              "to digits, folder, pairs (the teacher's samples) or prompts from a .jsonl naming an "
                              "image per prompt")
        channels = data[0]["image"].shape[0]
        if channels != in_channels(loaded.denoiser.backbone):
            raise ConfigError(f"the data's images have {channels} channels, but the teacher takes "
                              f"{in_channels(loaded.denoiser.backbone)}")
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        if not unwrap(loaded.denoiser.backbone).config.get("num_class_embeds"):
            num_classes = None
        if num_classes is None and null is None:
            raise ConfigError(f"guidance distillation needs a conditional teacher (class labels with a null class, or "
                              f"prompts): {run.model.source!r} is unconditional")
        if num_classes is not None and loaded.denoiser.null_class is None:
            raise ConfigError("CFG with class labels needs the teacher's null class: add \"num_classes\" to its "
                              "stepdistill.json")
        objective = cls(run.objective, loaded.denoiser, loaded.scheduler, num_classes, run.data.resolution, channels)
        objective.teacher_fingerprint = teacher_fingerprint(loaded.denoiser)
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder
        return objective

    # --- the loss ------------------------------------------------------------------------------------
    def _batch_cond(self, batch) -> Cond:
        cond = Cond.from_batch(batch)
        if self.num_classes is None:
            cond.class_labels = None
        return cond

    def noised(self, x0: torch.Tensor):
        """``(z_t, t)``: the data noised at ``t ~ U{t_min..t_max}``."""
        t = self.schedule.sample_t(x0.shape[0], "uniform", t_min=self.config.t_min, t_max=self.config.t_max,
                                   device=x0.device)
        return self.schedule.add_noise(x0, torch.randn_like(x0), t), t

    def guidance_terms(self, batch) -> dict[str, torch.Tensor]:
        x0 = batch["image"]
        cond = self._batch_cond(batch)
        x_t, t = self.noised(x0)
        scale = draw_scales(x0.shape[0], self.config.guidance_range, x0.device)
        pt = self.teacher.prediction_type
        with torch.no_grad():
            target = self.teacher(x_t, t, cond, output=pt, guidance_scale=scale)
        pred = self.student(x_t, t, replace(cond, guidance=scale), output=pt)
        return {"guidance": guidance_loss(pred, target)}

    def loss(self, phase, batch, step):
        terms = self.guidance_terms(batch)
        return terms["guidance"], {k: v.detach() for k, v in terms.items()}

    # --- sampling and export -----------------------------------------------------------------------
    def _sample_cond(self, n: int, device) -> Cond:
        cond = (Cond(class_labels=torch.arange(n, device=device) % self.num_classes) if self.num_classes
                else self.null_cond.to(device).repeat(n) if self.null_cond is not None else Cond())
        return replace(cond, guidance=torch.full((n,), self.recipe.guidance_scale, device=device))

    @torch.no_grad()
    def sample(self, batch, generator=None):
        """The exported pipeline's sampling (its scheduler and steps) with the guidance scale fed to the student."""
        n = batch["batch_size"]
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(self.device)
        spec = self.export_spec()
        return sample_student(self.student, spec.scheduler, noise, self.recipe.num_inference_steps,
                              self._sample_cond(n, self.device), generator=generator,
                              pipeline=spec.pipeline_name).clamp(-1, 1)

    def _meta(self) -> dict:
        return {"resolution": self.resolution, "channels": self.channels,
                "guidance_range": list(self.config.guidance_range)}

    def save_pretrained(self, directory):
        save_model(plain_denoiser(self.student), self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, **self._meta()})

    def export_spec(self):
        return ExportSpec(student=self.student, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.timesteps,
                          base_folder=getattr(self, "base_folder", None), meta=self._meta(), pipeline=self.pipeline)


# ------------------------------------------------------------------------------------------------ helpers
def make_guided_student(teacher: Denoiser, config: GuidanceConfig) -> Denoiser:
    """The guidance-embedded student: a trainable copy, or (``student_lora_rank``) LoRA on the teacher's own weights
    with the new embedding trainable beside the adapters."""
    lora = config.student_lora_rank
    student = add_guidance_embedding(teacher, config.guidance_embedding_dim, share_weights=bool(lora),
                                     guidance_range=config.guidance_range)
    if lora:
        own = [p for p in student.parameters() if p.requires_grad]  # the new embedding
        try:
            student.with_lora(lora, config.lora_alpha, target_modules=config.lora_targets)
        except ValueError as exc:
            raise ConfigError(f"objective.lora_targets: {exc}") from None
        for p in own:
            p.requires_grad_(True)
    return student
