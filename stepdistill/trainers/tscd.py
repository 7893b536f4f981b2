"""Trajectory-segmented consistency distillation (Hyper-SD TSCD, Ren et al. 2024): consistency distillation
towards the lower boundary of each trajectory segment, with the segment count falling 8 -> 4 -> 2 -> 1 in stages
of one run. Hyper-SD's training code is not public; the segmented target follows PCM's multiphase implementation
(G-U-N/Phased-Consistency-Model, ``ddim_style_multiphase_pred``; ../shared/reference/methods.md 1.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..conditioning import Cond
from ..config import ConfigError
from ..pipelines.recipes import get_recipe
from ..solvers import ddim_from_x0, sample as solve
from .consistency import ConsistencyConfig, ConsistencyObjective, consistency_loss
from .registry import register


def segment_boundary(t: torch.Tensor, num_segments: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The lower boundary of the trajectory segment that holds timestep ``t``: [0, T) cut into ``k`` segments of
    width ``w = T / k`` with boundaries ``B_j = j w - 1`` (the k-step trailing DDIM timesteps) and ``B_0 = 0``;
    ``t`` is in segment ``j = floor(t / w)`` (``B_j < t <= B_{j+1}``), Hyper-SD's TSCD / PCM's multiphase."""
    width = num_train_timesteps // num_segments
    j = torch.div(t.long(), width, rounding_mode="floor")
    return torch.where(j > 0, j * width - 1, torch.zeros_like(j)).float()


def to_boundary(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, boundary: torch.Tensor, schedule) -> torch.Tensor:
    """The segment's consistency function: the DDIM step from ``(x_t, t)`` with the prediction ``x0`` to the
    boundary, ``a_b x0 + s_b eps_hat`` — at a boundary of 0 it is ``x0``; at ``t = boundary`` it is ``x_t``."""
    return ddim_from_x0(x0, x_t, schedule, t, boundary)


def stage_of(step: int, stage_starts: list[int]) -> int:
    """The index of the progressive stage that ``step`` is in (``stage_starts`` ascending, from 0)."""
    return max(i for i, start in enumerate(stage_starts) if step >= start)


@dataclass
class TSCDConfig(ConsistencyConfig):
    """Consistency distillation to segment boundaries, ``segments`` k = 8 -> 4 -> 2 -> 1 in stages starting at
    ``stage_starts`` (default: train.max_steps split evenly). The solver grid (``num_ddim_timesteps``) must split
    evenly into every segment count: 40 steps by default. Exported with DDIM at trailing timesteps, in the k steps
    of the stage the exported checkpoint ends (``student_steps`` for k = 1): as Hyper-SD ships one model per step
    count, a checkpoint at the end of the k = 4 stage is the 4-step model. ``sampler: tcd`` exports TCDScheduler
    on the same timesteps instead (gamma ``tcd_gamma``; at 0 it is DDIM), as Hyper-SD samples its one-step model
    in several steps (on the digits the final model's 4 steps: 4.6x the teacher's FID with DDIM, 1.3x with TCD at
    gamma 0.7). A k > 1 stage is trained to land on its segment boundaries deterministically, so it wants gamma 0
    (the k = 4 stage's 4 steps: 1.05x at gamma 0, 2.2x at 0.3, 4.9x at 1)."""

    num_ddim_timesteps: int = 40
    sampler: Literal["ddim_trailing", "tcd"] = "ddim_trailing"
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    stage_starts: list[int] | None = None
    loss: Literal["l2", "huber"] = "huber"

    def validate(self):
        super().validate()
        if self.sample_timesteps is not None:
            raise ConfigError("objective.sample_timesteps is not for tscd: each stage exports DDIM at trailing "
                              "timesteps, one step per segment")
        if not self.segments or any(k < 1 for k in self.segments) or self.segments != sorted(self.segments, reverse=True):
            raise ConfigError(f"objective.segments must be decreasing positive counts such as [8, 4, 2, 1], not "
                              f"{self.segments}")
        bad = [k for k in self.segments if self.num_ddim_timesteps % k]
        if bad:
            raise ConfigError(f"objective.segments {bad} do not divide the solver grid of num_ddim_timesteps="
                              f"{self.num_ddim_timesteps} steps: segment boundaries must be grid points (use e.g. "
                              "40 or 80 steps for 8/4/2/1 segments)")
        if self.stage_starts is not None and (len(self.stage_starts) != len(self.segments) or self.stage_starts[0]
                                              or self.stage_starts != sorted(self.stage_starts)):
            raise ConfigError("objective.stage_starts: one ascending start step per stage, the first 0")


@register
class TSCDObjective(ConsistencyObjective):
    """Trajectory-segmented consistency distillation (Hyper-SD, Ren et al. 2024): the student's output at ``t``
    is its DDIM step to the lower boundary of t's segment, and must agree with the EMA target's from one teacher
    step further; the segment count drops stage by stage within the run."""

    name = "tscd"
    Config = TSCDConfig

    def __init__(self, config: TSCDConfig, *args, **kwargs):
        if config.adv_weight:
            raise ConfigError("tscd's outputs are points on segment boundaries, not images: the adversarial term "
                              "(objective.adv_weight) is for lcm, scott and acd")
        super().__init__(config, *args, **kwargs)
        if self.schedule.kind != "vp":
            raise ConfigError("tscd segments a VP teacher's trajectory at trailing DDIM timesteps; flow teachers are "
                              "not supported")

        self.stage_starts = config.stage_starts or [0] * len(config.segments)
        self.recipe_guidance = self.recipe.guidance_scale
        self.recipe = self.stage_recipe(config.segments[-1])

    def stage_recipe(self, segments: int):
        """DDIM at trailing timesteps, one step per segment (``student_steps`` once there is one segment); or
        TCDScheduler on the solver grid, whose k steps are the same trailing timesteps."""
        steps = segments if segments > 1 else self.config.student_steps
        if self.config.sampler == "tcd":
            return get_recipe("tcd", steps, self.recipe_guidance, eta=self.config.tcd_gamma,
                              original_inference_steps=self.config.num_ddim_timesteps)
        return get_recipe("ddim_trailing", steps, self.recipe_guidance)

    def set_step(self, steps_done):
        self.recipe = self.stage_recipe(self.segments_at(max(steps_done - 1, 0)))

    @classmethod
    def from_config(cls, run, data=None) -> "TSCDObjective":
        objective = super().from_config(run, data)
        if run.objective.stage_starts is None:  # the run's steps split evenly between the stages
            k = len(run.objective.segments)
            objective.stage_starts = [i * run.train.max_steps // k for i in range(k)]
        return objective

    def segments_at(self, step: int) -> int:
        return self.config.segments[stage_of(step, self.stage_starts)]

    def loss(self, phase, batch, step):
        cfg = self.config
        x0 = batch["image"]
        n, device = x0.shape[0], x0.device
        cond = Cond.from_batch(batch)
        k = self.segments_at(step)
        t, t_prev = self.grid_pair(n, device)
        boundary = segment_boundary(t, k, self.schedule.num_train_timesteps)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        scale = self._guidance(n, device)
        student_cond = self._student_cond(cond, scale)
        pred = to_boundary(x_t, self.student(x_t, t, student_cond), t, boundary, self.schedule)
        with torch.no_grad():
            x_prev = self.teacher_step(x_t, t, t_prev, cond, scale if scale is not None else cfg.guidance_scale)
            target = to_boundary(x_prev, self.target(x_prev, t_prev, student_cond), t_prev, boundary, self.schedule)
        loss = consistency_loss(pred, target, cfg.loss, cfg.huber_c)
        return loss, {"consistency": loss.detach(), "segments": torch.tensor(float(k))}

    @torch.no_grad()
    def sample(self, batch, generator=None):
        x, cond = self._sample_inputs(batch["batch_size"], generator)
        if self.recipe.sampler == "tcd":
            return self.sample_tcd(x, cond, generator)
        return solve(lambda xx, tt: self.student(xx, tt, cond), self.schedule, x,
                     self.sample_timesteps()).clamp(-1, 1)
