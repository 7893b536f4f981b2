"""Knowledge distillation by regression (Luhman & Luhman 2021): the student maps the teacher's noise to the
teacher's ODE solution from it, ``min E d(G(z), ODE_teacher(z))`` over pairs from ``stepdistill make-pairs`` —
DMD's regression loss alone, on the shared few-step generator
(:class:`~stepdistill.trainers.common.GeneratorObjective`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Phase
from .common import GeneratorConfig, GeneratorObjective
from .registry import register


@dataclass
class RegressionConfig(GeneratorConfig):
    """The generator's settings alone: steps and recipe, the distance (``regression_distance``, ``huber_c``,
    ``lpips_weights``), ``output_clamp``, ``generator_init`` and ``generator_lora_rank``."""


@register
class RegressionObjective(GeneratorObjective):
    """Regression on teacher pairs: one phase, ``generator``. The sharpest warm start for DMD/DMD2 on a small
    budget (the quickstart's stage 1)."""

    name = "regression"
    Config = RegressionConfig
    fake_score = None  # no critic: the generator is trained against teacher pairs alone

    @classmethod
    def phases(cls, config):
        return [Phase("generator", ("generator",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"generator": {"lr": 1e-4, "lr_schedule": "constant", "max_grad_norm": 10.0}}

    @classmethod
    def needs_pairs(cls, config) -> bool:
        return True

    def loss(self, phase, batch, step):
        cond = self._cond(batch, batch["batch_size"], self.device)
        dist = self.regression_loss(batch, cond)
        return dist, {"regression": dist.detach()}
