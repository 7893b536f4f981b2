"""Straightness of a flow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.3, its S(Z)): how far its velocities
along an ODE path stray from the straight line between the path's ends,

    S = int_0^1 E || (x_noise - x_end) - u(x_sigma, sigma) ||^2 dsigma,

0 exactly when every path is a straight line walked at constant speed (one Euler step is then exact). In Diffusers'
convention the path runs from the noise at sigma = 1 to the sample at sigma = 0 with ``dx/dsigma = u``, so the
straight velocity is ``x_noise - x_end``. Here the integral is the Euler path's own: K velocities ``u_k`` at
``sigma_k``, weights ``w_k = sigma_k - sigma_{k+1}`` (summing to 1), the ends those of the Euler path, and the norm
averaged over the sample's values (so images of any size compare). Reported by ``stepdistill eval`` / ``bench`` for
flow models (``straightness`` in each row at NFE >= 2, on the first :data:`STRAIGHTNESS_N` samples).
"""
from __future__ import annotations

import numpy as np
import torch

from ..pipelines.class_conditional import uniform_flow_grid
from ..pipelines.sampling import is_flow_scheduler
from .samplers import sample_generators

STRAIGHTNESS_N = 256  # samples per point (the first ones of the benchmark's noise and labels)
PROTOCOL = ("straightness: mean over the first min(n, 256) samples of sum_k (sigma_k - sigma_k+1) mean_values "
            "(u_k - (x_noise - x_end))^2 along the model's own Euler path at the row's NFE (flow models, NFE >= 2; "
            "0 = straight paths; Liu et al. 2023, Sec. 2.3)")


def straightness(velocities: torch.Tensor, sigmas: torch.Tensor, x_start: torch.Tensor,
                 x_end: torch.Tensor) -> torch.Tensor:
    """Per-sample straightness ``(B,)`` of a discretised path: ``velocities`` ``(K, B, ...)`` at ``sigmas`` ``(K+1,)``
    (decreasing; the path from ``x_start`` at ``sigmas[0]`` to ``x_end`` at ``sigmas[-1]``):
    ``sum_k w_k mean((u_k - d)^2)`` with ``w_k = (sigma_k - sigma_{k+1}) / (sigma_0 - sigma_K)`` and the straight
    velocity ``d = (x_start - x_end) / (sigma_0 - sigma_K)``."""
    sigmas = sigmas.to(torch.float64)
    span = sigmas[0] - sigmas[-1]
    weights = (sigmas[:-1] - sigmas[1:]) / span
    direct = (x_start.double() - x_end.double()) / span
    dev = ((velocities.double() - direct.unsqueeze(0)) ** 2).flatten(2).mean(2)  # (K, B)
    return (weights.unsqueeze(1) * dev).sum(0)


@torch.no_grad()
def euler_straightness(velocity, noise: torch.Tensor, sigmas) -> torch.Tensor:
    """Run Euler ``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) u(x_k, sigma_k)`` from ``noise`` over ``sigmas`` (K+1
    values, decreasing, e.g. 1 ... 0) and return the per-sample :func:`straightness` of that path.
    ``velocity(x, sigma) -> u`` takes the sigma as a Python float."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    x, us = noise.float(), []
    for k in range(len(sigmas) - 1):
        u = velocity(x, float(sigmas[k])).float()
        us.append(u)
        x = x + float(sigmas[k + 1] - sigmas[k]) * u
    return straightness(torch.stack(us), sigmas, noise, x)


def _velocity_fn(pipe, model, indices, device):
    """``velocity(x, sigma)`` of an evaluated flow pipeline with the benchmark's conditions, or None when its call
    is not one this knows (class-conditional pipelines; Stable Diffusion-style text pipelines)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return None
    total = pipe.scheduler.config.num_train_timesteps
    scale = float(model.call_guidance or 1.0)
    kwargs_c = kwargs_u = None
    if model.num_classes is not None and "class_labels" in model._params:
        labels = torch.tensor([i % model.num_classes for i in indices], device=device)
        kwargs_c = {"class_labels": labels}
        null = pipe.config.get("null_class")
        if scale != 1 and null is not None:
            kwargs_u = {"class_labels": torch.full_like(labels, int(null))}
    elif model.prompts and hasattr(pipe, "encode_prompt"):
        prompts = [model.prompts[i % len(model.prompts)] for i in indices]
        cond, uncond = pipe.encode_prompt(prompts, device, 1, scale > 1)
        kwargs_c = {"encoder_hidden_states": cond}
        if scale > 1:
            kwargs_u = {"encoder_hidden_states": uncond}
    elif model.num_classes is None and not model.prompts and model.sources is None:
        kwargs_c = {}
    if kwargs_c is None:
        return None

    def velocity(x, sigma):
        t = torch.full((x.shape[0],), sigma * total, device=device)
        cond = unet(x.to(unet.dtype), t, **kwargs_c).sample.float()
        if kwargs_u is None:
            return cond
        uncond = unet(x.to(unet.dtype), t, **kwargs_u).sample.float()
        return uncond + scale * (cond - uncond)

    return velocity


def model_straightness(model, nfe: int, seed: int, n: int = STRAIGHTNESS_N, batch_size: int = 256) -> float | None:
    """The straightness of an :class:`~stepdistill.metrics.samplers.EvalModel` that is a flow (a flow scheduler) at
    ``nfe`` Euler steps of its own grid, on samples ``0 .. n-1`` of the benchmark's noise (``sample_seed(seed, i)``)
    and conditions; None for other models or ``nfe < 2`` (one step is straight by construction)."""
    pipe = model.pipe
    scheduler = getattr(pipe, "scheduler", None)
    if nfe < 2 or scheduler is None or not is_flow_scheduler(scheduler) or model.sources is not None:
        return None
    sched = type(scheduler).from_config(scheduler.config)
    if uniform_flow_grid(sched) and type(pipe).__name__ == "ClassConditionalPipeline":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / nfe, nfe))
    else:
        sched.set_timesteps(nfe)
    sigmas = sched.sigmas.double().cpu()
    unet = getattr(pipe, "unet", None)
    device = next(unet.parameters()).device if unet is not None else torch.device("cpu")
    channels, size = (unet.config.in_channels, unet.config.sample_size) if unet is not None else (None, None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    values = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        velocity = _velocity_fn(pipe, model, idx, device)
        if velocity is None:
            return None
        noise = torch.cat([torch.randn((1, channels, size, size), generator=g) for g in sample_generators(idx, seed)])
        values.append(euler_straightness(velocity, noise.to(device), sigmas))
    return float(torch.cat(values).mean())
