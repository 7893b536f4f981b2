"""Decoupled DMD (Liu et al. 2025, "Decoupled DMD: CFG augmentation as the spear, distribution matching as the
shield"; the Z-Image-Turbo recipe). No training code is public; this follows the paper's Eq. 6 and Eq. 8.

The CFG'd DMD gradient splits into distribution matching ``DM = s_real^cond - s_fake^cond`` and CFG augmentation
``CA = (alpha - 1)(s_real^cond - s_real^uncond)`` (Eq. 6, alpha the standard CFG scale); d-DMD evaluates each at
its own re-noising timestep (Eq. 8), "Decoupled-Hybrid": tau_DM over the whole range, tau_CA only where the
generator's input is still noisier ("tau_CA > t" in the paper's time, where t = 0 is noise and t = 1 is data).

Time here is Diffusers' (t = T is noise): the paper's ``tau_CA > t`` is ``tau_CA < t_gen`` with ``t_gen`` the
noise level of the generator's input, and a 1-step student (input: pure noise, paper t = 0) leaves tau_CA
unconstrained. Scores enter as x0 predictions, ``s_a - s_b = alpha_t / sigma_t^2 (x0_a - x0_b)``, with DMD2's
per-sample normaliser instead of ``alpha_t / sigma_t^2``, signed as :func:`stepdistill.trainers.dmd.dmd_gradient`
(the generator moves along ``-grad``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import cfg as classifier_free_guidance
from .dmd import DMDConfig, DMDObjective, dmd_loss
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, as in the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dm_term(x0_real_cond: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Distribution matching (Eq. 6, first term) in x0 space, gradient sign: ``x0_fake - x0_real^cond``
    (= -(s_real^cond - s_fake^cond) sigma_t^2 / alpha_t)."""
    return _wide(x0_fake) - _wide(x0_real_cond)


def ca_term(x0_real_cond: torch.Tensor, x0_real_uncond: torch.Tensor, alpha: float) -> torch.Tensor:
    """CFG augmentation (Eq. 6, second term) in x0 space, gradient sign: ``-(alpha - 1)(x0^cond - x0^uncond)``
    (= -(alpha - 1)(s_real^cond - s_real^uncond) sigma_t^2 / alpha_t); zero at alpha = 1.

    With both terms at the same x_t: ``dm_term + ca_term = x0_fake - x0_real^cfg``, ``x0^cfg = uncond +
    alpha (cond - uncond)``: the numerator of the CFG'd DMD gradient (Eq. 5 = Eq. 6)."""
    return -(alpha - 1.0) * (_wide(x0_real_cond) - _wide(x0_real_uncond))


def normalize_per_sample(term: torch.Tensor, x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """``term / mean_{C,H,W}|x - x0_real|`` (DMD2's per-sample normaliser), NaNs zeroed, with the real x0 each term
    sees at its own timestep: DM uses ``x0_real^cond(tau_DM)``, so that it is exactly ``dmd_gradient(x,
    x0_real^cond, x0_fake)`` (DMD2 without guidance); CA uses ``x0_real^cfg(tau_CA)``, DMD2's own normaliser (with
    the conditional x0 instead, CA blows up where the generator's x is close to it: at the start, for instance)."""
    norm = (_wide(x) - _wide(x0_real)).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num(term / norm)


def paper_tau_to_diffusers(tau_lo: float, tau_hi: float) -> tuple[float, float]:
    """A re-noising range from the paper's time (t = 0 noise, t = 1 data) to fractions of T in Diffusers' time
    (t = T noise): ``[a, b] -> [1 - b, 1 - a]`` (exact for a flow-matching teacher, sigma = t / T)."""
    return 1.0 - tau_hi, 1.0 - tau_lo


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DecoupledDMDConfig(DMDConfig):
    """``real_guidance_scale`` is alpha (standard CFG); ``dm_weight`` and ``dm_t_min/max`` are the DM term's;
    ``ca_weight`` and ``ca_t_min/max`` (fractions of T, Diffusers' direction) the CA term's, further limited to
    below the generator's input noise level when ``ca_below_generator_t`` (Decoupled-Hybrid)."""

    real_guidance_scale: float = 2.0  # alpha: CA vanishes at 1
    ca_weight: float = 1.0
    ca_t_min: float = 0.02
    ca_t_max: float = 0.98
    ca_below_generator_t: bool = True  # False: tau_CA over [ca_t_min, ca_t_max] always (Decoupled-Full)

    def validate(self):
        super().validate()
        if not 0 <= self.ca_t_min < self.ca_t_max <= 1:
            raise ConfigError("objective.ca_t_min and ca_t_max must satisfy 0 <= ca_t_min < ca_t_max <= 1")
        if self.ca_weight < 0 or self.dm_weight < 0:
            raise ConfigError("objective.ca_weight and objective.dm_weight must be >= 0")


# ------------------------------------------------------------------------------------------------ objective
@register
class DecoupledDMDObjective(DMDObjective):
    """DMD2 whose distribution-matching term is d-DMD's (Eq. 8); the fake score, GAN and TTUR stay DMD2's."""

    name = "decoupled_dmd"
    Config = DecoupledDMDConfig

    def dm_weights(self) -> dict[str, float]:
        return {"dm": self.config.dm_weight, "ca": self.config.ca_weight}

    def generator_noise_level(self) -> float:
        """The Diffusers timestep of the generator's input for the sample being trained: T (pure noise) for its
        first step, ``timesteps[i]`` for a later step i of backward simulation (re-noised to that level)."""
        step = getattr(self, "generator_step", 0)
        return float(self.schedule.num_train_timesteps) if step == 0 else float(self.timesteps[step])

    def ca_timesteps(self, n: int, device) -> torch.Tensor:
        """tau_CA in [ca_t_min, ca_t_max] * T and, when ``ca_below_generator_t``, below the generator's input noise
        level t_gen: the paper's ``tau_CA > t`` in Diffusers' time. VP: integers; flow: sigma uniform, then the
        teacher's shift, as :meth:`dm_timesteps` samples."""
        cfg, big_t = self.config, self.schedule.num_train_timesteps
        t_gen = self.generator_noise_level() if cfg.ca_below_generator_t else float("inf")
        if self.schedule.kind == "flow":
            k, s_gen = self.schedule.shift, min(t_gen / big_t, 1.0)
            hi = min(cfg.ca_t_max, s_gen / (k - (k - 1) * s_gen))  # the unshifted sigma of t_gen
            lo = min(cfg.ca_t_min, hi)
            u = lo + (hi - lo) * torch.rand(n, device=device, dtype=torch.float64)
            return (self.schedule.shift_sigma(u) * big_t).float()
        hi = min(int(cfg.ca_t_max * big_t), int(self.schedule.t_max))
        if t_gen < float("inf"):
            hi = max(0, min(hi, int(t_gen) - 1))
        return torch.randint(min(int(cfg.ca_t_min * big_t), hi), hi + 1, (n,), device=device).float()

    def real_cond_uncond(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond):
        """The teacher's conditional and unconditional x0 in one batched pass (:meth:`Denoiser.cond_uncond`: the
        null condition of the teacher's own CFG)."""
        return self.teacher.cond_uncond(x_t, t, cond)

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        cfg = self.config
        n, xd = x.shape[0], x.detach()
        t_dm, t_ca = self.dm_timesteps(n, x.device), self.ca_timesteps(n, x.device)
        with torch.no_grad():
            x_dm = self.schedule.add_noise(xd, torch.randn_like(x), t_dm)
            x_ca = self.schedule.add_noise(xd, torch.randn_like(x), t_ca)
            x0_fake = self.fake_score(x_dm, t_dm, cond)
            x0_real = self.teacher(x_dm, t_dm, cond)
            grad_dm = normalize_per_sample(dm_term(x0_real, x0_fake), xd, x0_real)
            grad_ca = torch.zeros_like(grad_dm)
            if cfg.ca_weight > 0 and cfg.real_guidance_scale != 1:
                alpha = cfg.real_guidance_scale
                x0_cond, x0_uncond = self.real_cond_uncond(x_ca, t_ca, cond)
                x0_cfg = classifier_free_guidance(x0_cond, x0_uncond, alpha)  # uncond + alpha (cond - uncond)
                grad_ca = normalize_per_sample(ca_term(x0_cond, x0_uncond, alpha), xd, x0_cfg)
        return {"dm": dmd_loss(x, grad_dm), "ca": dmd_loss(x, grad_ca), "tau_ca": t_ca.mean()}
