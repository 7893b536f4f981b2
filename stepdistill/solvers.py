"""Teacher ODE/SDE steps as pure functions, between any two timesteps, for VP and flow schedules.

``model(x_t, t) -> x0`` is any x0 predictor (e.g. ``lambda x, t: teacher(x, t, cond, guidance_scale=s)``).
Steps are written in the variables where the probability-flow ODE is simplest:

- VP: ``y = x / alpha``, ``tau = sigma / alpha`` (EDM's sigma), ``dy/dtau = eps`` — Euler here is DDIM and
  Heun is EDM's 2nd-order step, as Diffusers' ``EulerDiscreteScheduler``/``HeunDiscreteScheduler`` do.
- flow: ``y = x``, ``tau = sigma``, ``dy/dtau = u = eps - x0`` — as ``FlowMatchEulerDiscreteScheduler``
  and ``FlowMatchHeunDiscreteScheduler``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, _expand

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _work(x: torch.Tensor) -> torch.Tensor:
    """x in the working precision: float32, or float64 if given float64 (as the schedule's conversions)."""
    return x if x.dtype == torch.float64 else x.float()


def _t(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def ddim_step(model: X0Fn, schedule: NoiseSchedule, x: torch.Tensor, t, t_next, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from ``t`` to ``t_next``: predict x0, keep its eps.

    ``x_next = a_n x0 + sqrt(s_n^2 - c^2) eps + c z`` with the posterior std
    ``c = eta * s_n / s_t * sqrt(s_t^2 - (a_t/a_n)^2 s_n^2)``; eta=0 is the ODE, eta=1 ancestral DDPM.
    """
    t, t_next = _t(t, x), _t(t_next, x)
    x0 = model(x, t)
    return ddim_from_x0(x0, x, schedule, t, t_next, eta, noise)


def ddim_from_x0(x0: torch.Tensor, x: torch.Tensor, schedule: NoiseSchedule, t, t_next, eta: float = 0.0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """The DDIM update given an x0 prediction already made at (x, t)."""
    t, t_next = _t(t, x), _t(t_next, x)
    xf = _work(x)
    x0 = x0.to(xf.dtype)
    a_t, s_t = (_expand(c, xf) for c in schedule.alpha_sigma(t, xf.dtype))
    a_n, s_n = (_expand(c, xf) for c in schedule.alpha_sigma(t_next, xf.dtype))
    a_t, s_t, a_n, s_n = (c.to(x.device) for c in (a_t, s_t, a_n, s_n))
    eps = (xf - a_t * x0) / s_t
    if eta == 0:
        return (a_n * x0 + s_n * eps).to(x.dtype)
    c = eta * s_n / s_t * (s_t**2 - (a_t / a_n) ** 2 * s_n**2).clamp(min=0).sqrt()
    noise = torch.randn_like(xf) if noise is None else noise.to(xf.dtype)
    return (a_n * x0 + (s_n**2 - c**2).clamp(min=0).sqrt() * eps + c * noise).to(x.dtype)


def _ode_vars(schedule: NoiseSchedule, x: torch.Tensor, t):
    a, s = (_expand(c, x).to(x.device) for c in schedule.alpha_sigma(t, x.dtype))
    if schedule.kind == "flow":
        return x, s, lambda y, tau: y  # y = x, tau = sigma
    return x / a, s / a, lambda y, tau: y / torch.sqrt(1 + tau**2)  # x = y / sqrt(1 + tau^2) for VP


def _slope(x0: torch.Tensor, x: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """dy/dtau at (x, t) given the x0 prediction there: eps for VP, u = eps - x0 for flow."""
    a, s = (_expand(c, x).to(x.device) for c in schedule.alpha_sigma(t, x.dtype))
    eps = (x - a * x0) / s
    return eps if schedule.kind == "vp" else eps - x0


def euler_step(model: X0Fn, schedule: NoiseSchedule, x: torch.Tensor, t, t_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in (y, tau). Since y = x0 + tau * eps it equals DDIM with eta=0
    exactly, and is computed in that form, which stays finite where alpha_t = 0 (zero terminal SNR: tau = inf)."""
    return ddim_step(model, schedule, x, t, t_next)


def heun_step(model: X0Fn, schedule: NoiseSchedule, x: torch.Tensor, t, t_next) -> torch.Tensor:
    """Heun's 2nd-order step (EDM, Karras et al. 2022, Alg. 1): Euler, then the average of the two slopes.
    A step that ends at tau = 0 is a plain Euler step, as in EDM; so is one that starts at tau = inf
    (alpha_t = 0 under zero terminal SNR), where the trapezoidal rule is undefined."""
    t, t_next = _t(t, x), _t(t_next, x)
    xf = _work(x)
    y, tau, to_x = _ode_vars(schedule, xf, t)
    _, tau_n, _ = _ode_vars(schedule, xf, t_next)
    x0 = model(xf, t).to(xf.dtype)
    x_euler = ddim_from_x0(x0, xf, schedule, t, t_next)
    first_order = (tau_n == 0) | torch.isinf(tau)
    if bool(first_order.all()):
        return x_euler.to(x.dtype)
    d1 = _slope(x0, xf, schedule, t)
    d2 = _slope(model(x_euler, t_next).to(xf.dtype), x_euler, schedule, t_next)  # not finite where first_order
    y_heun = y + (tau_n - tau) * 0.5 * (d1 + d2)
    return torch.where(first_order, x_euler, to_x(y_heun, tau_n)).to(x.dtype)


def dpmpp_2m_step(x0: torch.Tensor, x0_prev: torch.Tensor | None, x: torch.Tensor, schedule: NoiseSchedule,
                  t_prev, t, t_next) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction) from ``t`` to
    ``t_next`` given the x0 predictions at ``t`` and at the previous timestep ``t_prev``:

    ``x_next = (s_n / s_t) x - a_n (e^{-h} - 1) D`` with ``lambda = log(a / s)``, ``h = lambda_n - lambda_t``,
    ``D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev``, ``r = h_prev / h`` (``h_prev = lambda_t - lambda_prev``). The
    first step, and one whose previous step started at alpha = 0 (zero terminal SNR: ``h_prev = inf``), uses
    ``D = x0``: DPM-Solver++(1), i.e. DDIM."""
    xf = _work(x)
    t, t_next = _t(t, xf), _t(t_next, xf)
    x0 = x0.to(xf.dtype)
    a_t, s_t = (_expand(c, xf).to(x.device) for c in schedule.alpha_sigma(t, xf.dtype))
    a_n, s_n = (_expand(c, xf).to(x.device) for c in schedule.alpha_sigma(t_next, xf.dtype))
    lam_t, lam_n = torch.log(a_t / s_t), torch.log(a_n / s_n)
    h = lam_n - lam_t
    d = x0
    if x0_prev is not None:
        a_p, s_p = (_expand(c, xf).to(x.device) for c in schedule.alpha_sigma(_t(t_prev, xf), xf.dtype))
        r = (lam_t - torch.log(a_p / s_p)) / h
        second = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev.to(xf.dtype)
        d = torch.where(torch.isfinite(r), second, x0)
    return ((s_n / s_t) * xf - a_n * torch.expm1(-h) * d).to(x.dtype)


SOLVERS = {"ddim": ddim_step, "euler": euler_step, "heun": heun_step, "dpmpp_2m": None}  # multistep: in sample()


def solver_step(name: str, model: X0Fn, schedule: NoiseSchedule, x, t, t_next, **kwargs) -> torch.Tensor:
    if SOLVERS.get(name, 0) is None:
        raise ValueError(f"{name} is a multistep solver: it runs through sample(), not one step at a time")
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name](model, schedule, x, t, t_next, **kwargs)


def sample(model: X0Fn, schedule: NoiseSchedule, noise: torch.Tensor, timesteps, solver: str = "ddim",
           eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from ``noise`` through ``timesteps`` (decreasing); the last step returns the x0 prediction.

    ``noise`` is used as x_T directly, as Diffusers pipelines do (``init_noise_sigma`` is 1 for VP and flow).
    """
    x = noise
    ts = [float(t) for t in timesteps]
    x0_prev = None
    for i, t in enumerate(ts):
        if i == len(ts) - 1:
            return _work(model(x, _t(t, x))).to(noise.dtype)
        if solver == "dpmpp_2m":  # the last timestep's x0 is DPM-Solver++'s first-order final step to sigma = 0
            x0 = model(x, _t(t, x))
            x = dpmpp_2m_step(x0, x0_prev, x, schedule, ts[i - 1] if i else None, t, ts[i + 1])
            x0_prev = x0
            continue
        kwargs = {}
        if solver == "ddim" and eta > 0:
            kwargs = {"eta": eta, "noise": torch.randn(x.shape, generator=generator, device=x.device)}
        x = solver_step(solver, model, schedule, x, t, ts[i + 1], **kwargs)
    return x


def scheduler_timesteps(scheduler, num_steps: int) -> list[float]:
    """The timesteps a Diffusers scheduler (with its saved config) runs for ``num_steps`` steps."""
    scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]
