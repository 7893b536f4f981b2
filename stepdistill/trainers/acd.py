"""Adversarial consistency distillation (the SAR-to-optical translation paper, 2024): consistency distillation of an
image-to-image teacher (the source image concatenated on channels) plus a conditional PatchGAN
(:class:`~stepdistill.trainers.common.PatchDiscriminator`, a second phase) on the student's outputs against the
real images, "to ensure image clarity and minimize color shifts" — LCM's objective with ``adv_weight`` > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from .consistency import ConsistencyConfig, ConsistencyObjective
from .registry import register


@dataclass
class ACDConfig(ConsistencyConfig):
    """Adversarial consistency distillation's defaults: consistency distillation plus the adversarial term; the
    paper (SAR-to-optical translation) does not state its weight in the abstract, so 0.1 is ours, not tuned."""

    adv_weight: float = 0.1


@register
class ACDObjective(ConsistencyObjective):
    """Adversarial consistency distillation: consistency distillation with the adversarial term switched on."""

    name = "acd"
    Config = ACDConfig

    def __init__(self, config: ConsistencyConfig, *args, **kwargs):
        if config.adv_weight <= 0:
            raise ConfigError("method acd is consistency distillation with an adversarial term: set "
                              "objective.adv_weight > 0 (or use method lcm)")
        super().__init__(config, *args, **kwargs)
