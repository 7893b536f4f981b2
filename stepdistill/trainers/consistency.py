"""Consistency distillation: LCM (Luo et al. 2023; Song et al. 2023's CD in latent space) and LCM-LoRA; its variants
are SCott (a stochastic multi-step teacher solver, ``scott.py``), adversarial consistency distillation (``acd.py``)
and Hyper-SD's segmented TSCD (``tscd.py``).

The student ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student(x_t, t)`` is trained so that two points of the
teacher's ODE trajectory map to the same output: ``x_t`` (noised data at a grid timestep ``t_{n+k}``) and
``x_{t_n}``, one teacher solver step (skip ``k``) further. The target ``f_target(x_{t_n}, t_n)`` comes from an
EMA copy of the student (LCM: decay 0.95) or, for LCM-LoRA, from the student itself under no grad. Reference
implementation: Diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` and
``train_lcm_distill_lora_sdxl.py`` (see ../shared/reference/methods.md 1.1).

Guidance: the teacher runs CFG in the standard form ``u + s (c - u)`` (LCM writes ``c + w (c - u)``, w = s - 1).
With ``guidance_range`` the scale is drawn per sample and given to the student through its guidance embedding
(``time_cond_proj_dim``: LCM's embedding of w = s - 1, as ``LatentConsistencyModelPipeline`` feeds it); a
UNet2DConditionModel without one gets it added (LCM: 256 dimensions, zero-initialised projection), a UNet2DModel
becomes a GuidedUNet2DModel (:func:`~stepdistill.trainers.common.add_guidance_embedding`). Without a range the
teacher's guidance is fixed and baked into the student.

Adversarial term (``adv_weight`` > 0; SCott's optional one, and adversarial consistency distillation, ``acd``):
a conditional PatchGAN discriminator (a second phase) tells the student's outputs from real images, with the
source image concatenated for image-conditioned teachers; the student adds ``adv_weight * softplus(-D(f))``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..backbones import in_channels, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..models import load_model, save_model, text_null_cond
from ..pipelines.recipes import get_recipe
from ..pipelines.sampling import sample_student, student_timesteps
from ..pipelines.spec import ExportSpec
from ..solvers import ScheduleLevels, ddim_from_x0, lcm_grid, solver_step, step_rule
from ..solvers import lcm_boundary_scalings as boundary_scalings
from .base import Objective, Phase, source_channels
from .common import (PatchDiscriminator, add_guidance_embedding, ema_update, gan_discriminator_loss,  # noqa: F401
                     gan_generator_loss, init_generator, pseudo_huber, teacher_fingerprint, trainable_copy)
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def consistency_function(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, timestep_scaling: float = 10.0):
    """``f(x_t, t) = c_skip(t) x_t + c_out(t) x0`` (Song et al. 2023 Eq. 3 with LCM's scalings,
    :func:`~stepdistill.solvers.lcm_boundary_scalings`), a timestep per sample."""
    c_skip, c_out = (c.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.device)
                     for c in boundary_scalings(t, timestep_scaling))
    return c_skip * x_t.float() + c_out * x0.float()


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", c: float = 0.001) -> torch.Tensor:
    """``l2``: ``mean((pred - sg(target))^2)``; ``huber``: LCM's pseudo-Huber ``mean(sqrt((pred - sg(target))^2 +
    c^2) - c)`` elementwise (c = 0.001; :func:`~stepdistill.trainers.common.pseudo_huber`)."""
    if kind == "l2":
        return ((pred.float() - sg(target).float()) ** 2).mean()
    return pseudo_huber(pred, sg(target), c)


def sg(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ConsistencyConfig:
    num_ddim_timesteps: int = 50  # N: the solver grid (skip k = T / N); also the exported LCMScheduler's grid
    solver: Literal["ddim", "euler", "heun"] = "ddim"  # the teacher's step from t_{n+k} to t_n
    # the teacher's step in solver_substeps equal sub-steps from t_{n+k} to t_n (a coarse grid with a fine teacher);
    # SCott: a stochastic teacher solver — DDIM with noise strength eta (0: the ODE; 1: ancestral DDPM), fresh
    # noise in each sub-step
    solver_eta: float = 0.0
    solver_substeps: int = 1
    guidance_scale: float = 1.0  # teacher CFG (standard form) when guidance_range is not set
    guidance_range: list[float] | None = None  # [s_min, s_max] drawn per sample (LCM: w 5..15 -> [6, 16])
    embed_guidance: bool = True  # give the drawn scale to the student (LCM); LCM-LoRA: only the teacher uses it
    guidance_embedding_dim: int = 256  # added to a UNet2DConditionModel student without time_cond_proj_dim
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    target_ema: float = 0.95  # the target network's EMA decay (LCM); lcm_lora: 0 = no target network (the paper)
    timestep_scaling: float = 10.0
    student_steps: int = 4  # the exported LCMScheduler's steps (the student also samples at 1, 2, ...)
    # the exported scheduler (VP teachers): LCMScheduler, or TCDScheduler (TCD's strategic stochastic sampling: a
    # DDIM jump to (1 - tcd_gamma) t', then fresh noise up to t'; gamma 1 = lcm, 0 = deterministic), its gamma
    # passed as the call's eta
    sampler: Literal["lcm", "tcd"] = "lcm"
    tcd_gamma: float = 0.3
    # the exported pipeline's timesteps, student_steps of them on the solver grid (e.g. [999, 899, 799, 699]);
    # None: LCMScheduler's own pick. With no stock LCMScheduler config that runs them, the export uses
    # stepdistill's StudentLCMScheduler (its folder then loads with trust_remote_code=True)
    sample_timesteps: list[int] | None = None
    lora_rank: int = 0  # lcm_lora: LoRA rank on the frozen teacher (LCM-LoRA: 64)
    # lcm_lora: the modules that get adapters (peft's target_modules); None: the backbone's list in
    # stepdistill.denoiser.DEFAULT_LORA_TARGETS
    lora_targets: list[str] | None = None
    adv_weight: float = 0.0  # the adversarial term's weight on the student (0: none; SCott's optional term, acd)
    disc_width: int = 64  # the PatchGAN discriminator's first-layer channels
    disc_downsamplings: int = 2  # its strided convolutions (16x16 digits -> 4x4 patches)
    student_init: str | None = None  # start the student (and target) from another run's weights, e.g. a regression
    # warm start of the same teacher (default: the teacher's own weights)

    def validate(self):
        if self.num_ddim_timesteps < 2:
            raise ConfigError(f"objective.num_ddim_timesteps must be >= 2, not {self.num_ddim_timesteps}")
        if self.guidance_range is not None and (len(self.guidance_range) != 2
                                                or not 1 <= self.guidance_range[0] <= self.guidance_range[1]):
            raise ConfigError("objective.guidance_range is [s_min, s_max] with 1 <= s_min <= s_max (standard CFG "
                              f"form), not {self.guidance_range}")
        if not 0 <= self.solver_eta <= 1 or self.solver_substeps < 1:
            raise ConfigError("objective.solver_eta must be in [0, 1] and solver_substeps >= 1")
        if self.solver_eta > 0 and self.solver != "ddim":
            raise ConfigError("objective.solver_eta is DDIM's noise strength: use solver ddim with it")
        if self.lora_targets is not None and not self.lora_rank:
            raise ConfigError("objective.lora_targets are for a LoRA student: set objective.lora_rank (method lcm_lora)")
        if not 0 <= self.target_ema < 1:
            raise ConfigError(f"objective.target_ema must be in [0, 1), not {self.target_ema}")
        if self.student_steps < 1 or self.student_steps > self.num_ddim_timesteps:
            raise ConfigError(f"objective.student_steps must be in 1..num_ddim_timesteps, not {self.student_steps}")
        if self.sample_timesteps is not None:
            ts = self.sample_timesteps
            if len(ts) != self.student_steps or any(b >= a for a, b in zip(ts, ts[1:])):
                raise ConfigError(f"objective.sample_timesteps must be objective.student_steps={self.student_steps} "
                                  f"decreasing timesteps, not {ts}: set student_steps to their number")
        if not 0 <= self.tcd_gamma <= 1:
            raise ConfigError(f"objective.tcd_gamma is TCD's gamma and must be in [0, 1], not {self.tcd_gamma}")
        if self.adv_weight < 0 or self.disc_width < 1 or self.disc_downsamplings < 1:
            raise ConfigError("objective.adv_weight must be >= 0, disc_width and disc_downsamplings >= 1")


# ------------------------------------------------------------------------------------------------ objective
@register
class ConsistencyObjective(Objective):
    """LCM on the one loop: one phase (``student``); the EMA target network is updated after each step and
    checkpointed with the run (``state_modules``)."""

    name = "lcm"
    Config = ConsistencyConfig
    ema_module = "student"
    state_modules = ("target",)

    def __init__(self, config: ConsistencyConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int, source_resolution: int | None = None):
        super().__init__(config)
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.schedule = teacher.schedule
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        # image-conditioned teachers take a source image (super-resolution: its low-resolution version) on channels
        self.source_channels = in_channels(teacher.backbone) - channels
        self.source_resolution = source_resolution
        self.null_cond = teacher.null_cond
        self.embeds_guidance = config.guidance_range is not None and config.embed_guidance
        if config.lora_rank and self.embeds_guidance:
            raise ConfigError("LCM-LoRA trains no guidance embedding (the drawn CFG scale is only the teacher's): "
                              "set objective.embed_guidance=false")
        if self.embeds_guidance:
            self.student = add_guidance_embedding(teacher, config.guidance_embedding_dim)
        elif config.lora_rank:
            try:
                self.student = trainable_copy(teacher, config.lora_rank, config.lora_targets)
            except ValueError as exc:
                raise ConfigError(f"objective.lora_targets: {exc}") from None
        else:
            self.student = teacher.clone(trainable=True)
        self.target = self._make_target()
        self.discriminator = (PatchDiscriminator(channels, self.source_channels, config.disc_width,
                                                 config.disc_downsamplings) if config.adv_weight > 0 else None)
        total = self.schedule.num_train_timesteps
        guidance = float(sum(config.guidance_range) / 2) if self.embeds_guidance else 1.0
        if self.schedule.kind == "flow":
            # flow teachers: the grid is N points of the teacher's shifted sigma schedule; the consistency function
            # is the x0 prediction x - sigma u itself (it equals x at sigma = 0); exported with FlowMatchLCMScheduler
            if config.sample_timesteps is not None or config.sampler == "tcd":
                raise ConfigError("objective.sample_timesteps and sampler: tcd are for VP (DDPM-type) teachers; a "
                                  "flow student samples with FlowMatchLCMScheduler on its sigma grid "
                                  "(num_ddim_timesteps, student_steps)")
            n = config.num_ddim_timesteps
            sigmas = self.schedule.shift_sigma(torch.arange(1, n + 1, dtype=torch.float64) / n)
            self.grid = (sigmas * total).tolist()
            self.grid_prev = [0.0] + self.grid[:-1]
            self.recipe = get_recipe("flow_lcm", config.student_steps, guidance)
        else:
            if total % config.num_ddim_timesteps:
                raise ConfigError(f"objective.num_ddim_timesteps={config.num_ddim_timesteps} does not divide the "
                                  f"teacher's {total} training timesteps into equal skips")
            self.grid = lcm_grid(total, config.num_ddim_timesteps)
            skip = total // config.num_ddim_timesteps
            self.grid_prev = [max(t - skip, 0) for t in self.grid]
            off_grid = sorted(set(config.sample_timesteps or ()) - set(self.grid))
            if off_grid:
                raise ConfigError(f"objective.sample_timesteps {off_grid} are not on the solver grid the student is "
                                  f"trained at ({self.grid[0]}, {self.grid[1]}, ..., {self.grid[-1]})")
            # exported with LCMScheduler (or TCDScheduler) on the training grid; a guidance-embedded student is
            # called at the middle of its trained range unless the user asks for another scale
            tcd = config.sampler == "tcd"  # (tscd's ddim_trailing is its own stage_recipe's)
            self.recipe = get_recipe("tcd" if tcd else "lcm", config.student_steps, guidance,
                                     timesteps=config.sample_timesteps,
                                     custom_scheduler=config.sample_timesteps is not None and not tcd,
                                     eta=config.tcd_gamma if tcd else None,
                                     original_inference_steps=config.num_ddim_timesteps,
                                     timestep_scaling=config.timestep_scaling)

    def f(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The consistency function from a network's x0 prediction: LCM's boundary form (VP), x0 itself (flow)."""
        if self.schedule.kind == "flow":
            return x0.float()
        return consistency_function(x_t, x0, t, self.config.timestep_scaling)

    def grid_pair(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random grid timesteps ``t_{n+k}`` and the grid point one teacher step below each, ``t_n``."""
        index = torch.randint(0, len(self.grid), (n,), device=device)
        t = torch.as_tensor(self.grid, device=device, dtype=torch.float32)[index]
        return t, torch.as_tensor(self.grid_prev, device=device, dtype=torch.float32)[index]

    def _make_target(self) -> Denoiser | None:
        return self.student.clone(trainable=False).freeze()

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def phases(cls, config):
        return [Phase("student", ("student",))] + (
            [Phase("discriminator", ("discriminator",))] if config.adv_weight > 0 else [])

    @classmethod
    def optim_defaults(cls, config):
        return {"student": {"lr": 1e-6, "max_grad_norm": 1.0, "lr_schedule": "constant_with_warmup",
                            "warmup_steps": 500},
                "discriminator": {"lr": 2e-4, "betas": (0.5, 0.999), "max_grad_norm": 10.0, "lr_schedule": "constant"}}

    @classmethod
    def from_config(cls, run, data=None) -> "ConsistencyObjective":
        loaded = load_model(run.model)
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
        if data is None or len(data) == 0 or "image" not in data[0]:
            raise ConfigError("consistency distillation noises data samples: set data.dataset to digits, folder, or "
                              "prompts from a .jsonl naming an image per prompt")
        channels = data[0]["image"].shape[0]
        source_channels(in_channels(loaded.denoiser.backbone), channels, data, run.train.sample_every)
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        if not unwrap(loaded.denoiser.backbone).config.get("num_class_embeds"):
            num_classes = None  # the data's labels mean nothing to a backbone without class embeddings
        fingerprint = teacher_fingerprint(loaded.denoiser)
        objective = cls(run.objective, loaded.denoiser, loaded.scheduler, num_classes, run.data.resolution, channels,
                        run.data.source_resolution)
        objective.teacher_fingerprint = fingerprint
        objective.teacher_source = run.model.source
        if run.objective.student_init:
            objective.init_student(run.objective.student_init)
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder
        return objective

    def init_student(self, source: str) -> None:
        if self.config.lora_rank:
            raise ConfigError("objective.student_init loads full weights; a LoRA student starts from the teacher")
        init_generator(self.student, source, "objective.student_init", self.teacher_fingerprint,
                       getattr(self, "teacher_source", ""))
        if self.target is not None:
            self.target.load_state_dict(self.student.state_dict())

    # --- the loss ------------------------------------------------------------------------------------
    def _guidance(self, n: int, device) -> torch.Tensor | None:
        lo_hi = self.config.guidance_range
        if lo_hi is None:
            return None
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, device=device)

    def _student_cond(self, cond: Cond, scale: torch.Tensor | None) -> Cond:
        return replace(cond, guidance=scale) if scale is not None and self.embeds_guidance else cond

    def _batch_cond(self, batch) -> Cond:
        cond = Cond.from_batch(batch)
        if self.num_classes is None:
            cond.class_labels = None
        return cond

    def loss(self, phase, batch, step):
        if phase == "discriminator":
            return self.discriminator_loss(batch)
        cfg = self.config
        x0 = batch["image"]
        n, device = x0.shape[0], x0.device
        cond = self._batch_cond(batch)
        t, t_prev = self.grid_pair(n, device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        scale = self._guidance(n, device)
        student_cond = self._student_cond(cond, scale)
        pred = self.f(x_t, self.student(x_t, t, student_cond), t)
        with torch.no_grad():
            guidance = scale if scale is not None else cfg.guidance_scale
            x_prev = self.teacher_step(x_t, t, t_prev, cond, guidance)
            target_net = self.student if self.target is None else self.target
            target = self.f(x_prev, target_net(x_prev, t_prev, student_cond), t_prev)
        loss = consistency_loss(pred, target, cfg.loss, cfg.huber_c)
        logs = {"consistency": loss.detach()}
        if self.discriminator is not None:
            logs["adv"] = gan_generator_loss(self.discriminator(pred, cond.image))
            loss = loss + cfg.adv_weight * logs["adv"]
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, batch):
        """``softplus(D(f)) + softplus(-D(x0))``: the student's output at a random grid timestep (no grad) against
        the real images, each with its source image."""
        real = batch["image"]
        cond = self._batch_cond(batch)
        t, _ = self.grid_pair(real.shape[0], real.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(real, torch.randn_like(real), t)
            student_cond = self._student_cond(cond, self._guidance(real.shape[0], real.device))
            fake = self.f(x_t, self.student(x_t, t, student_cond), t)
        loss = gan_discriminator_loss(self.discriminator(real, cond.image), self.discriminator(fake, cond.image))
        return loss, {"disc": loss.detach()}

    def teacher_step(self, x_t, t, t_prev, cond, guidance):
        """The teacher's solver from ``t`` to ``t_prev`` with CFG, in ``solver_substeps`` equal sub-steps (DDIM
        with ``solver_eta``: an SDE solver for SCott). The teacher of a LoRA student is the frozen base: the teacher
        Denoiser holds those weights without adapters."""
        cfg = self.config

        def x0(x, tt):
            return self.teacher(x, tt, cond, guidance_scale=guidance)

        x = x_t
        m = cfg.solver_substeps
        for j in range(m):
            start, end = t + (t_prev - t) * j / m, t + (t_prev - t) * (j + 1) / m
            if cfg.solver == "ddim":
                x = ddim_from_x0(x0(x, start), x, self.schedule, start, end, cfg.solver_eta)
            else:
                x = solver_step(cfg.solver, x0, self.schedule, x, start, end)
        return x

    def after_step(self, phase, step):
        if phase == "student" and self.target is not None:
            ema_update(self.target, unwrap(self.student), self.config.target_ema)

    # --- sampling and export -----------------------------------------------------------------------
    def _sample_inputs(self, n: int, generator=None) -> tuple[torch.Tensor, Cond]:
        """Noise and the student's condition for sample grids (classes 0, 1, ...; the empty prompt; the
        recipe's guidance for an embedded student)."""
        device = self.device
        cond = (Cond(class_labels=torch.arange(n, device=device) % self.num_classes) if self.num_classes
                else (self.null_cond.to(device).repeat(n) if self.null_cond is not None else Cond()))
        scale = torch.full((n,), self.recipe.guidance_scale, device=device) if self.embeds_guidance else None
        x = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        return x, self._student_cond(cond, scale)

    @torch.no_grad()
    def sample(self, batch, generator=None):
        """The exported scheduler's sampling: x0 from the consistency function, then fresh noise to the next step —
        the ``lcm`` step rule (flow: ``flow_lcm``) on the teacher's schedule (``sampler: tcd``: TCDScheduler's)."""
        x, cond = self._sample_inputs(batch["batch_size"], generator)
        if self.recipe.sampler == "tcd":
            return self.sample_tcd(x, cond, generator)
        flow = self.schedule.kind == "flow"
        rule = step_rule("flow_lcm" if flow else "lcm")
        params = {} if flow else {"timestep_scaling": self.config.timestep_scaling}
        levels = ScheduleLevels(self.schedule, x)
        ts = self.sample_timesteps()
        for i, t in enumerate(ts):
            x0 = self.student(x, torch.full((x.shape[0],), float(t), device=x.device), cond)
            t_next = float(ts[i + 1]) if i < len(ts) - 1 else None
            x = rule(x, x0, float(t), t_next, levels, None if t_next is None else torch.randn_like(x0), **params)
        return x.clamp(-1, 1)

    def sample_tcd(self, x: torch.Tensor, cond: Cond, generator=None) -> torch.Tensor:
        scheduler = self.recipe.make_scheduler(self.teacher_scheduler, self.student.prediction_type)
        return sample_student(self.student, scheduler, x, self.recipe.num_inference_steps, cond,
                              generator=generator, eta=self.recipe.eta).clamp(-1, 1)

    def sample_timesteps(self) -> list[float]:
        scheduler = self.recipe.make_scheduler(self.teacher_scheduler, self.student.prediction_type)
        return student_timesteps(scheduler, self.recipe.num_inference_steps)

    def save_pretrained(self, directory):
        save_model(self.student, self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, "student_steps": self.config.student_steps, **self._meta()})

    def _meta(self) -> dict:
        meta = {"resolution": self.resolution, "channels": self.channels}
        return meta | ({"source_resolution": self.source_resolution} if self.source_channels else {})

    def export_spec(self):
        return ExportSpec(student=self.student, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.sample_timesteps(),
                          base_folder=getattr(self, "base_folder", None), meta=self._meta())


@dataclass
class LCMLoRAConfig(ConsistencyConfig):
    lora_rank: int = 64  # LCM-LoRA's rank (alpha = rank)
    target_ema: float = 0.0  # LCM-LoRA has no target network; > 0: an EMA copy of the adapters (the base is shared)
    embed_guidance: bool = False  # no guidance embedding: the drawn scale is the teacher's alone


@register
class LCMLoRAObjective(ConsistencyObjective):
    """LCM-LoRA: the student is LoRA on the frozen teacher (which is the same weights with the adapters off);
    no target network — the target is the student itself under no grad (Diffusers' LCM-LoRA scripts) — unless
    ``target_ema`` > 0 asks for an EMA target of the adapters, as full LCM has."""

    name = "lcm_lora"
    Config = LCMLoRAConfig

    def __init__(self, config: ConsistencyConfig, *args, **kwargs):
        if not config.lora_rank:
            raise ConfigError("method lcm_lora needs objective.lora_rank (LCM-LoRA: 64)")
        super().__init__(config, *args, **kwargs)
        self.state_modules = ("target",) if self.target is not None else ()

    def _make_target(self):
        if not self.config.target_ema:
            return None
        return self.student.clone(trainable=False, share_weights="base").freeze()
