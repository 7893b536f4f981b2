"""SwiftBrush (Nguyen & Tran 2024, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation"): image-free VSD of a text-to-image teacher into a one-step student.

VSD (:mod:`~stepdistill.trainers.vsd`) as the official ``train_swiftbrush.py`` runs it
(../shared/reference/methods.md 1.3):

- the student sees prompts only (or, for a class-conditional teacher, class labels drawn at random): no images;
- one step at t = T-1 (or ``conditioning_timestep``): the student's output is read as the teacher's parameterization
  and turned into x0 with the teacher's own schedule (the reference hard-codes SD 2.1's ``abar_999 = 0.0047``);
- the LoRA teacher is LoRA on the frozen teacher, and the real score is **the same network with its adapters
  disabled** (one copy of the teacher's weights in memory; :meth:`SwiftBrushObjective.frozen_base`);
- the same CFG scale on both (``fake_guidance_scale: null``); the gradient ``sigma_t^2 (eps_teacher - eps_lora)`` at
  ``t ~ U{20..980}``, applied as ``0.5 * mse(x0, sg(x0 - grad))`` (``loss_reduction: mean``);
- the LoRA teacher's loss ``mse(alpha_t eps_lora, alpha_t eps)`` at ``t ~ U{0..999}`` with 10% prompt dropout
  (per sample here; the reference drops the whole batch's prompts with probability 0.1 — the same rate);
- the published settings are the defaults: student lr 1e-6, LoRA lr 1e-3, rank 64, alpha 108, Adam (AdamW without
  weight decay), constant lr, gradient clipping 1.0, CFG 4.5 (the README's command; the script's default is 7.5).

SwiftBrush v2 (Dao et al. 2024): its student initialised from a distilled one-step model (SD-Turbo) is
``objective.generator_init=FOLDER``. Its clamped CLIP loss is not implemented (methods.md does not give its formula).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones import unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from .registry import register
from .vsd import VSDConfig, VSDObjective

IMAGE_FREE = ("prompts", "none")


@dataclass
class SwiftBrushConfig(VSDConfig):
    real_guidance_scale: float = 4.5  # README's command (train_swiftbrush.py's default: 7.5)
    fake_guidance_scale: float | None = None  # None: the same CFG as the teacher's (SwiftBrush)
    fake_score_lora_rank: int = 64
    fake_score_lora_alpha: float | None = 108.0
    fake_score_loss: Literal["denoising", "alpha_eps"] = "alpha_eps"
    loss_reduction: Literal["batch", "mean"] = "mean"
    label_dropout: float = 0.1  # the LoRA teacher's prompt dropout

    def validate(self):
        if self.regression_weight > 0 or self.gan_weight_gen > 0 or self.gan_weight_disc > 0:
            raise ConfigError("SwiftBrush is image-free: it has no regression term (teacher pairs) and no GAN term "
                              "(real images); set objective.regression_weight, gan_weight_gen and gan_weight_disc to "
                              "0, or use dmd / dmd2 to train with images")
        super().validate()
        if self.fake_score_lora_rank < 1:
            raise ConfigError("SwiftBrush's real score is its LoRA teacher with the adapters off: "
                              "objective.fake_score_lora_rank must be >= 1 (SwiftBrush: 64)")


@register
class SwiftBrushObjective(VSDObjective):
    """SwiftBrush: VSD whose real score is the LoRA teacher's frozen base (:meth:`frozen_base`), on prompts only."""

    name = "swiftbrush"
    Config = SwiftBrushConfig

    @classmethod
    def optim_defaults(cls, config):
        # train_swiftbrush.py with the README's command: Adam, constant lr, no warm-up, grad clip 1.0
        return {"generator": {"lr": 1e-6, "every": 1, "max_grad_norm": 1.0, "lr_schedule": "constant",
                              "warmup_steps": 0},
                "critic": {"lr": 1e-3, "max_grad_norm": 1.0, "lr_schedule": "constant", "warmup_steps": 0}}

    @classmethod
    def from_config(cls, run, data=None):
        if run.data.dataset not in IMAGE_FREE:
            raise ConfigError(f"method {run.method} is image-free: it learns from prompts alone, and "
                              f"data.dataset={run.data.dataset!r} gives images. Set data.dataset=prompts with "
                              "data.path=a prompt file (text teachers), or data.dataset=none (a class-conditional "
                              "teacher: class labels are drawn at random)")
        return super().from_config(run, data)

    @contextlib.contextmanager
    def frozen_base(self):
        """The LoRA teacher's network with every adapter disabled, read in the teacher's parameterization: the frozen
        teacher itself (the same weight tensors), as SwiftBrush's ``teacher_lora.disable_adapters()``."""
        fake = unwrap(self.fake_score)
        with fake.adapters_disabled():
            yield Denoiser(fake.backbone, self.schedule, self.teacher.prediction_type, null_cond=fake.null_cond,
                           null_class=fake.null_class)

    def real_score_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None) -> torch.Tensor:
        """The real score: the LoRA teacher with its adapters off (:meth:`frozen_base`), with CFG at
        ``guidance_scale`` (None: ``real_guidance_scale``)."""
        scale = self.config.real_guidance_scale if guidance_scale is None else guidance_scale
        with self.frozen_base() as base:
            return base(x_t, t, cond, guidance_scale=scale)
