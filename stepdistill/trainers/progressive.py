"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"), and
its guided form (Meng et al. 2023, stage 2: on a guidance-distilled student, the scale passed through).

A round halves the step count: a teacher that samples with ``N = 2K`` DDIM steps teaches a ``K``-step student
initialised from it (Salimans & Ho Alg. 2; google-research ``diffusion_distillation/dpm.py``,
``Model.training_losses`` with ``target_model_fn``, ../shared/reference/methods.md 1.7):

- the student's timesteps are the ones its export runs: DDIMScheduler with trailing spacing, ``t_i = T - 1 - i T/K``
  (4 steps: 999, 749, 499, 249), each stepping to ``s = t - T/K`` (DDIMScheduler's own rule; ``s < 0`` is the final
  x0, ``alpha = 1, sigma = 0`` as ``set_alpha_to_one``);
- data ``x`` is noised at a student timestep, ``z_t = alpha_t x + sigma_t eps``;
- the teacher makes two DDIM steps ``t -> t - T/(2K) -> s`` (on its own grid when ``2K`` divides T; between grid
  points the schedule is interpolated), ``z_mid = alpha_mid x_T(z_t) + sigma_mid eps_T(z_t)``, then ``z_s^T``;
- the student is regressed onto the x0 that makes *one* DDIM step land on ``z_s^T`` (:func:`implied_target`)::

      x~ = (z_s^T - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

  (at the last step, ``sigma_s = 0``: ``x~`` is the teacher's x0 from ``z_mid``, dpm.py's ``i == 0`` case);
- loss ``w(t) ||x_S(z_t) - x~||^2`` with the paper's ``snr_trunc`` weighting ``w = max(SNR(t), 1)``, i.e.
  ``max(x_mse, eps_mse)`` (:func:`loss_weight`; also ``snr`` = eps_mse, ``constant`` = x_mse, ``v_mse`` = 1 + SNR).

Guidance: a teacher that takes the guidance scale (a ``guidance`` run, or a previous round of one) gets ``s ~
U[guidance_range]`` per sample, passed to teacher and student alike (Meng stage 2: 4, 2, 1 steps with guidance); a
teacher without such an input runs CFG at the fixed ``guidance_scale``, which the student bakes in.

Rounds chain through run folders: ``model.source`` is the previous round's run (its ``final/``, which records its
``student_steps``), the student starts as that teacher, and each round exports with its own steps (DDIM at the
student's grid). The first round names the teacher's steps (``teacher_steps``); a teacher with an odd step count
cannot be halved, which is a ConfigError.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..backbones import in_channels, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..guided import guidance_range_of
from ..models import load_model, save_model, text_null_cond
from ..pipelines.recipes import get_recipe
from ..pipelines.sampling import sample_student
from ..pipelines.spec import ExportSpec, one_call_pipeline
from ..pipelines.weights import plain_denoiser
from .base import Objective, Phase
from .common import teacher_fingerprint
from .registry import register

WEIGHTINGS = ("snr_trunc", "snr", "constant", "v_mse")


# ------------------------------------------------------------------------------------------------ the math
def ddim_to(x0: torch.Tensor, z: torch.Tensor, at, st, an, sn) -> torch.Tensor:
    """One DDIM step from ``(z, t)`` to the level ``(alpha_n, sigma_n)`` with the x0 prediction made at ``z``:
    ``alpha_n x0 + sigma_n eps``, ``eps = (z - alpha_t x0) / sigma_t`` (Song et al. 2021 Eq. 12, eta = 0)."""
    return an * x0 + sn * (z - at * x0) / st


def implied_target(z_teacher: torch.Tensor, z_t: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """Salimans & Ho's x-target: the x0 from which one DDIM step ``t -> s`` lands on the teacher's two-step result,
    ``x~ = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)`` (Alg. 2; dpm.py ``stdv_frac =
    sigma_s / sigma_t``)."""
    frac = sigma_s / sigma_t
    return (z_teacher - frac * z_t) / (alpha_s - frac * alpha_t)


def loss_weight(snr: torch.Tensor, kind: str = "snr_trunc") -> torch.Tensor:
    """The weight on the x-MSE: ``snr_trunc`` ``max(SNR, 1)`` (= max(x_mse, eps_mse), since eps_mse = SNR x_mse at a
    fixed z_t), ``snr`` SNR (= eps_mse), ``constant`` 1 (= x_mse), ``v_mse`` 1 + SNR (= v_mse)."""
    if kind == "snr_trunc":
        return snr.clamp(min=1.0)
    if kind == "snr":
        return snr
    if kind == "constant":
        return torch.ones_like(snr)
    if kind == "v_mse":
        return 1.0 + snr
    raise ValueError(f"unknown weighting {kind!r}; expected one of {WEIGHTINGS}")


def progressive_loss(x0_pred: torch.Tensor, x_target: torch.Tensor, snr: torch.Tensor,
                     kind: str = "snr_trunc") -> torch.Tensor:
    """``mean_b w(SNR_b) mean_{chw} (x_S - sg(x~))^2``."""
    x_mse = ((x0_pred.float() - x_target.detach().float()) ** 2).flatten(1).mean(1)
    return (loss_weight(snr.float(), kind) * x_mse).mean()


def halve(teacher_steps: int) -> int:
    """The student's steps of a round whose teacher samples with ``teacher_steps`` (a ConfigError when odd)."""
    if teacher_steps < 2 or teacher_steps % 2:
        raise ConfigError(f"a progressive round halves the teacher's step count, and the teacher samples with "
                          f"{teacher_steps} step(s), which cannot be halved: start from a teacher with an even number "
                          "of steps (objective.teacher_steps, e.g. 16, 8, 4 or 2)")
    return teacher_steps // 2


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ProgressiveConfig:
    # the teacher's DDIM steps; None: read from the teacher folder (a previous round records its student_steps)
    teacher_steps: int | None = None
    loss_weight: Literal["snr_trunc", "snr", "constant", "v_mse"] = "snr_trunc"
    guidance_scale: float = 1.0  # CFG of a teacher without a guidance input (baked into the student)
    guidance_range: list[float] | None = None  # guidance-taking teachers: s ~ U[range]; None: the teacher's own
    sample_guidance: float | None = None  # the exported guidance_scale of a guidance-taking student (None: mid-range)

    def validate(self):
        if self.teacher_steps is not None:
            halve(self.teacher_steps)
        if self.guidance_scale < 1:
            raise ConfigError(f"objective.guidance_scale={self.guidance_scale} < 1 (standard CFG form; 1 = none)")
        r = self.guidance_range
        if r is not None and (len(r) != 2 or not 1 <= r[0] <= r[1]):
            raise ConfigError(f"objective.guidance_range is [s_min, s_max] with 1 <= s_min <= s_max, not {r}")


# ------------------------------------------------------------------------------------------------ objective
@register
class ProgressiveObjective(Objective):
    """One round of progressive distillation: phase ``student``, a copy of the (frozen) teacher."""

    name = "progressive"
    Config = ProgressiveConfig

    def __init__(self, config: ProgressiveConfig, teacher: Denoiser, teacher_scheduler, teacher_steps: int,
                 num_classes: int | None, resolution: int, channels: int, guidance_range=None):
        super().__init__(config)
        if teacher.schedule.kind != "vp":
            raise ConfigError("progressive distillation here runs DDIM on VP (DDPM-type) schedules; this teacher is a "
                              "flow-matching model (use reflow or rf_distill)")
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.schedule = teacher.schedule
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.null_cond = teacher.null_cond
        self.teacher_steps, self.student_steps = teacher_steps, halve(teacher_steps)
        total = self.schedule.num_train_timesteps
        if total % self.student_steps:
            raise ConfigError(f"a {self.student_steps}-step DDIM student needs equal steps of the teacher's {total} "
                              f"training timesteps; {total} / {self.student_steps} is not whole: choose teacher_steps "
                              f"so that teacher_steps / 2 divides {total}")
        config_dict = unwrap(teacher.backbone).config
        self.embedded = bool(config_dict.get("time_cond_proj_dim") or config_dict.get("guidance_embeds"))
        self.guidance_range = list(config.guidance_range or guidance_range or []) or None
        if self.embedded and self.guidance_range is None:
            raise ConfigError("the teacher takes the guidance scale but records no trained range: set "
                              "objective.guidance_range")
        self.student = teacher.clone(trainable=True)
        scale = ((config.sample_guidance or sum(self.guidance_range) / 2) if self.embedded else 1.0)
        self.recipe = get_recipe("ddim_trailing", self.student_steps, scale)
        self.pipeline = one_call_pipeline(self.student)
        spec = ExportSpec(self.student, self.recipe, teacher_scheduler, pipeline=self.pipeline)
        self.timesteps = spec.run_timesteps()
        self.step_size = total / self.student_steps

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def phases(cls, config):
        return [Phase("student", ("student",))]

    @classmethod
    def optim_defaults(cls, config):
        # Salimans & Ho: Adam, lr 1e-4 (CIFAR-10 5e-5 .. 2e-4), linear decay within each round
        return {"student": {"lr": 1e-4, "max_grad_norm": 1.0, "lr_schedule": "linear", "warmup_steps": 0}}

    @classmethod
    def from_config(cls, run, data=None) -> "ProgressiveObjective":
        cfg = run.objective
        loaded = load_model(run.model)
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
        if data is None or len(data) == 0 or "image" not in data[0]:
            raise ConfigError("progressive distillation noises data samples: set data.dataset to digits, folder, "
                              "pairs or prompts from a .jsonl naming an image per prompt")
        channels = data[0]["image"].shape[0]
        if channels != in_channels(loaded.denoiser.backbone):
            raise ConfigError(f"the data's images have {channels} channels, but the teacher takes "
                              f"{in_channels(loaded.denoiser.backbone)}")
        recorded = loaded.meta.get("student_steps")
        steps = cfg.teacher_steps if cfg.teacher_steps is not None else recorded
        if steps is None:
            raise ConfigError(f"objective.teacher_steps: {run.model.source!r} records no step count (it is not a "
                              "previous round's run): say how many DDIM steps the teacher samples with (e.g. 16)")
        if recorded is not None and cfg.teacher_steps is not None and cfg.teacher_steps != recorded:
            raise ConfigError(f"objective.teacher_steps={cfg.teacher_steps}, but the teacher {run.model.source!r} was "
                              f"trained to sample with {recorded} steps: leave teacher_steps unset to use them")
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        if not unwrap(loaded.denoiser.backbone).config.get("num_class_embeds"):
            num_classes = None
        if cfg.guidance_scale != 1 and num_classes is None and null is None:
            raise ConfigError("objective.guidance_scale needs a conditional teacher (class labels or prompts)")
        trained = loaded.meta.get("guidance_range") or guidance_range_of(loaded.denoiser.backbone)
        objective = cls(cfg, loaded.denoiser, loaded.scheduler, int(steps), num_classes, run.data.resolution,
                        channels, trained)
        objective.teacher_fingerprint = teacher_fingerprint(loaded.denoiser)
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder
        return objective

    # --- the loss ------------------------------------------------------------------------------------
    def levels(self, t: torch.Tensor, like: torch.Tensor):
        """``(alpha, sigma)`` at ``t`` shaped to broadcast over ``like``; ``t < 0`` is the final x0 (1, 0)."""
        a, s = self.schedule.coefficients(t.clamp(min=0), like)
        final = (t < 0).reshape(a.shape)
        return torch.where(final, torch.ones_like(a), a), torch.where(final, torch.zeros_like(s), s)

    def _batch_cond(self, batch) -> Cond:
        cond = Cond.from_batch(batch)
        if self.num_classes is None:
            cond.class_labels = None
        return cond

    def teacher_x0(self, z, t, cond: Cond, scale) -> torch.Tensor:
        if self.embedded:
            return self.teacher(z, t, replace(cond, guidance=scale))
        return self.teacher(z, t, cond, guidance_scale=self.config.guidance_scale)

    def loss(self, phase, batch, step):
        x0 = batch["image"]
        n, device = x0.shape[0], x0.device
        cond = self._batch_cond(batch)
        grid = torch.as_tensor(self.timesteps, device=device, dtype=torch.float32)
        t = grid[torch.randint(0, len(grid), (n,), device=device)]
        mid, s = t - self.step_size / 2, t - self.step_size
        z_t = self.schedule.add_noise(x0, torch.randn_like(x0), t).float()
        scale = (torch.empty(n, device=device).uniform_(*self.guidance_range) if self.embedded else None)
        at, st = self.levels(t, z_t)
        am, sm = self.levels(mid, z_t)
        a_s, s_s = self.levels(s, z_t)
        with torch.no_grad():
            z_mid = ddim_to(self.teacher_x0(z_t, t, cond, scale), z_t, at, st, am, sm)
            z_s = ddim_to(self.teacher_x0(z_mid, mid, cond, scale), z_mid, am, sm, a_s, s_s)
            target = implied_target(z_s, z_t, at, st, a_s, s_s)
        student_cond = replace(cond, guidance=scale) if self.embedded else cond
        pred = self.student(z_t, t, student_cond)
        snr = (at / st).flatten() ** 2
        loss = progressive_loss(pred, target, snr, self.config.loss_weight)
        return loss, {"progressive": loss.detach()}

    # --- sampling and export -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generator=None):
        n, device = batch["batch_size"], self.device
        cond = (Cond(class_labels=torch.arange(n, device=device) % self.num_classes) if self.num_classes
                else self.null_cond.to(device).repeat(n) if self.null_cond is not None else Cond())
        if self.embedded:
            cond = replace(cond, guidance=torch.full((n,), self.recipe.guidance_scale, device=device))
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        spec = self.export_spec()
        return sample_student(self.student, spec.scheduler, noise, self.student_steps, cond, generator=generator,
                              pipeline=spec.pipeline_name).clamp(-1, 1)

    def _meta(self) -> dict:
        meta = {"resolution": self.resolution, "channels": self.channels}
        return meta | ({"guidance_range": self.guidance_range} if self.embedded else {})

    def save_pretrained(self, directory):
        save_model(plain_denoiser(self.student), self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, "student_steps": self.student_steps,
                    "progressive": {"teacher_steps": self.teacher_steps, "loss_weight": self.config.loss_weight},
                    **self._meta()})

    def export_spec(self):
        return ExportSpec(student=self.student, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.timesteps,
                          base_folder=getattr(self, "base_folder", None), meta=self._meta(), pipeline=self.pipeline)
