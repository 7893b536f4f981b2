"""SNOOPI (Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", arXiv
2412.02687): SwiftBrush (:mod:`~stepdistill.trainers.swiftbrush`) with

- **PG-SB** (proper guidance): the CFG scale drawn once per iteration, ``kappa ~ U(guidance_range)``, and used by
  both the teacher and the LoRA teacher (Sec. 6.1: U(0.5, 4) for SD 1.5 / 2.1, U(0.5, 3) for PixArt-alpha);
- **NASA-T** (``negative_prompts``; Sec. 5.3): the teacher's CFG takes a negative prompt for its unconditional
  branch, ``(1 - kappa) eps(x, y-) + kappa eps(x, y)`` (Eq. 5), and the student sees the same negative through NASA
  in its cross-attention layers (:mod:`stepdistill.pipelines.nasa`) at a strength ``alpha ~ U(nasa_alpha_range)``
  drawn per iteration (U(0, 1)); the LoRA teacher takes no negative (the paper found that better).

The export is a stock pipeline, sampled without negatives; NASA-I (negative prompts at inference,
:func:`stepdistill.pipelines.apply_nasa`) is set on it by the user, and its model card shows the call with
``nasa_alpha`` (the paper's: 0.1 for SD 1.5, 0.2 for SD 2.1, 0.5 for PixArt-alpha). The official code is not in the
store: the settings come from the paper (../shared/reference/methods.md 1.3): LoRA rank 64 and scaling 128 (taken as
``lora_alpha`` 128), lr 1e-6 / 1e-3, AdamW, batch 64 (SD) or 32 (PixArt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones import unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..data import read_prompts
from ..denoiser import cfg
from ..models import prompt_encoder_for
from ..pipelines.nasa import cross_attention_layers, set_nasa
from .registry import register
from .swiftbrush import SwiftBrushConfig, SwiftBrushObjective


def draw_uniform(low: float, high: float, generator: torch.Generator | None = None) -> float:
    """One draw of ``U(low, high)`` from torch's generator (checkpointed with the run): PG-SB's ``kappa`` of an
    iteration, or NASA-T's ``alpha``."""
    return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))


def negative_guidance(pred_cond: torch.Tensor, pred_negative: torch.Tensor, kappa) -> torch.Tensor:
    """CFG with a negative prompt (SNOOPI Eq. 5): ``(1 - kappa) eps(x, y-) + kappa eps(x, y)`` — the standard form
    ``u + kappa (c - u)`` with the negative prompt's prediction as ``u``."""
    return cfg(pred_cond, pred_negative, kappa)


def _check_range(key: str, value, note: str) -> None:
    if len(value) != 2 or not 0 <= value[0] <= value[1]:
        raise ConfigError(f"{key} is [min, max] with 0 <= min <= max ({note}), not {list(value)}")


@dataclass
class SNOOPIConfig(SwiftBrushConfig):
    guidance_range: list[float] = field(default_factory=lambda: [0.5, 4.0])  # PG-SB: SD 1.5 / 2.1 (PixArt: 3)
    fake_score_lora_alpha: float | None = 128.0  # "rank 64, scaling 128"
    negative_prompts: list[str] = field(default_factory=list)  # NASA-T: negatives drawn per sample (none: PG-SB)
    negative_prompt_file: str | None = None  # more negatives, one per line (.txt) or .jsonl "prompt" fields
    nasa_alpha_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # NASA-T's alpha per iteration
    nasa_alpha: float = 0.1  # NASA-I's alpha in the model card's call (SD 1.5 0.1, SD 2.1 0.2, PixArt 0.5)

    def validate(self):
        super().validate()
        _check_range("objective.guidance_range", self.guidance_range, "SNOOPI: [0.5, 4.0] for SD 1.5 / 2.1, [0.5, "
                     "3.0] for PixArt-alpha")
        _check_range("objective.nasa_alpha_range", self.nasa_alpha_range, "SNOOPI: [0.0, 1.0]")
        if self.nasa_alpha < 0:
            raise ConfigError(f"objective.nasa_alpha must be >= 0, not {self.nasa_alpha}")
        if any(not p.strip() for p in self.negative_prompts):
            raise ConfigError("objective.negative_prompts holds an empty prompt; give the text to steer away from")


@register
class SNOOPIObjective(SwiftBrushObjective):
    """SNOOPI: SwiftBrush with PG-SB's drawn CFG scale and, with negative prompts, NASA-T."""

    name = "snoopi"
    Config = SNOOPIConfig
    negatives: Cond | None = None  # the encoded negative prompts (NASA-T), CPU
    nasa: tuple = ()  # the NASA processors on the student's cross-attention layers
    _negative: Cond | None = None  # this iteration's negatives (set by loss)
    last_guidance: float | None = None

    @classmethod
    def from_config(cls, run, data=None):
        objective = super().from_config(run, data)
        cfg_ = run.objective
        prompts = list(cfg_.negative_prompts)
        if cfg_.negative_prompt_file:
            prompts += [r.prompt for r in read_prompts(cfg_.negative_prompt_file, allow_empty=False)]
        if prompts:
            objective.set_negatives(prompts, run)
        return objective

    def set_negatives(self, prompts: list[str], run) -> None:
        """Encode the negative prompts with the teacher's own text encoders (cached under the run) and put NASA
        processors (inactive until :meth:`loss`) on the student's cross-attention layers."""
        backbone = unwrap(unwrap(self.generator).backbone)
        if not cross_attention_layers(backbone):
            raise ConfigError(f"objective.negative_prompts: NASA steers cross-attention layers, and this "
                              f"{type(backbone).__name__} has none (it is not text-conditioned through cross-attention)"
                              "; remove the negative prompts (PG-SB needs none)")
        encoder = prompt_encoder_for(run.model, run.data.resolution)
        if encoder is None:  # pragma: no cover - a cross-attention backbone comes with text encoders
            raise ConfigError(f"objective.negative_prompts: the teacher {run.model.source!r} has no text encoders")
        self.negatives = encoder.encode_cached(prompts, run.cache_dir)
        self.nasa = tuple(set_nasa(backbone))

    # --- PG-SB ---------------------------------------------------------------------------------------
    def guidance_scales(self, device) -> tuple[float, float]:
        """PG-SB: one ``kappa ~ U(guidance_range)`` for this iteration, the teacher's and the LoRA teacher's."""
        self.last_guidance = draw_uniform(*self.config.guidance_range)
        return self.last_guidance, self.last_guidance

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        logs = super().distribution_matching(x, cond)
        logs["guidance_scale"] = torch.tensor(self.last_guidance, device=x.device)
        return logs

    # --- NASA-T --------------------------------------------------------------------------------------
    def loss(self, phase, batch, step):
        """SwiftBrush's loss; with negative prompts, each sample draws one and the iteration an ``alpha``, which the
        student's NASA layers and the teacher's CFG (:meth:`real_score_x0`) use during this call only."""
        if self.negatives is None:
            return super().loss(phase, batch, step)
        n = batch["batch_size"]
        negative = self.negatives[torch.randint(0, self.negatives.batch_size, (n,))].to(self.device)
        alpha = draw_uniform(*self.config.nasa_alpha_range)
        self._set_nasa(negative, alpha)
        try:
            total, logs = super().loss(phase, batch, step)
        finally:
            self._set_nasa(None, 0.0)
        logs["nasa_alpha"] = torch.tensor(alpha, device=total.device)
        return total, logs

    def _set_nasa(self, negative: Cond | None, alpha: float) -> None:
        self._negative = negative
        for proc in self.nasa:
            proc.negative = None if negative is None else negative.encoder_hidden_states
            proc.negative_mask = None if negative is None else negative.encoder_attention_mask
            proc.alpha = alpha

    def real_score_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None) -> torch.Tensor:
        """SwiftBrush's real score; under NASA-T the negative prompt is CFG's unconditional branch (Eq. 5)."""
        if self._negative is None:
            return super().real_score_x0(x_t, t, cond, guidance_scale)
        scale = self.config.real_guidance_scale if guidance_scale is None else guidance_scale
        with self.frozen_base() as base:
            pos, neg = base.cond_uncond(x_t, t, cond, self._negative, output="sample")
        return negative_guidance(pos, neg, scale)

    # --- export --------------------------------------------------------------------------------------
    def export_spec(self):
        spec = super().export_spec()
        if cross_attention_layers(unwrap(unwrap(self.generator).backbone)):
            section = nasa_card(self.config.nasa_alpha, spec.recipe.num_inference_steps)
            spec.meta = {**spec.meta, "card_sections": {"Negative prompts (NASA)": section}}
        return spec


def nasa_card(alpha: float, steps: int = 1) -> str:
    """The model card's section on NASA-I for a SNOOPI student."""
    return "\n".join([
        "One-step students cannot use a negative prompt through CFG; NASA (Negative-Away Steer Attention, SNOOPI "
        "Sec. 5.2) applies it inside the cross-attention layers instead, `Z+ - alpha Z-`. It is a Diffusers attention "
        "processor set on this stock pipeline (the weights load with plain Diffusers; the processor needs "
        "`pip install stepdistill`):", "", "```python", "from stepdistill.pipelines import apply_nasa, remove_nasa",
        "", f"apply_nasa(pipe, 'blurry, low quality', alpha={alpha!r})  # pipe: as loaded above",
        f"images = pipe('a photo of a cat', num_inference_steps={steps}, guidance_scale=1.0).images",
        "remove_nasa(pipe)  # plain attention again", "```"])
