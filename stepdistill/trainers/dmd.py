"""Distribution matching distillation: DMD (Yin et al. 2024) and DMD2 (Yin et al. 2024b).

The math is in module-level functions; ``DMDObjective`` binds them to a generator (the student; its steps, rollout,
regression loss and export are the shared :class:`~stepdistill.trainers.common.GeneratorObjective`'s), a frozen
teacher (the real score, :meth:`DMDObjective.real_score_x0`), a fake score trained on the generator's samples and,
for DMD2, a discriminator head on the fake score's bottleneck.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from .base import Phase
from .common import (DiscriminatorHead, GeneratorConfig, GeneratorObjective, denoising_loss, gan_discriminator_loss,
                     gan_generator_loss, trainable_copy)
from .common import pseudo_huber  # noqa: F401  (re-exported: DMD's regression distance, where it used to live)
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The distribution-matching gradient of DMD (Eq. 7) with DMD2's per-sample normaliser:

    ``grad = (p_real - p_fake) / mean_{C,H,W} |p_real|`` with ``p_real = x - x0_real``, ``p_fake = x - x0_fake``,
    i.e. ``(x0_fake - x0_real) / mean|x - x0_real|`` (s_fake - s_real, scaled per sample). Float32, NaNs zeroed.
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    p_real, p_fake = x - x0_real, x - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True) + eps
    return torch.nan_to_num((p_real - p_fake) / norm)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mse(x, sg(x - grad))``: its gradient with respect to x is ``grad / x.numel()`` (DMD2 code)."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DMDConfig(GeneratorConfig):
    """The generator's settings (:class:`~stepdistill.trainers.common.GeneratorConfig`) plus the real score's
    guidance, the distribution-matching timesteps and weight, the regression and GAN weights and the fake score's."""

    real_guidance_scale: float = 1.0  # teacher CFG, standard form (DMD2: SD1.5 1.75, SDXL 8)
    dm_t_min: float = 0.02  # DM timesteps ~ U[t_min, t_max] * T (DMD2: 0.02, 0.98)
    dm_t_max: float = 0.98
    dm_weight: float = 1.0
    regression_weight: float = 0.0  # DMD: weight of the regression loss on teacher (noise, image) pairs
    gan_weight_gen: float = 0.0  # DMD2: generator GAN weight (SDXL 5e-3, SD1.5 1e-3, ImageNet 3e-3)
    gan_weight_disc: float = 0.0  # DMD2: discriminator (classifier) weight 1e-2
    gan_t_max: float = 1.0  # diffusion GAN: real and fake images noised at t ~ U[0, gan_t_max * T]
    label_dropout: float = 0.0  # the fake score's own CFG dropout (DMD2 trains it conditionally)
    # LoRA fake score on the frozen teacher's own weights: 0 = full copy. The discriminator head sits on the fake
    # score, so fake_score_lora_rank also makes the discriminator LoRA.
    fake_score_lora_rank: int = 0

    def validate(self):
        super().validate()
        if self.fake_score_lora_rank < 0:
            raise ConfigError("objective.fake_score_lora_rank must be >= 0 (0: full copy)")
        if not 0 <= self.dm_t_min < self.dm_t_max <= 1:
            raise ConfigError("objective.dm_t_min and dm_t_max must satisfy 0 <= dm_t_min < dm_t_max <= 1")
        if (self.gan_weight_gen > 0) != (self.gan_weight_disc > 0):
            raise ConfigError("set both objective.gan_weight_gen and objective.gan_weight_disc (or neither)")


# ------------------------------------------------------------------------------------------------ objective
@register
class DMDObjective(GeneratorObjective):
    """DMD / DMD2 on the one loop. Phases: ``generator`` (every ``optim.generator.every`` steps: the two
    time-scale update rule) and ``critic`` (fake score and discriminator head, every step)."""

    name = "dmd2"
    Config = DMDConfig

    def __init__(self, config: DMDConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        super().__init__(config, teacher, teacher_scheduler, num_classes, resolution, channels)
        self.fake_score = self.make_fake_score(teacher)
        self.disc_head = None
        if config.gan_weight_disc > 0:
            feats = self._features(self.fake_score, torch.zeros(1, channels, resolution, resolution),
                                   torch.tensor([500.0]), self._random_cond(1, torch.device("cpu")))
            self.disc_head = DiscriminatorHead(feats.shape[-1] if feats.ndim == 3 else feats.shape[1],
                                               tokens=feats.ndim == 3)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def phases(cls, config):
        critic = ("fake_score",) + (("disc_head",) if config.gan_weight_disc > 0 else ())
        return [Phase("generator", ("generator",)), Phase("critic", critic)]

    @classmethod
    def optim_defaults(cls, config):
        # DMD2: AdamW (0.9, 0.999), generator every 5th step, grad clip 10
        return {"generator": {"lr": 2e-6, "every": 5, "max_grad_norm": 10.0, "lr_schedule": "constant"},
                "critic": {"lr": 2e-6, "max_grad_norm": 10.0, "lr_schedule": "constant"}}

    @classmethod
    def check_data(cls, config, has_images: bool) -> None:
        if config.gan_weight_disc > 0 and not has_images:
            raise ConfigError("the GAN term (objective.gan_weight_*) needs real images: set data.dataset to "
                              "digits or folder (or prompts from a .jsonl naming an image per prompt), or set the "
                              "GAN weights to 0")

    @classmethod
    def needs_pairs(cls, config) -> bool:
        return config.regression_weight > 0

    def make_fake_score(self, teacher: Denoiser) -> Denoiser:
        """The fake score (the score of the generator's distribution), initialised from the teacher: a full copy, or
        LoRA on the teacher's shared weights (``fake_score_lora_rank``). Variational score distillation overrides it
        (its LoRA's targets, alpha and parameterization)."""
        return trainable_copy(teacher, self.config.fake_score_lora_rank)

    @staticmethod
    def _features(score, x, t, cond):
        return score(x, t, cond, return_features=True)[1]

    # --- losses ------------------------------------------------------------------------------------
    def loss(self, phase, batch, step):
        device = self.device
        n = batch["batch_size"]
        cond = self._cond(batch, n, device)
        shape = (n, self.channels, self.resolution, self.resolution)
        if phase == "generator":
            return self._generator_loss(batch, cond, shape, device)
        return self._critic_loss(batch, cond, shape, device)

    def _generator_loss(self, batch, cond, shape, device):
        cfg = self.config
        x = self._generate(torch.randn(shape, device=device), cond)
        logs = self.distribution_matching(x, cond)
        total = sum(w * logs[k] for k, w in self.dm_weights().items())
        if cfg.regression_weight > 0:
            logs["regression"] = self.regression_loss(batch, cond)
            total = total + cfg.regression_weight * logs["regression"]
        if self.disc_head is not None:
            t_gan = self._gan_t(shape[0], device)
            noisy = self.schedule.add_noise(x, torch.randn_like(x), t_gan)
            logs["gan"] = gan_generator_loss(self.disc_head(self._features(self.fake_score, noisy, t_gan, cond)))
            total = total + cfg.gan_weight_gen * logs["gan"]
        return total, {k: v.detach() for k, v in logs.items()}

    def dm_timesteps(self, n: int, device) -> torch.Tensor:
        big_t = self.schedule.num_train_timesteps
        cfg = self.config
        if self.schedule.kind == "flow":  # sigma ~ U[t_min, t_max], shifted as the teacher's scheduler shifts its grid
            u = cfg.dm_t_min + (cfg.dm_t_max - cfg.dm_t_min) * torch.rand(n, device=device, dtype=torch.float64)
            return (self.schedule.shift_sigma(u) * big_t).float()
        return torch.randint(int(cfg.dm_t_min * big_t), int(cfg.dm_t_max * big_t) + 1, (n,), device=device).float()

    def dm_weights(self) -> dict[str, float]:
        """The weight of each term of ``distribution_matching`` in the generator's loss (other keys are logged)."""
        return {"dm": self.config.dm_weight}

    def real_score_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None) -> torch.Tensor:
        """The real score of the distribution-matching gradient (``s_real`` of DMD Eq. 7) at ``(x_t, t)``, as the
        x0 prediction it implies (``s = (alpha_t x0 - x_t) / sigma_t^2``): the frozen teacher with CFG at
        ``guidance_scale`` (standard form; None: ``real_guidance_scale``). Called under no grad; float32 x0 of
        ``x_t``'s shape.

        The hook for methods that change only where the real score comes from: DisBack (a recorded path of
        scores, then the teacher), variational score distillation (SwiftBrush: the LoRA teacher with its adapters
        off; SNOOPI: a drawn guidance scale, negative prompts)."""
        scale = self.config.real_guidance_scale if guidance_scale is None else guidance_scale
        return self.teacher(x_t, t, cond, guidance_scale=scale)

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        """The generator's distribution-matching term ``{"dm": loss, ...}`` for its samples ``x`` (with grad):
        ``x`` re-noised at ``t ~ dm_timesteps``, then :func:`dmd_gradient` of :meth:`real_score_x0` and the fake
        score. Variants (f-distill, decoupled DMD) override this; the rest of the objective stays DMD2's."""
        t = self.dm_timesteps(x.shape[0], x.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t)
            x0_fake = self.fake_score(x_t, t, cond)
            x0_real = self.real_score_x0(x_t, t, cond)
            grad = dmd_gradient(x.detach(), x0_real, x0_fake)
        return {"dm": dmd_loss(x, grad)}

    def _gan_t(self, n, device):
        return torch.randint(0, int(self.config.gan_t_max * (self.schedule.num_train_timesteps - 1)) + 1, (n,),
                             device=device).float()

    def _critic_loss(self, batch, cond, shape, device):
        cfg = self.config
        with torch.no_grad():
            x = self._generate(torch.randn(shape, device=device), cond, grad=False)
        fake_cond = cond
        if cfg.label_dropout > 0 and cond.class_labels is not None:
            drop = torch.rand(shape[0], device=device) < cfg.label_dropout
            fake_cond = Cond(class_labels=torch.where(drop, torch.full_like(cond.class_labels, self.num_classes),
                                                      cond.class_labels))
        t = self.schedule.sample_t(shape[0], "uniform", device=device)
        noise = torch.randn_like(x)
        x_t = self.schedule.add_noise(x, noise, t)
        ptype = self.teacher.prediction_type
        pred = self.fake_score(x_t, t, fake_cond, output=ptype)
        logs = {"fake_score": denoising_loss(pred, x, noise, x_t, t, self.schedule, ptype)}
        total = logs["fake_score"]
        if self.disc_head is not None:
            real = batch["image"]
            t_gan = self._gan_t(shape[0], device)
            real_cond = self._batch_cond(batch)
            noisy_fake = self.schedule.add_noise(x, torch.randn_like(x), t_gan)
            noisy_real = self.schedule.add_noise(real, torch.randn_like(real), t_gan)
            logits_fake = self.disc_head(self._features(self.fake_score, noisy_fake, t_gan, cond))
            logits_real = self.disc_head(self._features(self.fake_score, noisy_real, t_gan, real_cond))
            logs["disc"] = gan_discriminator_loss(logits_real, logits_fake)
            total = total + cfg.gan_weight_disc * logs["disc"]
        return total, {k: v.detach() for k, v in logs.items()}


@register
class DMDv1Objective(DMDObjective):
    """DMD (v1): distribution matching plus the regression loss on teacher pairs; generator every step."""

    name = "dmd"

    @classmethod
    def optim_defaults(cls, config):
        defaults = super().optim_defaults(config)
        defaults["generator"] = {**defaults["generator"], "every": 1}
        return defaults
