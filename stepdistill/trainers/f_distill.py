"""f-distill (Xu, Nie & Vahdat 2025, "One-step diffusion models with f-divergence distribution matching").

DMD2 whose distribution-matching gradient is weighted per sample by ``h(r)``, a function of the density ratio
``r = p_teacher / q_student`` fixed by the chosen f-divergence; ``r`` is read off the GAN discriminator's logit
(its optimum is ``log p_real / p_fake``). Reverse-KL (``h = 1``) is DMD2. Reference implementation:
NVlabs/FastGen ``fastgen/methods/distribution_matching/f_distill.py`` (see ../shared/reference/methods.md 1.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..conditioning import Cond
from ..config import ConfigError
from .dmd import DMDConfig, DMDObjective, dmd_gradient, dmd_loss
from .registry import register

Divergence = Literal["rkl", "kl", "js", "sh", "jf", "sf", "neyman"]

# h(r) = r^2 f''(r) (up to a constant, removed by the normalisation) for D_f(p || q) = E_q f(p/q):
WEIGHTINGS = {
    "rkl": lambda r: torch.ones_like(r),  # reverse KL, f = -log r: DMD / VSD
    "kl": lambda r: r,  # forward KL, f = r log r
    "js": lambda r: 1 - 1 / (1 + r),  # Jensen-Shannon, f = r log r - (1 + r) log((1 + r) / 2)
    "sh": lambda r: r.sqrt(),  # squared Hellinger, f = (sqrt(r) - 1)^2
    "jf": lambda r: 1 + r,  # Jeffreys (KL + reverse KL), f = (r - 1) log r
    "sf": lambda r: 1 / (1 + r),  # softened reverse KL, f = (1 + r) log((1 + r) / (2 r))
    "neyman": lambda r: 1 / r,  # Neyman chi^2, f = (1 - r)^2 / r
}


# ------------------------------------------------------------------------------------------------ the math
def density_ratio(logits: torch.Tensor, lower: float = 0.1, upper: float = 20.0) -> torch.Tensor:
    """``r = clip(exp(clamp(D(x_t), -10, 10)), lower, upper)`` per sample, detached, float32.

    A discriminator trained with ``softplus(D(fake)) + softplus(-D(real))`` has the optimum
    ``D = log p_real(x_t) / p_fake(x_t)``, so ``exp(D)`` estimates the ratio (f-distill Sec. 4; FastGen's
    ``_get_f_div_weighting_h``: logits clamped to [-10, 10], ratio clipped to [ratio_lower, ratio_upper])."""
    return torch.exp(logits.detach().float().clamp(-10.0, 10.0)).clamp(lower, upper)


def ratio_bin_normalize(r: torch.Tensor, t: torch.Tensor, bins: int, t_lo: float, t_hi: float) -> torch.Tensor:
    """Optional first stage of the normalisation: ``r / mean(r over the batch's samples in the same t-bin)``,
    with ``bins`` equal bins of [t_lo, t_hi] (FastGen's per-t-bin ratio normalisation at EMA rate 0)."""
    width = (t_hi - t_lo) / bins
    idx = ((t.double() - t_lo) / width).floor().long().clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).to(r.dtype)
    total = torch.bincount(idx, weights=r, minlength=bins).to(r.dtype)
    return r / (total / count.clamp_min(1))[idx]


def f_weight(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """The f-divergence weighting ``h(r) = r^2 f''(r)`` of the score difference (the paper's gradient of
    D_f, its table of divergences), normalised over the batch: ``h <- h / mean(h)`` (FastGen; all-reduced
    there, this batch here). ``r`` in [0.1, 20] keeps every h positive."""
    h = WEIGHTINGS[divergence](r.float())
    return h / h.mean().clamp_min(1e-12)


def f_distill_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h * (x0_fake - x0_real) / mean_{C,H,W}|x - x0_real|``: DMD2's per-sample normalised gradient
    (:func:`dmd_gradient`) scaled by the per-sample weight ``h`` (FastGen's VSD loss with ``additional_scale=h``).
    ``h = 1`` (reverse KL) is exactly DMD2's gradient."""
    grad = dmd_gradient(x, x0_real, x0_fake)
    return h.reshape(-1, *([1] * (grad.ndim - 1))).to(grad.dtype) * grad


# ------------------------------------------------------------------------------------------------ config
@dataclass
class FDistillConfig(DMDConfig):
    divergence: Divergence = "js"  # FastGen default; its CIFAR config uses kl
    ratio_lower: float = 0.1  # r clipped to [ratio_lower, ratio_upper] (FastGen 0.1, 20)
    ratio_upper: float = 20.0
    ratio_bins: int = 0  # > 0: normalise r per bin of [0, T] first (FastGen's optional ratio_normalization, 10 bins)
    gan_weight_gen: float = 3e-3  # required: the discriminator gives r (DMD2 ImageNet weights)
    gan_weight_disc: float = 1e-2

    def validate(self):
        super().validate()
        if self.gan_weight_gen <= 0 or self.gan_weight_disc <= 0:
            raise ConfigError("f_distill reads the density ratio off the GAN discriminator: set "
                              "objective.gan_weight_gen and objective.gan_weight_disc > 0")
        if not 0 < self.ratio_lower < self.ratio_upper:
            raise ConfigError("objective.ratio_lower and ratio_upper must satisfy 0 < ratio_lower < ratio_upper")
        if self.ratio_bins < 0:
            raise ConfigError(f"objective.ratio_bins must be >= 0, not {self.ratio_bins}")


# ------------------------------------------------------------------------------------------------ objective
@register
class FDistillObjective(DMDObjective):
    """DMD2 with the f-divergence weighting; everything but :meth:`distribution_matching` is DMD2's."""

    name = "f_distill"
    Config = FDistillConfig

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        cfg = self.config
        t = self.dm_timesteps(x.shape[0], x.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t)
            # one pass of the fake score: its x0 and the bottleneck features the GAN head reads
            x0_fake, feats = self.fake_score(x_t, t, cond, return_features=True)
            r = density_ratio(self.disc_head(feats), cfg.ratio_lower, cfg.ratio_upper)
            if cfg.ratio_bins:
                r = ratio_bin_normalize(r, t, cfg.ratio_bins, 0.0, float(self.schedule.num_train_timesteps))
            h = f_weight(r, cfg.divergence)
            x0_real = self.real_score_x0(x_t, t, cond)
            grad = f_distill_gradient(x.detach(), x0_real, x0_fake, h)
        return {"dm": dmd_loss(x, grad), "ratio": r.mean(), "h_min": h.min(), "h_max": h.max()}
