"""Distribution matching distillation: DMD (Yin et al. 2024) and DMD2 (Yin et al. 2024b).

The math is in module-level functions; ``DMDObjective`` binds them to a generator (the student), a frozen
teacher (the real score), a fake score trained on the generator's samples and, for DMD2, a discriminator head
on the fake score's bottleneck.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..models import load_model
from .registry import register
from .base import Objective, Phase
from .teacher import denoising_loss


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


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` elementwise (the regression distance when LPIPS is not used)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))`` (DMD2)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``softplus(D(fake)) + softplus(-D(real))`` (DMD2's classifier loss)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def soft_clamp(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    return x if not limit else limit * torch.tanh(x / limit)


class DiscriminatorHead(torch.nn.Module):
    """A small head on bottleneck features: conv (or linear for token features), GroupNorm, SiLU, 1 channel,
    averaged over positions -> one logit per sample."""

    def __init__(self, channels: int, tokens: bool = False):
        super().__init__()
        self.tokens = tokens
        if tokens:
            self.net = torch.nn.Sequential(torch.nn.LayerNorm(channels), torch.nn.Linear(channels, channels),
                                           torch.nn.SiLU(), torch.nn.Linear(channels, 1))
        else:
            groups = 32 if channels % 32 == 0 else 1
            self.net = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1),
                                           torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
                                           torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


def trainable_copy(teacher: Denoiser, lora_rank: int = 0, lora_targets: list[str] | None = None) -> Denoiser:
    """A trainable network initialised from the teacher: a full copy, or LoRA of ``lora_rank`` on the teacher's
    own (frozen, shared) weights (on ``lora_targets``, default the backbone's usual modules)."""
    if not lora_rank:
        return teacher.clone(trainable=True)
    return teacher.clone(trainable=False, share_weights=True).with_lora(lora_rank, target_modules=lora_targets)


def _regression_lpips(cfg, channels: int):
    from ..config import ConfigError
    from ..lpips import LPIPSError, load_lpips

    if not cfg.lpips_weights:
        raise ConfigError("objective.regression_distance=lpips needs objective.lpips_weights=PATH (torchvision's "
                          "VGG16 weights, e.g. vgg16-397923af.pth); or use pseudo_huber")
    if channels not in (1, 3):
        raise ConfigError(f"LPIPS compares images; this teacher works on {channels}-channel latents: use "
                          "objective.regression_distance=pseudo_huber")
    try:
        return load_lpips(cfg.lpips_weights)
    except LPIPSError as exc:
        raise ConfigError(f"objective.lpips_weights: {exc}") from None


def init_generator(generator: Denoiser, source: str, key: str = "objective.generator_init") -> None:
    """Load a generator's backbone weights from a Diffusers folder or a run folder (its ``final/``); a routed
    generator (MSD) loads them into every student."""
    from pathlib import Path

    from ..config import ConfigError, ModelConfig

    folder = Path(source)
    if (folder / "final").is_dir():
        folder = folder / "final"
    weights = load_model(ModelConfig(source=str(folder))).denoiser.backbone.state_dict()
    for member in getattr(generator, "members", [generator]):
        own = member.backbone.state_dict()
        if weights.keys() != own.keys() or any(weights[k].shape != own[k].shape for k in own):
            raise ConfigError(f"{key}={source!r} holds a {type(member.backbone).__name__} "
                              "whose weights do not match the student built from the teacher; give a run of the "
                              "same teacher (and students of the teacher's size)")
        member.backbone.load_state_dict(weights)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DMDConfig:
    student_steps: int = 1  # K: the student's steps (backward simulation when K > 1)
    # the scheduler the student is exported with; its timesteps and update rule are the backward simulation's:
    # lcm / lcm_uniform (VP teachers) and flow_lcm (flow teachers) re-noise x0 with fresh noise as DMD2 does;
    # flow_euler is the deterministic Euler update (the predicted noise carried to the next timestep)
    recipe: Literal["lcm", "lcm_uniform", "flow_lcm", "flow_euler"] = "lcm_uniform"
    # 1-step generators: the timestep the generator is called at (DMD2's SDXL 1-step: 399; None: the recipe's, 999);
    # exported as a stock DDIMScheduler(timestep_spacing="leading", steps_offset=t) where the pipeline keeps it
    conditioning_timestep: int | None = None
    real_guidance_scale: float = 1.0  # teacher CFG, standard form (DMD2: SD1.5 1.75, SDXL 8)
    dm_t_min: float = 0.02  # DM timesteps ~ U[t_min, t_max] * T (DMD2: 0.02, 0.98)
    dm_t_max: float = 0.98
    dm_weight: float = 1.0
    regression_weight: float = 0.0  # DMD: weight of the regression loss on teacher (noise, image) pairs
    regression_distance: Literal["pseudo_huber", "mse", "lpips"] = "pseudo_huber"  # DMD's paper: LPIPS
    huber_c: float = 0.03
    lpips_weights: str | None = None  # lpips: torchvision's VGG16 weights file (nothing is downloaded)
    gan_weight_gen: float = 0.0  # DMD2: generator GAN weight (SDXL 5e-3, SD1.5 1e-3, ImageNet 3e-3)
    gan_weight_disc: float = 0.0  # DMD2: discriminator (classifier) weight 1e-2
    gan_t_max: float = 1.0  # diffusion GAN: real and fake images noised at t ~ U[0, gan_t_max * T]
    output_clamp: float | None = None  # soft clamp c*tanh(x/c) of the generator's images
    # start the generator from another run's weights (its folder or its final/ model), e.g. a regression warm
    # start before DMD2, or DMD2's SD1.5 stage 2 from stage 1; None: the teacher's weights
    generator_init: str | None = None
    label_dropout: float = 0.0  # the fake score's own CFG dropout (DMD2 trains it conditionally)
    # LoRA instead of a full copy, on the frozen teacher's own weights (shared, not copied): 0 = full copy.
    # The discriminator head sits on the fake score, so fake_score_lora_rank also makes the discriminator LoRA.
    generator_lora_rank: int = 0
    fake_score_lora_rank: int = 0

    def validate(self):
        from ..config import ConfigError

        validate_student(self)
        if self.generator_lora_rank < 0 or self.fake_score_lora_rank < 0:
            raise ConfigError("objective.generator_lora_rank and fake_score_lora_rank must be >= 0 (0: full copy)")
        if self.generator_lora_rank and self.generator_init:
            raise ConfigError("objective.generator_init loads full weights; a LoRA generator (generator_lora_rank) "
                              "shares the teacher's: use one or the other")
        if not 0 <= self.dm_t_min < self.dm_t_max <= 1:
            raise ConfigError("objective.dm_t_min and dm_t_max must satisfy 0 <= dm_t_min < dm_t_max <= 1")
        if (self.gan_weight_gen > 0) != (self.gan_weight_disc > 0):
            raise ConfigError("set both objective.gan_weight_gen and objective.gan_weight_disc (or neither)")


def validate_student(cfg) -> None:
    """The checks on a generator's steps, recipe and conditioning timestep (any config with those fields)."""
    from ..config import ConfigError

    if cfg.student_steps < 1:
        raise ConfigError(f"objective.student_steps must be >= 1, not {cfg.student_steps}")
    if cfg.conditioning_timestep is not None:
        if cfg.student_steps != 1:
            raise ConfigError("objective.conditioning_timestep is for 1-step generators (student_steps: 1); a "
                              "K-step generator runs the timesteps of its recipe")
        if cfg.recipe.startswith("flow"):
            raise ConfigError("objective.conditioning_timestep is for VP teachers (recipe lcm or lcm_uniform); "
                              "flow recipes start at sigma = 1")


# ------------------------------------------------------------------------------------------------ objective
@register
class DMDObjective(Objective):
    """DMD / DMD2 on the one loop. Phases: ``generator`` (every ``optim.generator.every`` steps: the two
    time-scale update rule) and ``critic`` (fake score and discriminator head, every step)."""

    name = "dmd2"
    Config = DMDConfig
    ema_module = "generator"
    has_critic = True  # a fake score (and discriminator head) trained on the generator's samples

    def __init__(self, config: DMDConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        super().__init__(config)
        from ..pipelines import ExportError, get_recipe
        from ..pipelines.spec import export_scheduler, pipeline_for
        from ..pipelines.sampling import sampler_of, student_timesteps

        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.generator = trainable_copy(teacher, getattr(config, "generator_lora_rank", 0))
        self.fake_score = trainable_copy(teacher, config.fake_score_lora_rank) if self.has_critic else None
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.schedule = teacher.schedule
        self.null_cond = teacher.null_cond  # text teachers: the encoded empty prompt (CFG, shapes, samples)
        self.recipe = get_recipe(config.recipe, config.student_steps, timesteps=None if config.conditioning_timestep
                                 is None else [config.conditioning_timestep])
        try:
            pipeline = pipeline_for(teacher)
        except ExportError:
            pipeline = None
        # the scheduler the student is exported with, as its pipeline holds it: the generator is trained at its
        # timesteps and with its update rule (see _generate)
        self.student_scheduler = export_scheduler(teacher, self.recipe, teacher_scheduler, pipeline)
        self.sampler = sampler_of(self.student_scheduler)
        self.timesteps = student_timesteps(self.student_scheduler, config.student_steps, pipeline)
        self.disc_head = None
        if self.has_critic and config.gan_weight_disc > 0:
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
    def from_config(cls, run, data=None) -> "DMDObjective":
        from ..backbones import in_channels
        from ..config import ConfigError
        from ..models import text_null_cond

        loaded = load_model(run.model)
        cfg = run.objective
        # a text teacher's CFG needs its null condition: the empty prompt through its own text encoders (cached)
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
            if data is None or len(data) == 0 or "encoder_hidden_states" not in data[0]:
                raise ConfigError(f"the teacher {run.model.source!r} is text-conditioned: set data.dataset=prompts "
                                  "and data.path to a prompt file (.txt, or .jsonl with images for a GAN term)")
        has_images = data is not None and len(data) > 0 and "image" in data[0]
        if getattr(cfg, "gan_weight_disc", 0) > 0 and not has_images:
            raise ConfigError("the GAN term (objective.gan_weight_*) needs real images: set data.dataset to "
                              "digits or folder (or prompts from a .jsonl naming an image per prompt), or set the "
                              "GAN weights to 0")
        # samples have the backbone's input channels (latent channels for a latent teacher: DMD2 never decodes)
        channels = in_channels(loaded.denoiser.backbone)
        if has_images and data[0]["image"].shape[0] != channels:
            raise ConfigError(f"the data's images have {data[0]['image'].shape[0]} channels, but the teacher "
                              f"takes {channels}")
        lpips_net = None
        if cls.needs_pairs(cfg) and cfg.regression_distance == "lpips":
            lpips_net = _regression_lpips(cfg, channels)
        if cls.needs_pairs(cfg) and (data is None or "noise" not in data[0]):
            raise ConfigError(f"the regression loss (method {run.method}) needs teacher (noise, image) "
                              "pairs: run `stepdistill make-pairs` and set data.dataset=pairs, data.path=DIR")
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        objective = cls(cfg, loaded.denoiser, loaded.scheduler, num_classes, run.data.resolution, channels)
        objective.lpips_net = lpips_net
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder  # export links the VAE and text encoders from it
        if cfg.generator_init:
            init_generator(objective.generator, cfg.generator_init)
        return objective

    @classmethod
    def needs_pairs(cls, config) -> bool:
        return config.regression_weight > 0

    # --- helpers -----------------------------------------------------------------------------------
    def _random_cond(self, n: int, device) -> Cond:
        if self.num_classes:
            return Cond(class_labels=torch.randint(0, self.num_classes, (n,), device=device))
        if self.null_cond is not None:  # text teachers without a prompt at hand: the empty prompt
            return self.null_cond.to(device).repeat(n)
        return Cond()

    def _batch_cond(self, batch: dict) -> Cond:
        """The condition the batch's samples carry (empty when the data has none)."""
        return Cond.from_batch(batch)

    def _cond(self, batch: dict, n: int, device) -> Cond:
        cond = self._batch_cond(batch)
        return cond if cond.batch_size else self._random_cond(n, device)

    @staticmethod
    def _features(score, x, t, cond):
        return score(x, t, cond, return_features=True)[1]

    def _generate(self, noise: torch.Tensor, cond: Cond, grad: bool = True) -> torch.Tensor:
        """The student's sample: backward simulation through its own K-step schedule (DMD2 Sec. 4.5) — a
        random number of no-grad steps (x0, re-noised with fresh noise), then one step with gradients.

        Each step is the exported scheduler's: LCMScheduler's boundary condition ``c_skip x + c_out x0`` (lcm);
        x0 as is (ddim: a one-step generator at a conditioning timestep; flow_lcm: ``x - sigma u``). Between steps,
        ``lcm`` / ``flow_lcm`` re-noise with fresh noise; ``flow_euler`` carries the predicted noise (Euler)."""
        from ..pipelines.sampling import lcm_scalings

        ts = self.timesteps
        stop = int(torch.randint(0, len(ts), ())) if grad else len(ts) - 1
        self.generator_step = stop  # which step made the sample (0: from pure noise); decoupled DMD reads it
        x = noise
        scaling = self.student_scheduler.config.get("timestep_scaling", 10.0)
        for i in range(stop + 1):
            t = torch.full((x.shape[0],), ts[i], device=x.device)
            with torch.set_grad_enabled(grad and i == stop):
                x0 = soft_clamp(self.generator(x, t, cond), self.config.output_clamp)
                if self.sampler == "lcm":
                    c_skip, c_out = lcm_scalings(ts[i], scaling)
                    x0 = c_out * x0 + c_skip * x
            if i < stop:
                if self.sampler in ("lcm", "flow_lcm"):
                    x = self.schedule.add_noise(x0.detach(), torch.randn_like(x0), ts[i + 1])
                else:  # deterministic: x_next = alpha' x0 + sigma' eps_hat (flow: the Euler step)
                    eps = self.schedule.convert(x0.detach(), x, t, "sample", "epsilon")
                    x = self.schedule.add_noise(x0.detach(), eps, ts[i + 1])
        return x0

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

    def regression_loss(self, batch: dict, cond: Cond) -> torch.Tensor:
        """DMD's regression loss: the distance between the generator's sample from a pair's noise and the
        teacher's ODE solution from that noise (``make-pairs``); ``cond`` when the pairs carry none."""
        pair_cond = self._batch_cond(batch)
        pred = self._generate(batch["noise"], pair_cond if pair_cond.batch_size else cond)
        if self.config.regression_distance == "pseudo_huber":
            return pseudo_huber(pred, batch["image"], self.config.huber_c)
        if self.config.regression_distance == "lpips":
            from ..lpips import lpips_distance

            return lpips_distance(self.lpips_net, pred, batch["image"])
        return F.mse_loss(pred.float(), batch["image"].float())

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

    def distribution_matching(self, x: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        """The generator's distribution-matching term ``{"dm": loss, ...}`` for its samples ``x`` (with grad).
        Variants (f-distill, decoupled DMD) override this; the rest of the objective stays DMD2's."""
        t = self.dm_timesteps(x.shape[0], x.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t)
            x0_fake = self.fake_score(x_t, t, cond)
            x0_real = self.teacher(x_t, t, cond, guidance_scale=self.config.real_guidance_scale)
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

    # --- sampling and export -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generator=None):
        n = batch["batch_size"]
        device = self.device
        cond = (Cond(class_labels=torch.arange(n, device=device) % self.num_classes) if self.num_classes
                else self._random_cond(n, device))
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        return self._generate(noise, cond, grad=False).clamp(-1, 1)

    def save_pretrained(self, directory):
        from ..models import save_model

        save_model(self.generator, self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                    "student_steps": self.config.student_steps, "timesteps": self.timesteps})

    def export_spec(self):
        from ..pipelines.spec import ExportSpec

        return ExportSpec(student=self.generator, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.timesteps,
                          base_folder=getattr(self, "base_folder", None),
                          meta={"resolution": self.resolution, "channels": self.channels})


@register
class DMDv1Objective(DMDObjective):
    """DMD (v1): distribution matching plus the regression loss on teacher pairs; generator every step."""

    name = "dmd"

    @classmethod
    def optim_defaults(cls, config):
        defaults = super().optim_defaults(config)
        defaults["generator"] = {**defaults["generator"], "every": 1}
        return defaults



@dataclass
class RegressionConfig:
    student_steps: int = 1
    recipe: Literal["lcm", "lcm_uniform", "flow_lcm", "flow_euler"] = "lcm_uniform"
    conditioning_timestep: int | None = None
    regression_distance: Literal["pseudo_huber", "mse", "lpips"] = "pseudo_huber"
    huber_c: float = 0.03
    lpips_weights: str | None = None
    output_clamp: float | None = None
    generator_init: str | None = None

    def validate(self):
        validate_student(self)


@register
class RegressionObjective(DMDObjective):
    """Knowledge distillation (Luhman & Luhman 2021): the student maps the teacher's noise to the teacher's
    ODE solution from it, ``min E d(G(z), ODE_teacher(z))`` over pairs from ``stepdistill make-pairs`` — DMD's
    regression loss alone. The sharpest warm start for DMD/DMD2 on a small budget (the quickstart's stage 1)."""

    name = "regression"
    Config = RegressionConfig
    has_critic = False

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
