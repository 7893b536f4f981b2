"""Diversity-rewarded CFG distillation (Cideron et al. 2024, "Diversity-Rewarded CFG Distillation"): guidance
distillation (:mod:`~stepdistill.trainers.guidance`) plus a reward for diversity among the student's samples of one
condition, and weight interpolation between a quality-focused and a diversity-focused student at load time.

Objective: ``L = L_guidance - lambda R_div`` with ``lambda = diversity_weight`` and, per step, ``groups`` conditions
each sampled ``group_size`` times (independent noise, the same guidance scale ``s ~ U[guidance_range]`` per group)::

    R_div = mean_groups mean_{i < j} (1 - cos(phi(x_i), phi(x_j)))                     (:func:`diversity_reward`)

- ``x_i``: the student's one-step x0 prediction from pure noise at the last training timestep (differentiable: the
  reward's gradient reaches the student directly; the paper, on discrete audio tokens, uses REINFORCE instead);
- ``phi``: the **frozen teacher's own bottleneck features** (its mid block, averaged over positions) of ``x_i`` at
  timestep ``feature_timestep`` (0: a clean image), under the same condition — a feature network for any teacher
  (pixels or latents, class labels or prompts). The shipped digits feature CNN (``stepdistill.metrics``) is not used:
  trainers may not import the evaluation layer, and an evaluation network should not also be the training reward.

Identical samples give ``R = 0``, mutually orthogonal features ``R = 1``.

Interpolation (the paper's model merging): train a quality student (``diversity_weight: 0``, or method ``guidance``)
and a diversity student of the same teacher, export both, then load ``(1 - w) theta_quality + w theta_diversity`` in one
line: ``pipe = stepdistill.pipelines.load_interpolated(QUALITY_EXPORT, DIVERSITY_EXPORT, w)``
(:func:`stepdistill.pipelines.weights.interpolate_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..conditioning import Cond
from ..config import ConfigError
from .guidance import GuidanceConfig, GuidanceDistillObjective, draw_scales
from .registry import register


def diversity_reward(features: torch.Tensor, group_size: int) -> torch.Tensor:
    """``mean_groups mean_{i<j} (1 - cos(f_i, f_j))`` over ``features`` ``(G * m, D)``, groups of ``m = group_size``
    consecutive rows (the samples of one condition)."""
    if group_size < 2 or features.shape[0] % group_size:
        raise ValueError(f"{features.shape[0]} samples do not make groups of {group_size} >= 2")
    f = F.normalize(features.float().flatten(1), dim=-1).view(-1, group_size, features[0].numel())
    cos = f @ f.transpose(1, 2)  # (G, m, m)
    iu = torch.triu_indices(group_size, group_size, offset=1, device=features.device)
    return (1.0 - cos[:, iu[0], iu[1]]).mean()


@dataclass
class DiversityGuidanceConfig(GuidanceConfig):
    diversity_weight: float = 0.1  # lambda (0: the quality student)
    groups: int = 4  # conditions per step
    group_size: int = 4  # samples per condition (>= 2)
    feature_timestep: int = 0  # the teacher's features of x0 are taken at this timestep

    def validate(self):
        super().validate()
        if self.diversity_weight < 0 or self.groups < 1 or self.group_size < 2 or self.feature_timestep < 0:
            raise ConfigError("objective.diversity_weight must be >= 0, groups >= 1, group_size >= 2 and "
                              "feature_timestep >= 0")


@register
class DiversityGuidanceObjective(GuidanceDistillObjective):
    """Guidance distillation with the diversity reward on the student's one-step samples."""

    name = "diversity_guidance"
    Config = DiversityGuidanceConfig

    def group_cond(self, batch, device) -> Cond:
        """``groups`` conditions, each repeated ``group_size`` times (consecutive rows)."""
        cfg = self.config
        cond = self._batch_cond(batch)
        if cond.class_labels is not None or cond.encoder_hidden_states is not None:
            rows = torch.arange(cfg.groups, device=device) % cond.batch_size
            base = cond[rows]
        else:
            base = self._sample_cond(cfg.groups, device)
        return base.repeat(cfg.group_size)

    def diversity_term(self, batch) -> torch.Tensor:
        cfg = self.config
        device = self.device
        cond = self.group_cond(batch, device)
        n = cfg.groups * cfg.group_size
        scale = draw_scales(cfg.groups, cfg.guidance_range, device).repeat_interleave(cfg.group_size)
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, device=device)
        t_top = torch.full((n,), self.schedule.t_max, device=device)
        x0 = self.student(noise, t_top, replace(cond, guidance=scale))
        t_feat = torch.full((n,), float(cfg.feature_timestep), device=device)
        plain = replace(cond, guidance=None)
        _, feats = self.teacher(x0, t_feat, plain, return_features=True)
        feats = feats.float().mean(dim=tuple(range(2, feats.ndim))) if feats.ndim == 4 else feats.float().mean(1)
        return diversity_reward(feats, cfg.group_size)

    def loss(self, phase, batch, step):
        terms = self.guidance_terms(batch)
        total = terms["guidance"]
        if self.config.diversity_weight > 0:
            terms["diversity"] = self.diversity_term(batch)
            total = total - self.config.diversity_weight * terms["diversity"]
        return total, {k: v.detach() for k, v in terms.items()}
