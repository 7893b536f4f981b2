"""HiPA (Zhang & Hooi 2023, "HiPA: Enabling One-Step Text-to-Image Diffusion Models via High-Frequency-Promoted
Adaptation", ../shared/reference/methods.md 1.6): one-step low-rank adaptors on a frozen teacher.

The student is LoRA on the teacher's own (frozen, shared) weights — ``generator_lora_rank`` — sampling in one step
from pure noise (the shared few-step generator, :class:`~stepdistill.trainers.common.GeneratorObjective`, at
t = T-1), and its target is the multi-step teacher's output from the same noise: teacher (noise, image) pairs
from ``stepdistill make-pairs``. The adaptation loss is a spatial perceptual term plus high-frequency-promoted terms::

    L = w_spatial d(x, y) + w_freq |HP(|F x|) - HP(|F y|)|_1 + w_edge |S(x) - S(y)|_1

- ``d``: LPIPS when ``lpips_weights`` is given (images), else pseudo-Huber with ``c = huber_c`` (0.03) — the stated
  fallback (latent teachers such as SD 1.5 have no LPIPS on their latents);
- Fourier term (:func:`fourier_highpass_loss`): ``|F x|`` the magnitude of the orthonormal 2-D FFT of each channel,
  centred; ``HP`` keeps the frequencies of radius above ``freq_radius`` (cycles per pixel; the Nyquist edge is 0.5,
  default 0.25: the upper half of the band) and zeroes the rest; L1, averaged over the kept entries;
- edge term (:func:`edge_loss`): ``S`` the Sobel gradient magnitude ``sqrt(g_x^2 + g_y^2)`` of each channel
  (3x3 kernels ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` and its transpose, replicate padding); L1.

Weights: ``w_spatial = 1``, ``w_freq = 0.1``, ``w_edge = 0.1``, radius 0.25. These filters and weights are this
package's choices: the paper's exact values were not available (its code is unreleased and methods.md asks to verify
them in the PDF). HiPA trains 3.3M parameters on SD 1.5; ``configs/hipa_sd15.yaml``'s rank-16 LoRA on the attention
projections has 3.2M.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..lpips import lpips_distance
from .base import Phase
from .common import GeneratorConfig, GeneratorObjective, pseudo_huber, trainable_copy
from .registry import register

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------------ the math
def highpass_mask(height: int, width: int, radius: float, device=None) -> torch.Tensor:
    """``(H, W)`` bool: the centred frequencies (``fftshift(fftfreq)``, cycles per pixel) of radius ``> radius``."""
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, device=device))
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, device=device))
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > radius


def highpass_magnitude(x: torch.Tensor, radius: float = 0.25) -> torch.Tensor:
    """``HP(|F x|)``: the centred magnitude spectrum of each channel (orthonormal FFT over H, W), zero at radius
    ``<= radius``."""
    mag = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1)).abs()
    return mag * highpass_mask(x.shape[-2], x.shape[-1], radius, x.device)


def fourier_highpass_loss(x: torch.Tensor, y: torch.Tensor, radius: float = 0.25) -> torch.Tensor:
    """``mean_{kept} |HP(|F x|) - HP(|F y|)|``: L1 between the high-frequency magnitudes, averaged over the kept
    frequencies (of every sample and channel)."""
    mask = highpass_mask(x.shape[-2], x.shape[-1], radius, x.device)
    kept = int(mask.sum()) * x.shape[0] * x.shape[1]
    if kept == 0:
        raise ValueError(f"no frequency of a {x.shape[-2]}x{x.shape[-1]} image is above radius {radius}")
    return (highpass_magnitude(x, radius) - highpass_magnitude(y, radius)).abs().sum() / kept


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``sqrt(g_x^2 + g_y^2 + eps)`` per channel, ``g = Sobel * x`` with replicate padding (same size as ``x``)."""
    c = x.shape[1]
    kx = SOBEL_X.to(x.device).expand(c, 1, 3, 3)
    ky = SOBEL_X.t().to(x.device).expand(c, 1, 3, 3)
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx, groups=c), F.conv2d(padded, ky, groups=c)
    return (gx * gx + gy * gy + eps).sqrt()


def edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean |S(x) - S(y)|`` with ``S`` the Sobel gradient magnitude."""
    return (sobel_magnitude(x) - sobel_magnitude(y)).abs().mean()


# ------------------------------------------------------------------------------------------------ config
@dataclass
class HiPAConfig(GeneratorConfig):
    generator_lora_rank: int = 16  # low-rank adaptors on the frozen teacher (HiPA: 3.3M parameters on SD 1.5)
    lora_targets: list[str] | None = None  # the modules adapted (None: the backbone's usual, stepdistill.denoiser)
    spatial: Literal["auto", "lpips", "pseudo_huber", "mse"] = "auto"  # auto: lpips with lpips_weights, else Huber
    spatial_weight: float = 1.0
    freq_weight: float = 0.1
    edge_weight: float = 0.1
    freq_radius: float = 0.25  # cycles per pixel (Nyquist: 0.5)

    def validate(self):
        super().validate()
        if self.generator_lora_rank < 1:
            raise ConfigError("HiPA trains low-rank adaptors on the frozen teacher: objective.generator_lora_rank must "
                              "be >= 1 (a full student is method regression)")
        if self.student_steps != 1:
            raise ConfigError("HiPA adapts the teacher to one step: objective.student_steps must be 1")
        if not 0 <= self.freq_radius < 0.5 * 2 ** 0.5:
            raise ConfigError("objective.freq_radius is in cycles per pixel: 0 <= r < 0.707 (the spectrum's corner)")
        if min(self.spatial_weight, self.freq_weight, self.edge_weight) < 0:
            raise ConfigError("objective.spatial_weight, freq_weight and edge_weight must be >= 0")
        spatial = self.spatial if self.spatial != "auto" else ("lpips" if self.lpips_weights else "pseudo_huber")
        self.regression_distance = spatial  # the shared generator's distance (LPIPS network loading, its checks)


@register
class HiPAObjective(GeneratorObjective):
    """HiPA: one phase, ``generator`` (LoRA on the frozen teacher), against teacher pairs."""

    name = "hipa"
    Config = HiPAConfig
    fake_score = None

    def __init__(self, config: HiPAConfig, teacher, *args, **kwargs):
        super().__init__(config, teacher, *args, **kwargs)
        if config.lora_targets is not None:  # the shared generator's LoRA on the chosen modules instead
            try:
                self.generator = trainable_copy(teacher, config.generator_lora_rank, config.lora_targets)
            except ValueError as exc:
                raise ConfigError(f"objective.lora_targets: {exc}") from None

    @classmethod
    def phases(cls, config):
        return [Phase("generator", ("generator",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"generator": {"lr": 1e-4, "lr_schedule": "constant", "max_grad_norm": 1.0}}

    @classmethod
    def needs_pairs(cls, config) -> bool:
        return True

    def spatial_distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind = self.config.regression_distance
        if kind == "lpips":
            return lpips_distance(self.lpips_net, pred, target)
        if kind == "mse":
            return F.mse_loss(pred.float(), target.float())
        return pseudo_huber(pred, target, self.config.huber_c)

    def loss(self, phase, batch, step):
        cfg = self.config
        cond = self._cond(batch, batch["batch_size"], self.device)
        pred, target = self._generate(batch["noise"], cond), batch["image"]
        terms = {"spatial": self.spatial_distance(pred, target),
                 "freq": fourier_highpass_loss(pred, target, cfg.freq_radius), "edge": edge_loss(pred, target)}
        total = (cfg.spatial_weight * terms["spatial"] + cfg.freq_weight * terms["freq"]
                 + cfg.edge_weight * terms["edge"])
        return total, {k: v.detach() for k, v in terms.items()}
