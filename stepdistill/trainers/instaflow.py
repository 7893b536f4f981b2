"""InstaFlow (Liu et al. 2024, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image
Generation"; gnobitab/InstaFlow, whose ``code/pipeline_rf.py`` samples ``latents += v / N`` at timesteps
``(1 - i/N) 1000``): text-conditioned reflow of a text-to-image diffusion model on its own (noise, image, prompt)
triples, then one-step distillation.

- ``stage: reflow``: the 2-RF. ``model.source`` is the text-to-image teacher (SD 1.5, the embedded ``digits-t2i``:
  VP, epsilon or v-prediction) and the pairs are its guided ODE solutions for each prompt (``stepdistill make-pairs
  --prompts ... --guidance s``). The teacher's weights become a flow at the same timestep scale
  (:func:`~stepdistill.trainers.reflow.as_flow`: called at ``1000 sigma``, ~1000 noise, ~0 data), trained on the
  straight interpolations of the triples: the VP teacher's pairs define the coupling, reflow teaches its UNet the
  velocity ``z - x0`` of that coupling, as InstaFlow did for SD 1.5. The pairs carry the CFG the teacher used, so
  the 2-RF samples with guidance 1.
- ``stage: distill``: the one-step student. ``model.source`` is the 2-RF (its run folder or export), the pairs its
  own (``make-pairs --teacher RUN --prompts ...``, text encoders from the pipeline it started from), the student
  its copy trained at sigma = 1: ``z - u(z, 1) ~ x0`` with ``distance`` (InstaFlow: LPIPS on images; on latents
  use mse or pseudo_huber).

The loss and the rest are :class:`~stepdistill.trainers.reflow.ReflowObjective`'s; prompts come with the pairs.
SD 1.5-style UNets export as a stock ``StableDiffusionPipeline`` with stepdistill's
``FlowMatchEulerUniformScheduler`` (the stock flow schedulers lack what that pipeline calls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from .reflow import ReflowConfig, ReflowObjective
from .registry import register


@dataclass
class InstaFlowConfig(ReflowConfig):
    """``stage`` picks the times and steps: reflow (uniform times, ``student_steps`` default 4) or distill (the
    one-step grid, sigma = 1); an explicit ``t_dist`` / ``student_steps`` overrides."""

    stage: Literal["reflow", "distill"] = "reflow"
    t_dist: Literal["uniform", "u_shaped", "grid"] | None = None
    student_steps: int | None = None

    def validate(self):
        if self.t_dist is None:
            self.t_dist = "grid" if self.stage == "distill" else "uniform"
        if self.student_steps is None:
            self.student_steps = 1 if self.stage == "distill" else 4
        if self.stage == "distill" and self.t_dist != "grid":
            raise ConfigError("objective.stage=distill trains the student at its own Euler times: leave "
                              "objective.t_dist unset (or grid)")
        super().validate()


@register
class InstaFlowObjective(ReflowObjective):
    """Text-conditioned reflow (stage reflow: the 2-RF from the teacher's triples) and its one-step distillation
    (stage distill, from the 2-RF's triples)."""

    name = "instaflow"
    Config = InstaFlowConfig

    @classmethod
    def check_initial(cls, cfg, loaded) -> None:
        if cfg.stage == "distill" and loaded.denoiser.schedule.kind != "flow":
            raise ConfigError("instaflow stage distill distils the 2-RF: give its run folder (or export) as "
                              "model.source and its pairs as data.path; stage reflow makes it from the teacher")
