"""SCott (Liu et al. 2024, stochastic consistency distillation): consistency distillation whose teacher solver is
stochastic and multi-step — DDIM with noise strength ``solver_eta`` in ``solver_substeps`` sub-steps per target,
fresh noise in each (:meth:`~stepdistill.trainers.consistency.ConsistencyObjective.teacher_step`); with
``adv_weight`` > 0, SCott's optional adversarial term. Everything else is LCM's.
"""
from __future__ import annotations

from dataclasses import dataclass

from .consistency import ConsistencyConfig, ConsistencyObjective
from .registry import register


@dataclass
class SCottConfig(ConsistencyConfig):
    """SCott's defaults: the stochastic teacher solver (its exact noise strength and step count are the paper's
    to verify; methods.md 1.1 marks them so) — here DDIM with eta 0.5 in 2 sub-steps per target."""

    solver_eta: float = 0.5
    solver_substeps: int = 2


@register
class SCottObjective(ConsistencyObjective):
    """SCott: consistency distillation whose teacher solver is stochastic and multi-step (``solver_eta``,
    ``solver_substeps``)."""

    name = "scott"
    Config = SCottConfig
