"""How an exported student samples, written once in stepdistill's terms.

A K-step student is defined by the scheduler it is exported with: :func:`student_timesteps` gives the timesteps
that scheduler (with its saved config, inside the pipeline that will load it) runs for K steps — the ones the
student must be trained at — and :func:`sample_student` runs the student's :class:`~stepdistill.Denoiser`
through exactly the updates the pipeline's scheduler makes, so that trainers, evaluation and export agree on
what "the student's samples" are. The round-trip tests check that an exported pipeline gives the same pixels.

Updates, the step rules of :data:`stepdistill.solvers.STEP_RULES` (x_t = alpha_t x0 + sigma_t eps for VP;
x = (1 - s) x0 + s eps for flow):

- ``DDIMScheduler`` (eta = 0): ``x_prev = alpha_p x0 + sigma_p eps`` at ``prev = t - T // K`` (the scheduler's own
  rule, which is the next listed timestep only on even grids); ``prev < 0`` gives x0 (``set_alpha_to_one``).
- ``LCMScheduler`` (and :class:`~stepdistill.pipelines.schedulers.StudentLCMScheduler`): the boundary-condition
  output ``c_skip x + c_out x0`` (``c_skip = s_d^2 / ((10 t)^2 + s_d^2)``, ``c_out = 10 t / sqrt((10 t)^2 + s_d^2)``,
  ``s_d = 0.5``, 10 = ``timestep_scaling``), then fresh noise to the next listed timestep; the last step returns it.
- ``TCDScheduler`` with gamma = ``eta`` (Zheng et al. 2024, strategic stochastic sampling): with the network's x0
  and eps, a DDIM jump to ``s = floor((1 - gamma) t')``, ``x_s = alpha_s x0 + sigma_s eps``, where ``t'`` is the next
  listed timestep (0 after the last), then fresh noise from ``s`` up to ``t'``:
  ``x' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z``; the last step returns ``x_s`` at ``s = 0``
  (``alphas_cumprod[0]``, not 1). No boundary scalings: the network's output is used as is.
- ``FlowMatchEulerDiscreteScheduler``: Euler in sigma, ``x_next = x + (s_next - s) u``, ending at s = 0.
- ``FlowMatchLCMScheduler``: ``x0 = x - s u``, then fresh noise to the next sigma, ``(1 - s_next) x0 + s_next z``;
  the last step returns x0. (``StableDiffusion3Pipeline`` does not hand its ``generator`` to ``step``: its ``z``
  comes from torch's global generator.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..solvers import lcm_boundary_scalings as lcm_scalings, step_rule

#: pipelines that pass their own sigma grid (``linspace(1, 1/K, K)``: K uniform Euler steps) to a flow scheduler
SIGMA_GRID_PIPELINES = ("FluxPipeline", "ClassConditionalPipeline")


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching scheduler (``FlowMatch*`` or a subclass of one)."""
    return any("FlowMatch" in c.__name__ for c in type(scheduler).__mro__)


def _name(obj) -> str | None:
    if obj is None or isinstance(obj, str):
        return obj
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def sampler_of(scheduler) -> str:
    """The update rule of a scheduler: ``ddim``, ``lcm``, ``tcd``, ``flow_euler`` or ``flow_lcm``; an error
    otherwise."""
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler,
                           TCDScheduler)

    if isinstance(scheduler, LCMScheduler):
        return "lcm"
    if isinstance(scheduler, TCDScheduler):
        return "tcd"
    if isinstance(scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow_euler"
    if isinstance(scheduler, FlowMatchLCMScheduler):
        return "flow_lcm"
    raise ValueError(f"stepdistill reproduces DDIMScheduler, LCMScheduler, TCDScheduler, FlowMatchEulerDiscrete"
                     f"Scheduler and FlowMatchLCMScheduler sampling; {type(scheduler).__name__} is not supported")


def _fresh(scheduler):
    return type(scheduler).from_config(scheduler.config)


def student_timesteps(scheduler, num_steps: int, pipeline=None) -> list[float]:
    """The timesteps ``pipeline`` runs with ``scheduler`` (its saved config) for ``num_steps`` steps.

    This is the one definition of a K-step student's timesteps: train at these, export with this scheduler, and
    the pipeline runs what was trained with nothing passed by hand. ``pipeline`` (class or name) matters only for
    pipelines that hand a flow scheduler their own sigma grid (``FluxPipeline``, ``ClassConditionalPipeline``:
    ``linspace(1, 1/K, K)``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, not {num_steps}")
    sched = _fresh(scheduler)
    config = sched.config
    if config.get("use_dynamic_shifting"):
        raise ValueError("this flow scheduler uses dynamic shifting (use_dynamic_shifting=True), so its timesteps "
                         "depend on the image size; export students with a fixed shift (use_dynamic_shifting=False)")
    if _name(pipeline) in SIGMA_GRID_PIPELINES and is_flow_scheduler(sched) and not config.get("use_flow_sigmas"):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    else:
        sched.set_timesteps(num_steps)
    return [float(t) for t in sched.timesteps]


@dataclass(frozen=True)
class SchedulerLevels:
    """The noise levels a Diffusers scheduler's own ``step`` uses (:class:`stepdistill.solvers.NoiseLevels`), in
    Python floats: VP ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)`` from its ``alphas_cumprod`` at the
    integer timestep (below 0: ``final_alpha_cumprod``, 1 with ``set_alpha_to_one``); flow ``sigma = t / T``,
    ``alpha = 1 - sigma``."""

    scheduler: Any
    kind: str = "vp"  # or "flow"

    def abar(self, t) -> float:
        t, table = int(t), self.scheduler.alphas_cumprod
        if t < 0:
            return 1.0 if self.scheduler.config.get("set_alpha_to_one", True) else float(table[0])
        return float(table[t])

    def alpha_sigma(self, t) -> tuple[float, float]:
        if self.kind == "flow":
            sigma = t / self.scheduler.config.num_train_timesteps
            return 1 - sigma, sigma
        abar = self.abar(t)
        return math.sqrt(abar), math.sqrt(1 - abar)


def next_timestep(sampler: str, scheduler, ts: list, i: int):
    """The timestep ``scheduler`` steps to from ``ts[i]``: DDIMScheduler's own ``t - T // K`` (the next listed one
    only on even grids; below 0 at the end: x0); TCD and flow Euler the next listed one, 0 after the last; LCM and
    flow LCM the next listed one, None after the last (that step's output is the sample)."""
    last = i == len(ts) - 1
    if sampler == "ddim":
        return int(ts[i]) - scheduler.config.num_train_timesteps // len(ts)
    if sampler == "tcd":
        return 0 if last else int(ts[i + 1])
    if sampler == "flow_euler":
        return 0 if last else ts[i + 1]
    return None if last else ts[i + 1]


@torch.no_grad()
def sample_student(denoiser, scheduler, noise: torch.Tensor, num_steps: int, cond=None, *, guidance_scale=None,
                   generator: torch.Generator | None = None, pipeline=None, timesteps=None,
                   eta: float | None = None) -> torch.Tensor:
    """Sample ``denoiser`` from ``noise`` as the exported pipeline does with ``scheduler`` for ``num_steps`` steps.

    ``cond`` / ``guidance_scale`` go to the Denoiser (CFG in the standard form; guidance-embedded students take
    ``cond.guidance``). ``generator`` draws the fresh noise of multi-step LCM / TCD sampling, in the pipeline's
    order (so the same seed gives the same images as the pipeline). ``eta``: TCD's gamma (the pipeline call's
    ``eta``; default 0.3, TCDScheduler's). Returns the final latents / images (float32). Each step is the
    scheduler's rule of :data:`stepdistill.solvers.STEP_RULES` on the scheduler's own noise levels.
    """
    sampler = sampler_of(scheduler)
    rule = step_rule(sampler)
    ts = list(timesteps) if timesteps is not None else student_timesteps(scheduler, num_steps, pipeline)
    x = noise.float() * float(getattr(_fresh(scheduler), "init_noise_sigma", 1.0))
    levels = SchedulerLevels(scheduler, "flow" if sampler.startswith("flow") else "vp")
    params = {}
    if sampler == "tcd":
        params["gamma"] = 0.3 if eta is None else float(eta)
    elif sampler == "lcm":
        params["timestep_scaling"] = scheduler.config.get("timestep_scaling", 10.0)
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        pred = denoiser(x, tt, cond, output=rule.prediction, guidance_scale=guidance_scale).float()
        draw = rule.fresh_noise and i < len(ts) - 1 and params.get("gamma", 1.0) > 0  # TCD draws none at gamma 0
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if draw else None
        x = rule(x, pred, t, next_timestep(sampler, scheduler, ts, i), levels, z, **params)
    return x


def noise_like_pipeline(shape, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """The initial noise a Diffusers pipeline draws (``randn_tensor`` on CPU) for ``shape``."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)


__all__ = ["SchedulerLevels", "lcm_scalings", "next_timestep", "noise_like_pipeline", "sample_student", "sampler_of",
           "student_timesteps"]
