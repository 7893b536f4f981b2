"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.2-2.3; gnobitab/RectifiedFlow ``losses.py``), its
distillation into few-step students, and the improved reflow of rfpp (Lee et al. 2024, "Improving the Training of
Rectified Flows"; sangyun884/rfpp ``train.py``, ``t_dist.py``).

A k-rectified flow's ODE couples noise with images, ``(z, x0)`` pairs from ``stepdistill make-pairs`` (of a flow
teacher, a reflow run or an export); the (k+1)-RF is the previous flow's weights trained on the straight
interpolations of those pairs,

    x_sigma = (1 - sigma) x0 + sigma z,    min E || u(x_sigma, sigma) - (z - x0) ||^2       (RF Eq. 1)

Time: Diffusers' flow convention everywhere here (sigma = 1 noise, velocity ``u = z - x0``, backbone timestep
``1000 sigma``). RectifiedFlow, InstaFlow and SlimFlow write ``X_t = t X_1 + (1 - t) X_0`` with ``X_0`` the noise:
``sigma = 1 - t`` and their ``v = -u``; rfpp writes ``z_t = (1 - t) x + t z``: ``sigma = t``. A recipe's times are
read in its paper's convention (``time_convention``, ``t_min``/``t_max``) and converted once, by
:func:`paper_sigma`, where the config is read; the losses below only ever see sigma.

Distillation is RectifiedFlow's same loss restricted to the student's K Euler times (its ``reflow_t_schedule``
``t0`` for K = 1, an integer k otherwise): at sigma = 1 the student's one step ``z - u(z, 1)`` is compared with the
pair's image (L2 on the velocity equals L2 on the images there; or LPIPS on the images). So one objective serves
both, and :class:`RectifiedFlowDistillObjective` (``rf_distill``) is the same loss with its time fixed to the
student's grid: two methods rather than a ``stage`` switch because they are separate runs with different inputs
(the distillation starts from a finished k-RF, usually with LPIPS) and a stage switch would admit a "distillation"
trained at every time. InstaFlow and SlimFlow, each one paper with two stages, subclass this with a ``stage``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones import in_channels, sample_size, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..lpips import LPIPSError, load_lpips, lpips_per_sample
from ..models import LoadedModel, load_model, pipeline_folder, save_model, text_null_cond
from ..pipelines.recipes import ExportError, get_recipe
from ..pipelines.sampling import sample_student, student_timesteps
from ..pipelines.spec import ExportSpec, export_scheduler, pipeline_for
from ..schedule import NoiseSchedule
from .base import Objective, Phase
from .common import check_teacher, init_generator, teacher_fingerprint
from .registry import register

TIME_CONVENTIONS = {"rectified_flow": "t = 0 noise, t = 1 data: sigma = 1 - t (RectifiedFlow, InstaFlow, SlimFlow)",
                    "rfpp": "t = 1 noise: sigma = t (rfpp)"}
RFPP_HUBER = 0.00054  # rfpp's pseudo-Huber constant per data dimension: c = 0.00054 d


# ------------------------------------------------------------------------------------------------ time
def paper_sigma(t, convention: str):
    """Diffusers' sigma of a paper's time ``t``: ``1 - t`` for RectifiedFlow/InstaFlow/SlimFlow (t = 0 is noise),
    ``t`` for rfpp (t = 1 is noise). Works on numbers and tensors."""
    if convention == "rectified_flow":
        return 1 - t
    if convention == "rfpp":
        return t
    raise ConfigError(f"unknown time convention {convention!r}; choose one of {', '.join(TIME_CONVENTIONS)}")


def u_shaped_pdf(sigma: torch.Tensor, a: float) -> torch.Tensor:
    """rfpp's U-shaped time density (``t_dist.py``: draws from ``p(t) ~ exp(a t)`` on [0, 1] concatenated with their
    mirror ``1 - t``): ``p(t) = a (e^{a t} + e^{a (1 - t)}) / (2 (e^a - 1))``. Symmetric, so the same in sigma."""
    return a * (torch.exp(a * sigma) + torch.exp(a * (1 - sigma))) / (2 * math.expm1(a))


# ------------------------------------------------------------------------------------------------ losses
def reflow_target(noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path from ``x0`` to ``noise``, ``u = z - x0`` (RF Eq. 1's ``X_1 - X_0`` with the
    sign of Diffusers' convention)."""
    return noise - x0


def x0_of(x_t: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The image one Euler step from ``x_t`` at ``sigma`` to 0 reaches: ``x_t - sigma u`` (RF's ``z0 + v(z0, 0)`` at
    sigma = 1)."""
    return x_t - sigma.reshape(-1, *([1] * (x_t.ndim - 1))) * u


def rfpp_huber_c(d: int) -> float:
    """rfpp's constant ``c = 0.00054 d`` with ``d = C H W`` (not sqrt(d) as iCT)."""
    return RFPP_HUBER * d


def rfpp_pseudo_huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """rfpp's per-sample pseudo-Huber (``train.py``, ``--loss_type huber``):
    ``(sqrt(||pred - target||^2 + c^2) - c) / d``, the norm over all of a sample's ``d = C H W`` values,
    ``c = 0.00054 d``; shape ``(B,)``."""
    d = pred[0].numel()
    c = rfpp_huber_c(d)
    sq = ((pred.float() - target.float()) ** 2).flatten(1).sum(1)
    return (torch.sqrt(sq + c * c) - c) / d


def lpips_huber(huber: torch.Tensor, lpips: torch.Tensor, sigma: torch.Tensor, divide_t: bool = False) -> torch.Tensor:
    """rfpp's LPIPS-Huber (``--loss_type lpips-huber``): ``(1 - t) huber + LPIPS(x0_hat, x0)`` per sample, where
    rfpp's ``t`` (1 = noise) is sigma: the Huber term fades out towards pure noise, where LPIPS carries the loss.
    ``divide_t`` (``--lpips_divt``, its CIFAR-10 config F): ``(1 - t) huber + LPIPS / t``."""
    return (1 - sigma) * huber + (lpips / sigma if divide_t else lpips)


def flow_guided_point(z: torch.Tensor, u_student: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SlimFlow's point on the student's one-step path (``teacher_loss_new``): ``x_{t'} = z + t' sg(v_s)`` in its
    time, i.e. ``z - (1 - sigma') sg(u_s)`` in sigma (``sigma' = 1 - t'``, ``u = -v``)."""
    return z - (1 - sigma).reshape(-1, *([1] * (z.ndim - 1))) * u_student.detach()


def flow_guided_target(x_sigma: torch.Tensor, u_teacher: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SlimFlow's target image ``x1 = x_{t'} + (1 - t') v_T(x_{t'}, t')``: the teacher's Euler step from the
    student's point to the data, ``x_sigma - sigma u_T`` in sigma."""
    return x0_of(x_sigma, u_teacher, sigma)


DISTANCES = ("mse", "pseudo_huber", "lpips", "lpips_huber", "lpips_mse")


def reflow_distance(u_pred, u_target, x_t, sigma, kind: str, lpips_fn=None, divide_t: bool = False) -> torch.Tensor:
    """The per-sample loss ``(B,)`` between a predicted and a target velocity at ``(x_t, sigma)``:

    - ``mse``: ``mean (u - u*)^2`` (RectifiedFlow's ``l2``, reduce_mean);
    - ``pseudo_huber``: :func:`rfpp_pseudo_huber` (rfpp's ``huber``);
    - ``lpips``: ``LPIPS(x0_hat, x0*)`` of the images one Euler step reaches (:func:`x0_of`; RectifiedFlow's
      ``lpips``, SlimFlow's distillation);
    - ``lpips_huber``: :func:`lpips_huber` (rfpp); ``lpips_mse``: ``LPIPS + mse`` (RectifiedFlow's ``lpips+l2``).

    ``divide_t``: rfpp's ``--lpips_divt``, the LPIPS term divided by its t (= sigma) in ``lpips`` and ``lpips_huber``.
    """
    if kind == "mse":
        return ((u_pred.float() - u_target.float()) ** 2).flatten(1).mean(1)
    if kind == "pseudo_huber":
        return rfpp_pseudo_huber(u_pred, u_target)
    perceptual = lpips_fn(x0_of(x_t, u_pred, sigma), x0_of(x_t, u_target, sigma))
    if kind == "lpips":
        return perceptual / sigma if divide_t else perceptual
    if kind == "lpips_huber":
        return lpips_huber(rfpp_pseudo_huber(u_pred, u_target), perceptual, sigma, divide_t)
    if kind == "lpips_mse":
        return perceptual + ((u_pred.float() - u_target.float()) ** 2).flatten(1).mean(1)
    raise ValueError(f"unknown distance {kind!r}; expected one of {DISTANCES}")


# ------------------------------------------------------------------------------------------------ the student
def flow_scheduler(num_train_timesteps: int = 1000):
    """The scheduler a reflow student is trained, sampled and exported on: ``FlowMatchEulerDiscreteScheduler`` with
    shift 1 (a rectified flow's Euler grid is uniform), whatever the initial model's schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)


def as_flow(model: Denoiser, scheduler) -> Denoiser:
    """``model``'s backbone as a flow-velocity Denoiser on ``scheduler``'s schedule (sharing the backbone). A
    diffusion (VP) model becomes the initialisation of a rectified flow called at ``1000 sigma`` as InstaFlow's
    2-RF of SD 1.5 was: its timestep ~1000 is noise, its ~0 data, and reflow teaches it the velocity."""
    return Denoiser(model.backbone, NoiseSchedule.from_scheduler(scheduler), "flow", null_cond=model.null_cond,
                    null_class=model.null_class)


def check_pairs(data, model: Denoiser, fingerprint: str, run) -> dict:
    """The pairs of this run, checked against its initial model: made by it (the manifest's weights), of its
    channels and of ``data.resolution``, with conditions it takes. Returns the manifest; a ConfigError naming the
    fix otherwise."""
    if data is None or len(data) == 0 or "noise" not in data[0]:
        raise ConfigError(f"method {run.method} trains on (noise, image) pairs of the flow it straightens: run "
                          f"`stepdistill make-pairs --teacher {run.model.source or 'MODEL'} --out DIR` and set "
                          "data.dataset=pairs, data.path=DIR")
    manifest = getattr(data, "manifest", None) or {}
    made_by = {"source": (manifest.get("teacher") or {}).get("source"), "fingerprint": manifest.get("teacher_weights")}
    check_teacher(made_by, fingerprint, f"the pairs in {run.data.path}", run.model.source)
    backbone = unwrap(model.backbone)
    shape = tuple(data[0]["noise"].shape)
    want = (in_channels(backbone), run.data.resolution, run.data.resolution)
    if shape != want:
        raise ConfigError(f"the pairs in {run.data.path} are {shape[0]}x{shape[1]}x{shape[2]} (CxHxW) but the model "
                          f"takes {want[0]} channels and data.resolution is {want[1]}: make the pairs from this "
                          "model (make-pairs --teacher model.source) or set data.resolution to the pairs' size")
    size = sample_size(backbone)
    if size and size != shape[-1] and type(backbone).__name__ == "UNet2DModel":
        raise ConfigError(f"the pairs are {shape[-1]}x{shape[-1]} but {model.family} has sample_size={size}")
    embeds = backbone.config.get("num_class_embeds")
    if "class_label" in data[0] and not embeds:
        raise ConfigError(f"the pairs in {run.data.path} carry class labels but the model takes none "
                          "(num_class_embeds is not set): make unconditional pairs or use a class-conditional model")
    if embeds and manifest.get("num_classes") and manifest["num_classes"] > embeds:
        raise ConfigError(f"the pairs have {manifest['num_classes']} classes but the model embeds {embeds}")
    return manifest


# ------------------------------------------------------------------------------------------------ the method
@dataclass
class ReflowConfig:
    """Reflow on teacher pairs: times, distance, the student's Euler steps (see the module docstring)."""

    # the training times: uniform (RectifiedFlow's reflow), u_shaped (rfpp, parameter u_shape_a) or grid (the
    # student's own K Euler times: distillation, RectifiedFlow's t0 / k schedules)
    t_dist: Literal["uniform", "u_shaped", "grid"] = "uniform"
    u_shape_a: float = 4.0  # rfpp's --a (its README runs use 4; its default 2)
    # the range of t in the paper's own time: rectified_flow (t = 0 noise; RectifiedFlow's t ~ U[eps, 1], eps 1e-3)
    # or rfpp (t = 1 noise; rfpp rescales to [1e-5, 1 - 1e-5]); converted to sigma once (paper_sigma)
    time_convention: Literal["rectified_flow", "rfpp"] = "rectified_flow"
    t_min: float = 1e-3
    t_max: float = 1.0
    distance: Literal["mse", "pseudo_huber", "lpips", "lpips_huber", "lpips_mse"] = "mse"
    lpips_weights: str | None = None  # torchvision's VGG16 weights file for the lpips distances (nothing downloaded)
    lpips_size: int | None = None  # resize before LPIPS (rfpp: 224); None: images below 32 px go to 32
    lpips_divt: bool = False  # rfpp's --lpips_divt: the LPIPS term over t (= sigma; its CIFAR-10 config F)
    student_steps: int = 4  # K: the Euler steps the student samples and is exported with (t_dist grid: trained at)
    # the student's weights from another run or folder of the same architecture instead of model.source's
    student_init: str | None = None

    def validate(self):
        if self.student_steps < 1:
            raise ConfigError(f"objective.student_steps must be >= 1, not {self.student_steps}")
        if self.u_shape_a <= 0:
            raise ConfigError(f"objective.u_shape_a must be > 0 (rfpp uses 4), not {self.u_shape_a}")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ConfigError(f"objective.t_min/t_max must satisfy 0 <= t_min < t_max <= 1 (times in the "
                              f"{self.time_convention} convention), not {self.t_min}, {self.t_max}")
        if self.lpips_divt and self.distance not in ("lpips", "lpips_huber"):
            raise ConfigError("objective.lpips_divt divides the LPIPS term by t: use it with distance lpips or "
                              "lpips_huber")
        if self.lpips_divt and self.t_dist != "grid" and self.sigma_range()[0] <= 0:
            raise ConfigError("objective.lpips_divt divides by sigma: keep the times off sigma = 0 (rfpp: t in "
                              "[1e-5, 1 - 1e-5] with time_convention rfpp)")
        if self.distance.startswith("lpips") and not self.lpips_weights:
            raise ConfigError(f"objective.distance={self.distance} needs objective.lpips_weights=PATH (torchvision's "
                              "VGG16 weights, e.g. vgg16-397923af.pth; nothing is downloaded); or use mse or "
                              "pseudo_huber")

    def sigma_range(self) -> tuple[float, float]:
        """[t_min, t_max] of the paper's time as a sigma interval (:func:`paper_sigma`)."""
        a, b = paper_sigma(self.t_min, self.time_convention), paper_sigma(self.t_max, self.time_convention)
        return min(a, b), max(a, b)


@register
class ReflowObjective(Objective):
    """k-RF -> (k+1)-RF on pairs of the k-RF (``model.source``: a flow teacher, a reflow run, an export; a diffusion
    model is turned into a flow, :func:`as_flow`). One phase, ``student``, initialised from ``model.source``'s
    weights (or ``student_init``); exported as a flow_euler pipeline at ``student_steps`` uniform Euler steps."""

    name = "reflow"
    Config = ReflowConfig
    ema_module = "student"

    def __init__(self, config: ReflowConfig, student: Denoiser, scheduler, num_classes: int | None, resolution: int,
                 channels: int):
        super().__init__(config)
        self.student = student.requires_grad_(True).eval()
        self.scheduler = scheduler  # FlowMatchEulerDiscreteScheduler, shift 1
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.null_cond = student.null_cond
        self.lpips_net, self.base_folder, self.meta = None, None, {}
        self.recipe = get_recipe("flow_euler", config.student_steps, 1.0)
        try:
            self.pipeline = pipeline_for(student)
        except ExportError:
            self.pipeline = None
        self.export_scheduler = export_scheduler(student, self.recipe, scheduler, self.pipeline)
        self.timesteps = student_timesteps(self.export_scheduler, config.student_steps, self.pipeline)
        lo, hi = config.sigma_range()
        self.t_range = (lo * student.schedule.num_train_timesteps, hi * student.schedule.num_train_timesteps)

    @classmethod
    def phases(cls, config):
        return [Phase("student", ("student",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"student": {"lr": 2e-4, "warmup_steps": 0}}  # RectifiedFlow / rfpp / SlimFlow: lr 2e-4

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, run, data=None) -> "ReflowObjective":
        cfg = run.objective
        loaded = load_model(run.model)
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
        fingerprint = teacher_fingerprint(loaded.denoiser)
        manifest = check_pairs(data, loaded.denoiser, fingerprint, run)
        cls.check_initial(cfg, loaded)
        scheduler = flow_scheduler(loaded.denoiser.schedule.num_train_timesteps)
        student = cls.make_student(cfg, loaded, scheduler, run, fingerprint)
        num_classes = manifest.get("num_classes") or loaded.meta.get("num_classes")
        objective = cls(cfg, student, scheduler, num_classes, run.data.resolution, int(data[0]["noise"].shape[0]))
        objective.teacher_fingerprint = fingerprint
        objective.base_folder = pipeline_folder(loaded.folder) if loaded.folder is not None else None
        if cfg.distance.startswith("lpips"):
            try:
                objective.lpips_net = load_lpips(cfg.lpips_weights)
            except LPIPSError as exc:
                raise ConfigError(f"objective.lpips_weights: {exc}") from None
            if objective.channels not in (1, 3):
                raise ConfigError(f"LPIPS compares images; this model works on {objective.channels}-channel latents: "
                                  "use objective.distance=mse or pseudo_huber")
        objective.meta = {"initial_model": run.model.source, "pairs": {k: manifest.get(k) for k in
                          ("solver", "steps", "guidance_scale", "n")}}
        objective.setup(run, loaded)
        return objective

    @classmethod
    def check_initial(cls, cfg, loaded: LoadedModel) -> None:
        """Checks of the initial model beyond the pairs' (a ConfigError naming the fix)."""

    @classmethod
    def make_student(cls, cfg, loaded: LoadedModel, scheduler, run, fingerprint: str) -> Denoiser:
        """A trainable copy of the initial model as a flow (its weights, or ``student_init``'s)."""
        student = as_flow(loaded.denoiser, scheduler).clone(trainable=True)
        if cfg.student_init:
            init_generator(student, cfg.student_init, "objective.student_init", fingerprint, run.model.source)
        return student

    def setup(self, run, loaded: LoadedModel) -> None:
        """More networks or settings of a subclass (SlimFlow's guide), after construction."""

    # --- training -----------------------------------------------------------------------------------
    def draw_t(self, n: int, device) -> torch.Tensor:
        """Backbone timesteps ``1000 sigma``: uniform or U-shaped over the configured range, or the student's grid."""
        cfg = self.config
        if cfg.t_dist == "grid":
            return self.student.schedule.sample_t(n, "discrete", grid=self.timesteps, device=device)
        lo, hi = self.t_range
        if cfg.t_dist == "u_shaped":
            return self.student.schedule.sample_t(n, "u_shaped", t_min=lo, t_max=hi, a=cfg.u_shape_a, device=device)
        return (lo + (hi - lo) * torch.rand(n, dtype=torch.float64)).to(device=device, dtype=torch.float32)

    def pair(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (noise, image) pair to interpolate (SlimFlow mixes and flips it)."""
        return batch["noise"], batch["image"]

    def condition(self, batch: dict) -> Cond:
        cond = Cond.from_batch(batch)
        if self.num_classes is None:
            cond.class_labels = None
        return cond

    def distance(self, u_pred, u_target, x_t, t) -> torch.Tensor:
        sigma = t.float() / self.student.schedule.num_train_timesteps
        lpips_fn = (lambda a, b: lpips_per_sample(self.lpips_net, a, b, self.config.lpips_size)) \
            if self.lpips_net is not None else None
        return reflow_distance(u_pred, u_target, x_t, sigma, self.config.distance, lpips_fn, self.config.lpips_divt)

    def reflow_loss(self, batch: dict, step: int) -> torch.Tensor:
        noise, x0 = self.pair(batch, step)
        cond = self.condition(batch)
        t = self.draw_t(x0.shape[0], x0.device)
        x_t = self.student.schedule.add_noise(x0, noise, t)
        u = self.student(x_t, t, cond, output="flow")
        return self.distance(u, reflow_target(noise, x0), x_t.float(), t).mean()

    def loss(self, phase, batch, step):
        loss = self.reflow_loss(batch, step)
        return loss, {"reflow": loss.detach()}

    # --- sampling and export ------------------------------------------------------------------------
    def _sample_cond(self, batch: dict, n: int, device) -> Cond:
        given = Cond.from_batch(batch)
        if given.encoder_hidden_states is not None:
            return given[:n].to(device)
        if self.num_classes:
            return Cond(class_labels=torch.arange(n, device=device) % self.num_classes)
        if self.null_cond is not None:  # a text model without prompts at hand: the empty prompt
            return self.null_cond.to(device).repeat(n)
        return Cond()

    @torch.no_grad()
    def sample(self, batch, generator=None):
        n = batch["batch_size"]
        device = self.device
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        return sample_student(self.student, self.export_scheduler, noise, self.config.student_steps,
                              self._sample_cond(batch, n, device), pipeline=self.pipeline).clamp(-1, 1)

    def save_pretrained(self, directory):
        save_model(self.student, self.scheduler, directory,
                   {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                    "sample_steps": self.config.student_steps, "student_steps": self.config.student_steps,
                    "method": self.name})

    def export_spec(self):
        return ExportSpec(student=self.student, recipe=self.recipe, base_scheduler=self.scheduler, method=self.name,
                          base_folder=self.base_folder, num_classes=self.num_classes, timesteps=self.timesteps,
                          meta={"resolution": self.resolution, "channels": self.channels, **self.meta})


@dataclass
class RectifiedFlowDistillConfig(ReflowConfig):
    """Distillation of a k-RF into a K-step student: trained at its own K Euler times only."""

    t_dist: Literal["grid"] = "grid"
    student_steps: int = 1


@register
class RectifiedFlowDistillObjective(ReflowObjective):
    """RectifiedFlow's distillation (``reflow_t_schedule`` t0 / k): the k-RF (``model.source``, a flow: a reflow run,
    a flow teacher or its export) and its pairs; the student, initialised from it, learns to reach the pair's image
    in its K Euler steps (K = 1: ``z - u(z, 1) ~ x0``), L2 or LPIPS (``distance``)."""

    name = "rf_distill"
    Config = RectifiedFlowDistillConfig

    @classmethod
    def check_initial(cls, cfg, loaded: LoadedModel) -> None:
        if loaded.denoiser.schedule.kind != "flow":
            raise ConfigError("rf_distill distils a rectified flow, but model.source is a diffusion (VP) model: run "
                              "reflow on its pairs first and give that run (or a flow teacher) as model.source")
