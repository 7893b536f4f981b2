"""SlimFlow (Zhu, Liu and Liu 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow";
yuanzhi-zhu/SlimFlow ``reflow/reflow.py``): a smaller one-step model from a large flow, in two stages.

- ``stage: reflow`` — annealing reflow into a SMALLER student (its own ``student_config``: overrides of the
  teacher's backbone config, e.g. fewer ``block_out_channels``; randomly initialised, as SlimFlow trains it from
  scratch) on the large flow's pairs. Each pair's noise is mixed with fresh noise,
  ``z' = sqrt(1 - beta^2) z + beta eps`` (:func:`annealed_noise`), with ``beta`` falling linearly from 1 to 0 over
  ``warmup_N`` steps (:func:`annealing_beta`; SlimFlow's ``x0_randomness warmup_N``): the small model first learns
  a plain flow (independent noise), then the teacher's coupling. ``h_flip`` flips each pair's noise and image
  together with probability 1/2 (SlimFlow's CIFAR-10 runs; off for digits, which are not mirror-symmetric).
- ``stage: distill`` — flow-guided distillation into one step. ``student_init`` is the stage-1 run (the slim 2-RF);
  the student starts from it and a frozen copy guides it. Beside the one-step distillation loss on the large flow's
  pairs, ``d(z - u_s(z, 1), x0)``, on fresh noise ``z`` with ``t' ~ U(0.2, 0.8)`` (SlimFlow's time, t = 0 noise;
  ``sigma' = 1 - t'``, :func:`~stepdistill.trainers.reflow.paper_sigma`): the student's one-step path point
  ``x_{sigma'} = z - (1 - sigma') sg(u_s)``, the guide's velocity there, and its Euler step to the data
  ``x1 = x_{sigma'} - sigma' u_g`` as the target of the student's one step, with the same distance
  (:func:`~stepdistill.trainers.reflow.flow_guided_point`, :func:`~stepdistill.trainers.reflow.flow_guided_target`).

In both stages ``model.source`` is the large flow that made the pairs (their manifest is checked against it). The
student exports its own architecture config (a smaller UNet2DModel) in the flow_euler pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..backbones import in_channels, unwrap
from ..config import ConfigError, ModelConfig
from ..models import load_model
from .common import check_teacher, init_generator, new_student, run_teacher
from .reflow import (ReflowConfig, ReflowObjective, as_flow, flow_guided_point, flow_guided_target, paper_sigma,
                     reflow_target)
from .registry import register


def annealing_beta(step: int, warmup_n: int) -> float:
    """SlimFlow's linear ``x0_randomness`` schedule ``warmup_N``: ``beta = 1 - min(1, step / N)`` (1 -> 0 over N
    steps, then 0); ``N = 0``: no annealing (0)."""
    return 0.0 if warmup_n <= 0 else 1.0 - min(1.0, step / warmup_n)


def annealed_noise(z: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
    """The pair's noise mixed with fresh noise, ``sqrt(1 - beta^2) z + beta eps`` (still N(0, I))."""
    return math.sqrt(1.0 - beta * beta) * z + beta * eps


@dataclass
class SlimFlowConfig(ReflowConfig):
    """Annealing reflow into a smaller student (stage reflow), flow-guided one-step distillation (stage distill)."""

    stage: Literal["reflow", "distill"] = "reflow"
    t_dist: Literal["uniform", "u_shaped", "grid"] | None = None  # default: uniform (reflow), grid (distill)
    student_steps: int | None = None  # default: 4 (reflow), 1 (distill)
    # stage reflow: overrides of the teacher's backbone config for the smaller student ({}: the teacher's size)
    student_config: dict = field(default_factory=dict)
    warmup_N: int = 0  # annealing: beta falls 1 -> 0 over this many steps (SlimFlow CIFAR-10: 300000); 0: none
    h_flip: bool = False  # joint horizontal flip of each pair (images that are mirror-symmetric only)
    # stage distill: the flow-guided term, t' ~ U(guide_t_min, guide_t_max) in SlimFlow's time (t = 0 noise)
    guide_t_min: float = 0.2
    guide_t_max: float = 0.8
    guide_weight: float = 1.0  # SlimFlow adds it with weight 1

    def validate(self):
        if self.t_dist is None:
            self.t_dist = "grid" if self.stage == "distill" else "uniform"
        if self.student_steps is None:
            self.student_steps = 1 if self.stage == "distill" else 4
        if self.warmup_N < 0:
            raise ConfigError(f"objective.warmup_N must be >= 0 (0: no annealing), not {self.warmup_N}")
        if not 0 <= self.guide_t_min < self.guide_t_max <= 1:
            raise ConfigError("objective.guide_t_min < guide_t_max must lie in [0, 1] (SlimFlow's time: 0.2, 0.8)")
        if self.stage == "distill":
            if not self.student_init:
                raise ConfigError("objective.stage=distill distils the slim 2-RF: set objective.student_init to the "
                                  "stage-reflow run folder (its final/ model)")
            if self.student_config:
                raise ConfigError("objective.stage=distill takes the student's architecture from student_init: "
                                  "remove objective.student_config")
            if self.t_dist != "grid" or self.student_steps != 1:
                raise ConfigError("objective.stage=distill trains a one-step student: leave t_dist and "
                                  "student_steps unset (grid, 1)")
        super().validate()


@register
class SlimFlowObjective(ReflowObjective):
    """SlimFlow's two stages on the large flow's pairs (see the module docstring)."""

    name = "slimflow"
    Config = SlimFlowConfig

    @classmethod
    def make_student(cls, cfg, loaded, scheduler, run, fingerprint):
        teacher = as_flow(loaded.denoiser, scheduler)
        channels = in_channels(unwrap(teacher.backbone))
        if cfg.stage == "distill":
            check_teacher(run_teacher(cfg.student_init), fingerprint, f"objective.student_init={cfg.student_init!r}",
                          run.model.source)
            init = load_model(ModelConfig(source=str(cfg.student_init)))
            student = as_flow(init.denoiser, scheduler)
            student.null_cond, student.null_class = teacher.null_cond, teacher.null_class
            where = "objective.student_init"
            student = student.clone(trainable=True)
        else:
            student = new_student(teacher, dict(cfg.student_config), "objective.student_config")
            where = "objective.student_config"
            if cfg.student_init:
                init_generator(student, cfg.student_init, "objective.student_init", fingerprint, run.model.source)
        config = unwrap(student.backbone).config
        if in_channels(unwrap(student.backbone)) != channels or config.get("out_channels", channels) != channels:
            raise ConfigError(f"{where}: the student must take and give the teacher's {channels}-channel samples "
                              f"(in_channels={in_channels(unwrap(student.backbone))}, out_channels="
                              f"{config.get('out_channels')}): set in_channels and out_channels to {channels}")
        return student

    def setup(self, run, loaded) -> None:
        n_student = sum(p.numel() for p in self.student.parameters())
        n_teacher = sum(p.numel() for p in unwrap(loaded.denoiser.backbone).parameters())
        self.meta.update(student_parameters=n_student, teacher_parameters=n_teacher)
        self.guide = None
        if self.config.stage == "distill":  # the slim 2-RF as it was before distillation, frozen
            self.guide = self.student.clone(trainable=False).freeze()
        lo, hi = sorted(paper_sigma(t, "rectified_flow") for t in (self.config.guide_t_min, self.config.guide_t_max))
        self.guide_sigma = (lo, hi)

    def pair(self, batch, step):
        noise, x0 = batch["noise"], batch["image"]
        beta = annealing_beta(step, self.config.warmup_N) if self.config.stage == "reflow" else 0.0
        if beta > 0:
            noise = annealed_noise(noise, torch.randn_like(noise), beta)
        if self.config.h_flip:
            flip = (torch.rand(noise.shape[0], device=noise.device) < 0.5).reshape(-1, *([1] * (noise.ndim - 1)))
            noise, x0 = torch.where(flip, noise.flip(-1), noise), torch.where(flip, x0.flip(-1), x0)
        self.beta = beta
        return noise, x0

    def guided_loss(self, batch) -> torch.Tensor:
        """The flow-guided term on fresh noise with the batch's conditions (see the module docstring)."""
        cond = self.condition(batch)
        z = torch.randn_like(batch["noise"])
        n, total = z.shape[0], self.student.schedule.num_train_timesteps
        t_one = torch.full((n,), float(total), device=z.device)
        u_s = self.student(z, t_one, cond, output="flow")
        lo, hi = self.guide_sigma
        sigma = (lo + (hi - lo) * torch.rand(n, device=z.device)).float()
        with torch.no_grad():
            x_s = flow_guided_point(z, u_s, sigma)
            x1 = flow_guided_target(x_s, self.guide(x_s, sigma * total, cond, output="flow"), sigma)
        return self.distance(u_s, reflow_target(z, x1), z, t_one).mean()

    def loss(self, phase, batch, step):
        loss = self.reflow_loss(batch, step)
        logs = {"reflow": loss.detach()}
        if self.config.stage == "distill":
            guided = self.guided_loss(batch)
            loss = loss + self.config.guide_weight * guided
            logs["flow_guided"] = guided.detach()
        else:
            logs["beta"] = torch.tensor(self.beta)
        return loss, logs
