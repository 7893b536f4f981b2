"""What several methods share: losses, networks, students made from the teacher, and the few-step generator that
the DMD family and regression distil (its config and its objective base class).

Method files import these from here, never from one another (a method that is a variant of another, such as
f-distill of DMD2, subclasses it instead).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones import in_channels, unwrap
from ..cache import module_fingerprint
from ..conditioning import Cond
from ..config import ConfigError, ModelConfig
from ..denoiser import Denoiser
from ..lpips import LPIPSError, load_lpips, lpips_distance
from ..models import load_model, save_model, text_null_cond
from ..pipelines.recipes import ExportError, get_recipe
from ..pipelines.sampling import sampler_of, student_timesteps
from ..pipelines.spec import ExportSpec, export_scheduler, pipeline_for
from ..schedule import NoiseSchedule
from ..solvers import ScheduleLevels, step_rule
from .base import TEACHER_FILE, Objective


# ------------------------------------------------------------------------------------------------ losses
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, *, per_sample: bool = False,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo-Huber distance ``sqrt(d^2 + c^2) - c`` (Charbonnier), averaged, in float32.

    ``per_sample=False``: ``d = a - b`` elementwise, the mean over every element. ``per_sample=True``: ``d`` is each
    sample's Euclidean norm ``||a_i - b_i||`` over all its dimensions, the mean over the batch. ``weight``: a weight
    per sample (``(B,)``, e.g. iCT's ``lambda(sigma)``) applied before the mean. The ``c`` of each method:

    - LCM (consistency distillation): elementwise, ``c = 0.001`` (``huber_c``);
    - iCT (Song & Dhariwal 2023): per sample, ``c = 0.00054 sqrt(dim)``, dim = C*H*W;
    - DMD's regression loss (when not LPIPS): elementwise, ``c = huber_c`` (0.03 here);
    - rfpp (Lee et al. 2024): per sample, ``c = 0.00054 dim``.
    """
    sq = (a.float() - b.float()) ** 2
    dist = torch.sqrt((sq.flatten(1).sum(1) if per_sample else sq) + c * c) - c
    if weight is not None:
        dist = weight.float().reshape(-1, *([1] * (dist.ndim - 1))) * dist
    return dist.mean()


def denoising_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   schedule: NoiseSchedule, prediction_type: str) -> torch.Tensor:
    """``E ||pred - target||^2`` with the target of the prediction type: eps (DDPM, Ho et al. 2020 Eq. 14),
    ``v = alpha eps - sigma x0`` (Salimans & Ho 2022), x0, or the flow velocity ``eps - x0`` (Lipman et al.
    2023; SD3 Eq. 2 with sigma = t)."""
    a, s = schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a, s = a.to(x0.device).view(shape), s.to(x0.device).view(shape)
    targets = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0, "flow": noise - x0}
    return torch.mean((pred.float() - targets[prediction_type].float()) ** 2)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))`` (DMD2)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``softplus(D(fake)) + softplus(-D(real))`` (DMD2's classifier loss)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def soft_clamp(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``limit * tanh(x / limit)``: a clamp to (-limit, limit) with a gradient everywhere; ``x`` as is without one."""
    return x if not limit else limit * torch.tanh(x / limit)


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """``theta_target <- decay * theta_target + (1 - decay) * theta_online`` for every parameter (LCM: 0.95); a
    tensor the two networks share (the frozen base under LoRA adapters) is left as it is."""
    for t_param, o_param in zip(target.parameters(), online.parameters()):
        if t_param is not o_param:
            t_param.lerp_(o_param.detach().to(t_param.dtype), 1.0 - decay)


# ------------------------------------------------------------------------------------------------ networks
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


class PatchDiscriminator(torch.nn.Module):
    """A conditional PatchGAN (pix2pix, Isola et al. 2017): the image, with the source image it was made from
    concatenated on channels for image-conditioned teachers, through ``downsamplings`` strided 4x4 convolutions
    (width doubling, GroupNorm after the first, LeakyReLU 0.2) to a map of logits, one per patch."""

    def __init__(self, channels: int, source_channels: int = 0, width: int = 64, downsamplings: int = 2):
        super().__init__()
        layers, c_in, c = [], channels + source_channels, width
        for i in range(downsamplings):
            layers.append(torch.nn.Conv2d(c_in, c, 4, stride=2, padding=1))
            if i > 0:
                layers.append(torch.nn.GroupNorm(min(32, c // 4), c))
            layers.append(torch.nn.LeakyReLU(0.2))
            c_in, c = c, 2 * c
        layers.append(torch.nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = torch.nn.Sequential(*layers)
        self.source_channels = source_channels

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        if self.source_channels:
            if source is None:
                raise ValueError("this discriminator is conditioned on a source image: pass source=")
            x = torch.cat([x, source.to(x.dtype)], dim=1)
        return self.net(x.float())


def trainable_copy(teacher: Denoiser, lora_rank: int = 0, lora_targets: list[str] | None = None,
                   lora_alpha: float | None = None) -> Denoiser:
    """A trainable network initialised from the teacher: a full copy, or LoRA of ``lora_rank`` (alpha ``lora_alpha``,
    default the rank) on the teacher's own (frozen, shared) weights (on ``lora_targets``, default the backbone's
    usual modules)."""
    if not lora_rank:
        return teacher.clone(trainable=True)
    return teacher.clone(trainable=False, share_weights=True).with_lora(lora_rank, lora_alpha,
                                                                        target_modules=lora_targets)


def new_student(teacher: Denoiser, overrides: dict, key: str) -> Denoiser:
    """A trainable Denoiser over a new, randomly initialised backbone of the teacher's class, in the teacher's dtype,
    whose config is the teacher's updated with ``overrides`` (e.g. fewer ``block_out_channels``, a guidance
    embedding), on the teacher's schedule, prediction type and null conditions. A key the class does not have, or a
    config it rejects, is a ConfigError naming ``key`` (the objective's setting)."""
    base = unwrap(teacher.backbone)
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ConfigError(f"{key}: {type(base).__name__} has no key(s) {unknown}")
    try:
        backbone = type(base).from_config({**config, **overrides})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} does not make a valid {type(base).__name__}: {exc}") from exc
    dtype = next(base.parameters()).dtype
    if dtype != torch.float32:
        backbone = backbone.to(dtype)
    student = Denoiser(backbone, teacher.schedule, teacher.prediction_type, null_cond=teacher.null_cond,
                       null_class=teacher.null_class)
    return student.requires_grad_(True).eval()


def add_guidance_embedding(teacher: Denoiser, dim: int, key: str = "objective.guidance_embedding_dim", *,
                           share_weights: bool = False, guidance_range=None) -> Denoiser:
    """:meth:`Denoiser.guidance_embedded` (a network holding the teacher's weights that takes the guidance scale as an
    input, starting as the teacher), its errors as ConfigErrors naming ``key``."""
    try:
        return teacher.guidance_embedded(dim, share_weights=share_weights, guidance_range=guidance_range)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def memory_footprint(*modules: torch.nn.Module) -> dict[str, int]:
    """Bytes of model state held by ``modules`` together, each tensor counted once however many modules share it:
    ``weights`` (parameters and buffers), ``trainable`` (parameters with requires_grad), and ``training`` (weights +
    a gradient and AdamW's two moments per trainable parameter). A LoRA student on the teacher's own weights adds only
    its adapters; a full student copy doubles ``weights``."""
    seen, weights, trainable = set(), 0, 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            key = (t.device.type, t.data_ptr()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            size = t.numel() * t.element_size()
            weights += size
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                trainable += size
    return {"weights": weights, "trainable": trainable, "training": weights + 3 * trainable}


def teacher_fingerprint(teacher: Denoiser) -> str:
    """What pairs, run folders and recorded paths name their teacher by: the sha256 of its backbone's class, config
    and weights (``stepdistill.cache.module_fingerprint``), taken as it is loaded."""
    return module_fingerprint(unwrap(teacher.backbone))


def check_teacher(made_by: dict | None, fingerprint: str | None, what: str, source: str) -> None:
    """A ConfigError when ``what`` (pairs, a warm start, a recorded path) was made by another teacher than this run's
    (``made_by``: the ``source`` and ``fingerprint`` it records); nothing when it records none."""
    if not made_by or not made_by.get("fingerprint") or fingerprint is None or made_by["fingerprint"] == fingerprint:
        return
    raise ConfigError(f"{what}: made by another teacher ({made_by.get('source')!r}, weights "
                      f"{made_by['fingerprint'][:12]}...) than this run's model.source {source!r} (weights "
                      f"{fingerprint[:12]}...); use the teacher it was made with, or make it again with this one")


def run_teacher(folder: str | Path) -> dict | None:
    """The teacher a run folder (or its ``final/``) records in ``teacher.json``, None if it records none."""
    folder = Path(folder)
    for candidate in (folder / TEACHER_FILE, folder.parent / TEACHER_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def init_generator(generator: Denoiser, source: str, key: str = "objective.generator_init",
                   fingerprint: str | None = None, teacher_source: str = "") -> None:
    """Load a generator's backbone weights from a Diffusers folder or a run folder (its ``final/``); a routed
    generator (MSD) loads them into every student. A run made from another teacher (``fingerprint``: this run's)
    is refused."""
    folder = Path(source)
    check_teacher(run_teacher(folder), fingerprint, f"{key}={source!r}", teacher_source)
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


def regression_lpips(cfg, channels: int) -> torch.nn.Module:
    """The LPIPS network of ``regression_distance: lpips`` (from ``lpips_weights``; images only)."""
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


# ------------------------------------------------------------------------------------------------ the generator
@dataclass
class GeneratorConfig:
    """A few-step generator distilled from a frozen teacher: its steps and exported scheduler, its regression loss on
    teacher (noise, image) pairs, its output clamp, initial weights and LoRA (DMD, DMD2 and their variants,
    regression)."""

    student_steps: int = 1  # K: the student's steps (backward simulation when K > 1)
    # the scheduler the student is exported with; its timesteps and update rule are the backward simulation's:
    # lcm / lcm_uniform (VP teachers) and flow_lcm (flow teachers) re-noise x0 with fresh noise as DMD2 does;
    # flow_euler is the deterministic Euler update (the predicted noise carried to the next timestep)
    recipe: Literal["lcm", "lcm_uniform", "flow_lcm", "flow_euler"] = "lcm_uniform"
    # 1-step generators: the timestep the generator is called at (DMD2's SDXL 1-step: 399; None: the recipe's, 999);
    # exported as a stock DDIMScheduler(timestep_spacing="leading", steps_offset=t) where the pipeline keeps it
    conditioning_timestep: int | None = None
    regression_distance: Literal["pseudo_huber", "mse", "lpips"] = "pseudo_huber"  # DMD's paper: LPIPS
    huber_c: float = 0.03
    lpips_weights: str | None = None  # lpips: torchvision's VGG16 weights file (nothing is downloaded)
    output_clamp: float | None = None  # soft clamp c*tanh(x/c) of the generator's images
    # start the generator from another run's weights (its folder or its final/ model), e.g. a regression warm
    # start before DMD2, or DMD2's SD1.5 stage 2 from stage 1; None: the teacher's weights
    generator_init: str | None = None
    # LoRA instead of a full copy, on the frozen teacher's own weights (shared, not copied): 0 = full copy
    generator_lora_rank: int = 0

    def validate(self):
        if self.student_steps < 1:
            raise ConfigError(f"objective.student_steps must be >= 1, not {self.student_steps}")
        if self.conditioning_timestep is not None:
            if self.student_steps != 1:
                raise ConfigError("objective.conditioning_timestep is for 1-step generators (student_steps: 1); a "
                                  "K-step generator runs the timesteps of its recipe")
            if self.recipe.startswith("flow"):
                raise ConfigError("objective.conditioning_timestep is for VP teachers (recipe lcm or lcm_uniform); "
                                  "flow recipes start at sigma = 1")
        if self.generator_lora_rank < 0:
            raise ConfigError("objective.generator_lora_rank must be >= 0 (0: full copy)")
        if self.generator_lora_rank and self.generator_init:
            raise ConfigError("objective.generator_init loads full weights; a LoRA generator (generator_lora_rank) "
                              "shares the teacher's: use one or the other")


#: the step rule of the generator's rollout for each exported sampler (others: the sampler's own). Euler on a flow
#: schedule is taken in its x0 form (DDIM, exactly the Euler step in exact arithmetic), so that it starts from the
#: generator's (soft-clamped) x0
ROLLOUT_RULES = {"flow_euler": "ddim"}


class GeneratorObjective(Objective):
    """A generator (``self.generator``, a copy or LoRA of the frozen teacher) that samples in the K steps of the
    scheduler it is exported with, trained at exactly those timesteps. Subclasses add the loss and its phases."""

    Config = GeneratorConfig
    ema_module = "generator"

    def __init__(self, config: GeneratorConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        super().__init__(config)
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.generator = trainable_copy(teacher, config.generator_lora_rank)
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

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, run, data=None) -> "GeneratorObjective":
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
        cls.check_data(cfg, has_images)
        # samples have the backbone's input channels (latent channels for a latent teacher: DMD2 never decodes)
        channels = in_channels(loaded.denoiser.backbone)
        if has_images and data[0]["image"].shape[0] != channels:
            raise ConfigError(f"the data's images have {data[0]['image'].shape[0]} channels, but the teacher "
                              f"takes {channels}")
        lpips_net = None
        if cls.needs_pairs(cfg) and cfg.regression_distance == "lpips":
            lpips_net = regression_lpips(cfg, channels)
        if cls.needs_pairs(cfg) and (data is None or "noise" not in data[0]):
            raise ConfigError(f"the regression loss (method {run.method}) needs teacher (noise, image) "
                              "pairs: run `stepdistill make-pairs` and set data.dataset=pairs, data.path=DIR")
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        fingerprint = teacher_fingerprint(loaded.denoiser)
        manifest = getattr(data, "manifest", None)  # teacher pairs record the teacher that made them
        if manifest is not None:
            made_by = {"source": (manifest.get("teacher") or {}).get("source"),
                       "fingerprint": manifest.get("teacher_weights")}
            check_teacher(made_by, fingerprint, f"the pairs in {run.data.path}", run.model.source)
        objective = cls(cfg, loaded.denoiser, loaded.scheduler, num_classes, run.data.resolution, channels)
        objective.teacher_fingerprint = fingerprint
        objective.lpips_net = lpips_net
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder  # export links the VAE and text encoders from it
        if cfg.generator_init:
            init_generator(objective.generator, cfg.generator_init, fingerprint=fingerprint,
                           teacher_source=run.model.source)
        return objective

    @classmethod
    def check_data(cls, config, has_images: bool) -> None:
        """Checks of the data beyond the teacher's (a ConfigError naming the fix); e.g. real images for a GAN."""

    @classmethod
    def needs_pairs(cls, config) -> bool:
        """Whether the loss needs teacher (noise, image) pairs (the regression loss)."""
        return False

    # --- conditions ---------------------------------------------------------------------------------
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

    # --- the generator's samples --------------------------------------------------------------------
    def _generate(self, noise: torch.Tensor, cond: Cond, grad: bool = True) -> torch.Tensor:
        """The student's sample: backward simulation through its own K-step schedule (DMD2 Sec. 4.5) — a
        random number of no-grad steps, then one step with gradients.

        Each step is the exported scheduler's rule (:data:`stepdistill.solvers.STEP_RULES`) on the teacher's noise
        schedule: LCMScheduler's boundary condition ``c_skip x + c_out x0``, then fresh noise (lcm); x0 as is, then
        fresh noise (flow_lcm); the predicted noise carried to the next timestep (ddim: a one-step generator at a
        conditioning timestep; flow_euler: the Euler step, :data:`ROLLOUT_RULES`). The last step's output is the
        sample."""
        ts = self.timesteps
        stop = int(torch.randint(0, len(ts), ())) if grad else len(ts) - 1
        self.generator_step = stop  # which step made the sample (0: from pure noise); decoupled DMD reads it
        rule = step_rule(ROLLOUT_RULES.get(self.sampler, self.sampler))
        params = ({"timestep_scaling": self.student_scheduler.config.get("timestep_scaling", 10.0)}
                  if self.sampler == "lcm" else {})
        levels = ScheduleLevels(self.schedule, noise)
        x = noise
        for i in range(stop + 1):
            t = torch.full((x.shape[0],), ts[i], device=x.device)
            with torch.set_grad_enabled(grad and i == stop):
                x0 = soft_clamp(self.generator(x, t, cond), self.config.output_clamp)
                t_next = ts[i + 1] if i < stop else None
                z = torch.randn_like(x0) if rule.fresh_noise and t_next is not None else None
                x = rule(x, x0, ts[i], t_next, levels, z, **params)
        return x

    def regression_loss(self, batch: dict, cond: Cond) -> torch.Tensor:
        """DMD's regression loss: the distance between the generator's sample from a pair's noise and the
        teacher's ODE solution from that noise (``make-pairs``); ``cond`` when the pairs carry none."""
        pair_cond = self._batch_cond(batch)
        pred = self._generate(batch["noise"], pair_cond if pair_cond.batch_size else cond)
        if self.config.regression_distance == "pseudo_huber":
            return pseudo_huber(pred, batch["image"], self.config.huber_c)
        if self.config.regression_distance == "lpips":
            return lpips_distance(self.lpips_net, pred, batch["image"])
        return F.mse_loss(pred.float(), batch["image"].float())

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
        save_model(self.generator, self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                    "student_steps": self.config.student_steps, "timesteps": self.timesteps})

    def export_spec(self):
        return ExportSpec(student=self.generator, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.timesteps,
                          base_folder=getattr(self, "base_folder", None),
                          meta={"resolution": self.resolution, "channels": self.channels})
