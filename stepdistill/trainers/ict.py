"""Improved consistency training (iCT; Song & Dhariwal 2023, "Improved techniques for training consistency
models"): a consistency model trained from data alone — no teacher, no EMA target network.

Noise levels on the Karras grid ``sigma_i`` (sigma_min 0.002, sigma_max 80, rho 7) with N(k) points growing
by the curriculum; index ``i`` drawn from the discretised lognormal (P_mean -1.1, P_std 2.0); the loss
``lambda(sigma_i) d(f(x + sigma_{i+1} z, sigma_{i+1}), sg(f(x + sigma_i z, sigma_i)))`` with
``lambda = 1 / (sigma_{i+1} - sigma_i)`` and the pseudo-Huber ``d(a, b) = sqrt(||a - b||^2 + c^2) - c`` over
each sample, ``c = 0.00054 sqrt(d)``. The target is the current weights under stop-gradient, with the student's
dropout mask when ``dropout > 0`` (iCT trains with dropout: 0.3 on CIFAR-10). The consistency
function uses EDM-style scalings with the boundary at sigma_min, exactly those of Diffusers'
``CMStochasticIterativeScheduler``, so the model exports as a stock ``ConsistencyModelPipeline``.

Differences from Diffusers' research script ``train_cm_ct_unconditional.py`` (methods.md 1.1), on purpose: the
pseudo-Huber is over each sample's norm as in the paper (the script's is elementwise), and ``c_in`` is
``1 / sqrt(sigma^2 + sigma_data^2)`` (EDM; the script omits the square root).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..models import load_model
from ..pipelines import export as ex
from .base import Objective, Phase
from .checkpoint import rng_state, set_rng_state
from .common import pseudo_huber
from .registry import register


# ------------------------------------------------------------------------------------------------ the math
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``sigma_i = (sigma_min^(1/rho) + i/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, increasing, float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def discretization_steps(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2 floor(s1/s0) + 1))``."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std))``,
    i = 0..N-2: the lognormal's mass between neighbouring grid points."""
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def cm_scalings(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)`` and the network's noise input ``c_noise = 1000 * 0.25 ln sigma`` (as
    ``CMStochasticIterativeScheduler``): f(x, sigma_min) = x."""
    sigma = sigma.double()
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    c_noise = 1000 * 0.25 * torch.log(sigma + 1e-44)
    return c_skip.float(), c_out.float(), c_in.float(), c_noise.float()


def ict_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, c: float) -> torch.Tensor:
    """``mean_b lambda_b (sqrt(||pred_b - sg(target_b)||^2 + c^2) - c)`` (iCT Eq. 5 with the pseudo-Huber metric over
    each sample, :func:`~stepdistill.trainers.common.pseudo_huber`; iCT's ``c = 0.00054 sqrt(d)``)."""
    return pseudo_huber(pred, target.detach(), c, per_sample=True, weight=weight)


class ConsistencyModel(torch.nn.Module):
    """``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` over a UNet2DModel ``F`` (class labels optional)."""

    def __init__(self, backbone: torch.nn.Module, sigma_min: float = 0.002, sigma_data: float = 0.5):
        super().__init__()
        self.backbone, self.sigma_min, self.sigma_data = backbone, sigma_min, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (v.to(x.device).view(-1, *([1] * (x.ndim - 1))) if i < 3 else v.to(x.device)
                                        for i, v in enumerate(cm_scalings(sigma, self.sigma_min, self.sigma_data)))
        labels = None if cond is None else cond.class_labels
        out = self.backbone(c_in * x, c_noise, class_labels=labels, return_dict=False)[0]
        return c_skip * x + c_out * out.float()


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ICTConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    s0: int = 10  # curriculum: N from s0 + 1 ...
    s1: int = 1280  # ... doubling to s1 + 1
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None  # None: 0.00054 sqrt(d), d = the data's dimension
    dropout: float = 0.0  # the UNet's dropout; student and target share one mask per step
    student_steps: int = 1  # the exported pipeline's default steps (it samples at any number)
    # the exported call's timesteps, student_steps of them, decreasing, on the final grid's 0..N-1 (timestep i is
    # sigma_(N-1-i): 0 is sigma_max); None: the scheduler's own pick. The model card's call passes them.
    sample_timesteps: list[int] | None = None

    def validate(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("objective.sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max")
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError("objective.s0 and s1 must satisfy 1 <= s0 <= s1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"objective.dropout must be in [0, 1), not {self.dropout}")
        ts = self.sample_timesteps
        if ts is not None and (len(ts) != self.student_steps or any(b >= a for a, b in zip(ts, ts[1:]))
                               or min(ts) < 0):
            raise ConfigError(f"objective.sample_timesteps must be objective.student_steps={self.student_steps} "
                              f"decreasing timesteps >= 0, not {ts}: set student_steps to their number")


# ------------------------------------------------------------------------------------------------ objective
@register
class ICTObjective(Objective):
    """iCT on the one loop: one phase, ``model``; the loop's EMA (``train.ema_decay``) is for evaluation only."""

    name = "ict"
    Config = ICTConfig
    ema_module = "model"

    def __init__(self, config: ICTConfig, backbone: torch.nn.Module, num_classes: int | None, resolution: int,
                 channels: int, total_steps: int):
        super().__init__(config)
        self.model = ConsistencyModel(backbone, config.sigma_min, config.sigma_data).requires_grad_(True)
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.total_steps = total_steps
        n_points = self.final_points()
        if config.sample_timesteps is not None and max(config.sample_timesteps) >= n_points:
            raise ConfigError(f"objective.sample_timesteps {config.sample_timesteps} must lie on the final grid's "
                              f"timesteps 0..{n_points - 1} (N = {n_points} after {total_steps} steps)")
        d = channels * resolution * resolution
        self.huber_c = config.huber_c if config.huber_c is not None else 0.00054 * math.sqrt(d)

    @classmethod
    def phases(cls, config):
        return [Phase("model", ("model",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"model": {"optimizer": "radam", "lr": 1e-4, "betas": [0.9, 0.995], "lr_schedule": "constant"}}

    @classmethod
    def from_config(cls, run, data=None) -> "ICTObjective":
        if data is None or len(data) == 0 or "image" not in data[0]:
            raise ConfigError("iCT trains on data: set data.dataset to digits or folder")
        base = unwrap(load_model(run.model).denoiser.backbone)
        if type(base).__name__ != "UNet2DModel":
            raise ConfigError(f"iCT here trains pixel-space UNet2DModel consistency models, not {type(base).__name__}")
        torch.manual_seed(run.train.seed)
        backbone = type(base).from_config(base.config, dropout=run.objective.dropout)  # no teacher weights
        num_classes = getattr(data, "num_classes", None) if base.config.get("num_class_embeds") else None
        return cls(run.objective, backbone, num_classes, run.data.resolution, data[0]["image"].shape[0],
                   run.train.max_steps)

    def loss(self, phase, batch, step):
        cfg = self.config
        x = batch["image"]
        n_points = discretization_steps(step, self.total_steps, cfg.s0, cfg.s1)
        sigmas = karras_sigmas(n_points, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        probs = lognormal_index_probs(sigmas, cfg.p_mean, cfg.p_std)
        i = torch.multinomial(probs, x.shape[0], replacement=True)
        s_lo, s_hi = sigmas[i].to(x.device), sigmas[i + 1].to(x.device)
        z = torch.randn_like(x)
        cond = Cond.from_batch(batch)
        shape = (-1,) + (1,) * (x.ndim - 1)
        rng = rng_state()
        pred = self.model(x + s_hi.float().view(shape) * z, s_hi, cond)
        with torch.no_grad():  # the target: the same weights and dropout mask, one grid point lower, stop-gradient
            set_rng_state(rng)
            target = self.model(x + s_lo.float().view(shape) * z, s_lo, cond)
        loss = ict_loss(pred, target, 1.0 / (s_hi - s_lo), self.huber_c)
        return loss, {"ict": loss.detach(), "N": torch.tensor(float(n_points))}

    # --- sampling and export -----------------------------------------------------------------------
    def final_points(self) -> int:
        return discretization_steps(max(0, self.total_steps - 1), self.total_steps, self.config.s0, self.config.s1)

    def scheduler(self):
        from diffusers import CMStochasticIterativeScheduler

        cfg = self.config
        return CMStochasticIterativeScheduler(num_train_timesteps=self.final_points(), sigma_min=cfg.sigma_min,
                                              sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data, rho=cfg.rho)

    @torch.no_grad()
    def sample(self, batch, generator=None, steps: int | None = None):
        """Multistep consistency sampling exactly as ``ConsistencyModelPipeline`` runs it."""
        n, device = batch["batch_size"], self.device
        sched = self.scheduler()
        if steps in (None, self.config.student_steps) and self.config.sample_timesteps is not None:
            sched.set_timesteps(timesteps=self.config.sample_timesteps)
        else:
            sched.set_timesteps(steps or self.config.student_steps)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        x = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        x = x * sched.init_noise_sigma
        backbone = unwrap(self.model).backbone
        for t in sched.timesteps:
            scaled = sched.scale_model_input(x, t)
            out = backbone(scaled, t, class_labels=labels, return_dict=False)[0]
            x = sched.step(out, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)

    def save_pretrained(self, directory):
        unwrap(self.model).backbone.save_pretrained(Path(directory) / "unet")
        self.scheduler().save_pretrained(Path(directory) / "scheduler")

    def export_spec(self):
        return ICTExport(self)



@dataclass
class ICTExport:
    """A stock ``ConsistencyModelPipeline`` folder: the UNet and ``CMStochasticIterativeScheduler`` on the final
    grid of the curriculum; plain Diffusers loads it. (``student``, ``meta``, ``metrics``, ``training_steps`` and
    ``config`` are what ``export_run`` fills in, as for an ExportSpec.)"""

    objective: ICTObjective
    meta: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training_steps: int | None = None
    config: object = None

    @property
    def student(self) -> torch.nn.Module:
        return self.objective.model

    def export_to(self, out_dir, *, overwrite: bool = False, variants=(), lora_format=None, **_ignored) -> Path:
        from diffusers import ConsistencyModelPipeline

        if variants or lora_format not in (None, "fused"):
            raise ex.ExportError("iCT exports write full float32 weights (no variants, no LoRA)")
        o = self.objective
        out_dir = Path(out_dir).expanduser().resolve()
        tmp = ex.prepare_folder(out_dir, overwrite)
        try:
            pipe = ConsistencyModelPipeline(unet=unwrap(o.model).backbone, scheduler=o.scheduler())
            with ex.quiet_diffusers():
                pipe.save_pretrained(tmp, safe_serialization=True)
            steps, timesteps = o.config.student_steps, o.config.sample_timesteps
            kwargs = {"num_inference_steps": steps} if timesteps is None else {"num_inference_steps": None,
                                                                               "timesteps": list(timesteps)}
            call = {"input": "class_labels" if o.num_classes else "batch_size", "kwargs": kwargs}
            meta = {"num_inference_steps": steps, "timesteps": timesteps, "num_classes": o.num_classes,
                    "resolution": o.resolution, "channels": o.channels,
                    "export": {"pipeline": "ConsistencyModelPipeline", "needs_stepdistill": False,
                               "trust_remote_code": False, "method": o.name, "call": call,
                               "training_steps": self.training_steps, "metrics": self.metrics,
                               "checkpoint": self.meta.get("checkpoint"), "ema": self.meta.get("ema"),
                               "scheduler": "CMStochasticIterativeScheduler",
                               "scheduler_config": dict(pipe.scheduler.config), "num_inference_steps": steps,
                               "timesteps": timesteps}}
            (tmp / ex.META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
            labels = "batch_size=3, class_labels=[0, 1, 2], " if o.num_classes else "batch_size=3, "
            steps_arg = (f"num_inference_steps={steps}" if timesteps is None
                         else f"num_inference_steps=None, timesteps={list(timesteps)}")
            (tmp / "README.md").write_text(
                "---\nlibrary_name: diffusers\n" + ("tags: [stepdistill, consistency-model, ict, class-conditional, "
                                                       "image-generation]" if o.num_classes else
                                                       "pipeline_tag: unconditional-image-generation\ntags: [stepdistill, "
                                                       "consistency-model, ict]") + "\n---\n\n# iCT consistency model\n\nTrained by stepdistill's `ict` (improved "
                "consistency training, Song & Dhariwal 2023) from data alone. Stock Diffusers:\n\n```python\n"
                "from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained(\"PATH\")  # "
                f"ConsistencyModelPipeline\nimages = pipe({labels}{steps_arg}).images\n```\n\nIt samples at any "
                "number of steps (`num_inference_steps=1`, 2, 4, ...).\n")
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ex.publish_folder(tmp, out_dir)
        return out_dir
