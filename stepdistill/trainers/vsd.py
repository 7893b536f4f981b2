"""Variational score distillation (VSD; Wang et al. 2023, "ProlificDreamer", Eq. 9) as the loss of a one-step 2-D
generator; its image-free text-to-image form SwiftBrush (``swiftbrush.py``) and SNOOPI (``snoopi.py``) subclass it.

VSD is DMD-shaped, so it is DMD's objective (:class:`~stepdistill.trainers.dmd.DMDObjective`: the generator, its
export, the two phases) with its own distribution-matching term built on DMD's real-score hook
(:meth:`~stepdistill.trainers.dmd.DMDObjective.real_score_x0`):

- the generator's sample ``x`` is noised at ``t ~ U{0.02 T .. 0.98 T}`` (``dm_t_min``/``dm_t_max``; ProlificDreamer's
  ``--t_range 0.02 0.98``, SwiftBrush's ``randint(20, 981)``);
- ``eps_teacher``: the real score, the frozen teacher with CFG ``u + s (c - u)`` (the hook's x0, converted to eps on
  the teacher's own schedule); ``eps_phi``: the score of the generator's distribution, a LoRA on the frozen
  teacher (its weights shared, not copied), trained with the denoising loss on the generator's samples (phase
  ``critic``);
- the generator's gradient is ``w(t) (eps_teacher - eps_phi)`` with ``w(t) = 1 - abar_t = sigma_t^2``
  (:func:`vsd_gradient`), applied SpecifyGradient-style (:func:`score_distillation_loss`).

The LoRA's parameterization (``fake_score_prediction``): ``teacher`` (default) — the teacher's own, so that the LoRA
starts as exactly the teacher (zero-initialised adapters) and nothing is ill-conditioned where the teacher is not
(a zero-terminal-SNR teacher, such as the shipped digits teachers, has no x0 from eps at t = T-1; its v is fine);
``v_prediction`` — ProlificDreamer's choice (``--v_pred``: the LoRA predicts v, converted ``eps = alpha v + sigma
x_t``), which on an eps teacher (SD 2.1-base) starts the LoRA from the base's eps read as v; ``epsilon``.
Reference implementation: thu-ml/prolificdreamer ``nerf/sd.py`` (../shared/reference/methods.md 1.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from .common import denoising_loss, trainable_copy
from .dmd import DMDConfig, DMDObjective
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def vsd_weight(schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ProlificDreamer's ``w(t) = 1 - abar_t`` (``sigma_t^2`` of ``x_t = alpha_t x0 + sigma_t eps``; SwiftBrush's
    ``sigma_t^2``) from the teacher's own schedule, shaped ``(B, 1, ..., 1)`` like ``like``, float32."""
    _, sigma = schedule.coefficients(t, like.float())
    return sigma * sigma


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The VSD gradient of the generator's sample (ProlificDreamer Eq. 9; SwiftBrush Eq. 6):

    ``grad = w(t) (eps_teacher(x_t, t, y) - eps_phi(x_t, t, y))``, ``w(t) = 1 - abar_t = sigma_t^2``
    (:func:`vsd_weight`); float32, NaNs zeroed (both references ``nan_to_num`` it)."""
    return torch.nan_to_num(weight.float() * (eps_real.float() - eps_fake.float()))


class _SpecifyGradient(torch.autograd.Function):
    """A scalar whose backward hands ``x`` exactly ``grad / norm`` (times the incoming gradient)."""

    @staticmethod
    def forward(ctx, x, grad, norm):
        ctx.save_for_backward(grad)
        ctx.norm, ctx.dtype = norm, x.dtype
        return 0.5 * grad.float().pow(2).sum() / norm

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return (upstream * grad / ctx.norm).to(ctx.dtype), None, None


def score_distillation_loss(x: torch.Tensor, grad: torch.Tensor, reduction: str = "batch") -> torch.Tensor:
    """A loss whose gradient with respect to ``x`` is exactly ``grad / N`` (ProlificDreamer's ``SpecifyGradient``):

    - ``batch``: ``N`` = the batch size, as ProlificDreamer (``gt_grad / batch_size``);
    - ``mean``: ``N`` = ``x.numel()``, the gradient of SwiftBrush's ``0.5 * mse(x, sg(x - grad))``.

    Its value, ``0.5 ||grad||^2 / N``, is what that mse reads (up to rounding), a scale of the gradient to log."""
    if reduction not in ("batch", "mean"):
        raise ValueError(f"reduction must be 'batch' or 'mean', not {reduction!r}")
    norm = float(x.shape[0] if reduction == "batch" else x.numel())
    return _SpecifyGradient.apply(x, grad.detach().float(), norm)


def lora_teacher_loss(eps_pred: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """SwiftBrush's loss of the LoRA teacher (``train_swiftbrush.py``): ``mse(alpha_t eps_lora, alpha_t eps)``, i.e.
    ``mean(alpha_t^2 (eps_lora - eps)^2)`` — the denoising loss weighted by the signal level ``abar_t``."""
    return torch.mean((alpha.float() * eps_pred.float() - alpha.float() * noise.float()) ** 2)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class VSDConfig(DMDConfig):
    """The generator's settings (DMD's: steps, recipe, conditioning timestep, warm start) plus VSD's: the teacher's
    CFG, the LoRA teacher (rank, alpha, target modules, parameterization, loss, CFG and condition dropout) and how the
    gradient is reduced. DMD's regression and GAN terms are not part of VSD (errors if set)."""

    real_guidance_scale: float = 7.5  # ProlificDreamer's VSD CFG (paper; its --scale 100 is for SDS)
    fake_guidance_scale: float | None = 1.0  # the LoRA teacher's CFG (ProlificDreamer: none); None: the real's
    fake_score_lora_rank: int = 4  # ProlificDreamer's LoRA: diffusers' LoRAAttnProcessor, default rank 4
    fake_score_lora_alpha: float | None = None  # None: = rank (peft scaling 1)
    lora_targets: list[str] | None = None  # the LoRA teacher's modules; None: stepdistill.denoiser's defaults
    fake_score_prediction: Literal["teacher", "epsilon", "v_prediction"] = "teacher"
    # the LoRA teacher's loss: the denoising loss in its parameterization (ProlificDreamer), or SwiftBrush's
    # mse(alpha_t eps_lora, alpha_t eps) (lora_teacher_loss)
    fake_score_loss: Literal["denoising", "alpha_eps"] = "denoising"
    loss_reduction: Literal["batch", "mean"] = "batch"  # score_distillation_loss: ProlificDreamer's grad / batch

    def validate(self):
        super().validate()
        if self.regression_weight > 0 or self.gan_weight_gen > 0 or self.gan_weight_disc > 0:
            raise ConfigError("variational score distillation has no regression or GAN term: set "
                              "objective.regression_weight, gan_weight_gen and gan_weight_disc to 0 (methods dmd and "
                              "dmd2 have them)")
        if self.fake_score_lora_rank < 0:
            raise ConfigError("objective.fake_score_lora_rank must be >= 0 (0: a full copy of the teacher)")
        if self.lora_targets is not None and not self.fake_score_lora_rank:
            raise ConfigError("objective.lora_targets are the LoRA teacher's modules: set "
                              "objective.fake_score_lora_rank")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"objective.label_dropout must be in [0, 1), not {self.label_dropout}")


# ------------------------------------------------------------------------------------------------ objective
@register
class VSDObjective(DMDObjective):
    """VSD on the one loop. Phases: ``generator`` (the VSD gradient) and ``critic`` (the LoRA teacher's denoising
    loss on the generator's samples), both every step as ProlificDreamer and SwiftBrush alternate them."""

    name = "vsd"
    Config = VSDConfig

    def __init__(self, config: VSDConfig, teacher: Denoiser, *args, **kwargs):
        if teacher.schedule.kind != "vp":
            raise ConfigError("variational score distillation weights by w(t) = 1 - abar_t and compares eps "
                              "predictions: it needs a VP (DDPM-type) teacher, not a flow-matching one; use dmd2")
        super().__init__(config, teacher, *args, **kwargs)

    @classmethod
    def optim_defaults(cls, config):
        # the generator: SwiftBrush's student lr (its 2-D VSD); the LoRA: ProlificDreamer's --unet_lr 1e-4
        return {"generator": {"lr": 1e-6, "every": 1, "max_grad_norm": 1.0, "lr_schedule": "constant"},
                "critic": {"lr": 1e-4, "max_grad_norm": 1.0, "lr_schedule": "constant"}}

    def make_fake_score(self, teacher: Denoiser) -> Denoiser:
        cfg = self.config
        try:
            fake = trainable_copy(teacher, cfg.fake_score_lora_rank, cfg.lora_targets, cfg.fake_score_lora_alpha)
        except ValueError as exc:
            raise ConfigError(f"objective.lora_targets: {exc}") from None
        if cfg.fake_score_prediction != "teacher":
            fake.prediction_type = cfg.fake_score_prediction
        return fake

    # --- the generator's term ------------------------------------------------------------------------
    def dm_weights(self) -> dict[str, float]:
        return {"vsd": self.config.dm_weight}

    def guidance_scales(self, device) -> tuple[float, float]:
        """The CFG scales of this iteration: (the teacher's, the LoRA teacher's)."""
        real = self.config.real_guidance_scale
        fake = self.config.fake_guidance_scale
        return real, real if fake is None else fake

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        """``{"vsd": loss}`` for the generator's samples ``x``: :func:`score_distillation_loss` of
        :func:`vsd_gradient` of the real score (:meth:`real_score_x0`, as eps) and the LoRA teacher at the same
        ``x_t``, each with its CFG scale (:meth:`guidance_scales`)."""
        t = self.dm_timesteps(x.shape[0], x.device)
        real_s, fake_s = self.guidance_scales(x.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t)
            x0_real = self.real_score_x0(x_t, t, cond, guidance_scale=real_s)
            eps_real = self.schedule.convert(x0_real, x_t.float(), t, "sample", "epsilon")
            eps_fake = self.fake_score(x_t, t, cond, output="epsilon", guidance_scale=fake_s)
            grad = vsd_gradient(eps_real, eps_fake, vsd_weight(self.schedule, t, x))
        return {"vsd": score_distillation_loss(x, grad, self.config.loss_reduction)}

    # --- the LoRA teacher ----------------------------------------------------------------------------
    def _critic_loss(self, batch, cond, shape, device):
        """The LoRA teacher's loss on the generator's samples (no grad into the generator): ``t ~ U{0..T-1}``,
        condition dropout ``label_dropout`` (class labels to the null class, prompts to the empty prompt; needed
        for its CFG), then :func:`~stepdistill.trainers.common.denoising_loss` in its parameterization or
        :func:`lora_teacher_loss` (``fake_score_loss``)."""
        cfg = self.config
        with torch.no_grad():
            x = self._generate(torch.randn(shape, device=device), cond, grad=False)
        if cfg.label_dropout > 0:
            drop = torch.rand(shape[0], device=device) < cfg.label_dropout
            cond = cond.dropped(drop, self.null_cond, null_class=self.teacher.null_class)
        t = self.schedule.sample_t(shape[0], "uniform", device=device)
        noise = torch.randn_like(x)
        x_t = self.schedule.add_noise(x, noise, t)
        if cfg.fake_score_loss == "alpha_eps":
            eps = self.fake_score(x_t, t, cond, output="epsilon")
            loss = lora_teacher_loss(eps, noise, self.schedule.coefficients(t, x)[0])
        else:
            ptype = self.fake_prediction_type
            pred = self.fake_score(x_t, t, cond, output=ptype)
            loss = denoising_loss(pred, x, noise, x_t, t, self.schedule, ptype)
        return loss, {"fake_score": loss.detach()}

    @property
    def fake_prediction_type(self) -> str:
        cfg_type = self.config.fake_score_prediction
        return self.teacher.prediction_type if cfg_type == "teacher" else cfg_type
