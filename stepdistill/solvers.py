"""Teacher ODE/SDE steps as pure functions, between any two timesteps, for VP and flow schedules; and the registry
of student step rules (:data:`STEP_RULES`), the one definition of how a few-step student moves from its prediction
at one timestep to its sample at the next.

``model(x_t, t) -> x0`` is any x0 predictor (e.g. ``lambda x, t: teacher(x, t, cond, guidance_scale=s)``).
Steps are written in the variables where the probability-flow ODE is simplest:

- VP: ``y = x / alpha``, ``tau = sigma / alpha`` (EDM's sigma), ``dy/dtau = eps`` — Euler here is DDIM and
  Heun is EDM's 2nd-order step, as Diffusers' ``EulerDiscreteScheduler``/``HeunDiscreteScheduler`` do.
- flow: ``y = x``, ``tau = sigma``, ``dy/dtau = u = eps - x0`` — as ``FlowMatchEulerDiscreteScheduler``
  and ``FlowMatchHeunDiscreteScheduler``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

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


# ------------------------------------------------------------------------------------------------ LCM's grid, scalings
def lcm_grid(num_train_timesteps: int, n: int) -> list[int]:
    """LCM's solver grid ``t_i = i * (T // N) - 1``, i = 1..N, ascending (50 steps of 1000: 19, 39, ..., 999): the
    ``original_inference_steps`` grid ``LCMScheduler`` and ``TCDScheduler`` pick their timesteps from, and the one
    consistency distillation trains on."""
    step = num_train_timesteps // n
    return [i * step - 1 for i in range(1, n + 1)]


def _sqrt(v):
    return v.sqrt() if torch.is_tensor(v) else math.sqrt(v)


def lcm_boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's boundary-condition scalings ``c_skip(t) = sd^2 / ((s t)^2 + sd^2)``, ``c_out(t) = s t / sqrt((s t)^2 +
    sd^2)`` with ``s = timestep_scaling`` (10) and ``sd = sigma_data`` (0.5), as
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``: ``c_skip(0) = 1``, ``c_out(0) = 0``, so the
    consistency function ``f(x, t) = c_skip x + c_out x0`` (Song et al. 2023, Eq. 3) has ``f(x, 0) = x``.

    A number ``t`` gives Python floats; a tensor gives float32 tensors, computed in float64."""
    scaled = (t.double() if torch.is_tensor(t) else float(t)) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / _sqrt(scaled**2 + sigma_data**2)
    return (c_skip.float(), c_out.float()) if torch.is_tensor(t) else (c_skip, c_out)


# ------------------------------------------------------------------------------------------------ student step rules
class NoiseLevels(Protocol):
    """The noise levels a step rule reads, as the sampler it reproduces computes them: ``alpha_sigma(t)`` gives
    ``(alpha_t, sigma_t)`` of ``x_t = alpha_t x0 + sigma_t eps`` at a timestep (Python floats, or tensors that
    broadcast over the sample), ``abar(t)`` gives ``alpha_t^2`` (VP; TCD's re-noising reads it). Implementations:
    :class:`ScheduleLevels` (a NoiseSchedule: the trainers' rollouts) and
    :class:`stepdistill.pipelines.sampling.SchedulerLevels` (a Diffusers scheduler's own table: exported students)."""

    def alpha_sigma(self, t) -> tuple[Any, Any]: ...

    def abar(self, t) -> Any: ...


@dataclass(frozen=True, eq=False)
class ScheduleLevels:
    """The levels of a :class:`~stepdistill.schedule.NoiseSchedule` as its ``add_noise`` computes them: float32
    (float64 for a float64 ``like``) tensors shaped to broadcast over ``like``, on its device."""

    schedule: NoiseSchedule
    like: torch.Tensor

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.coefficients(t, self.like)

    def abar(self, t) -> torch.Tensor:
        alpha, _ = self.alpha_sigma(t)
        return alpha * alpha


def renoise(x0: torch.Tensor, t_next, levels: NoiseLevels, noise: torch.Tensor) -> torch.Tensor:
    """``x0`` with fresh noise ``z`` at ``t_next``: ``alpha' x0 + sigma' z``."""
    alpha, sigma = levels.alpha_sigma(t_next)
    return alpha * x0 + sigma * noise


def ddim_rule(x, x0, t, t_next, levels: NoiseLevels, noise=None):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 at eta = 0): the noise implied by the x0 prediction,
    ``eps = (x - alpha_t x0) / sigma_t``, carried to the next timestep, ``x' = alpha' x0 + sigma' eps``. On a flow
    schedule (``alpha = 1 - sigma``) this is the Euler step of the probability-flow ODE in its x0 form
    (:func:`euler_step`). The last step (``t_next`` None) returns x0."""
    if t_next is None:
        return x0
    alpha, sigma = levels.alpha_sigma(t)
    alpha_next, sigma_next = levels.alpha_sigma(t_next)
    return alpha_next * x0 + sigma_next * ((x - alpha * x0) / sigma)


def lcm_rule(x, x0, t, t_next, levels: NoiseLevels, noise=None, *, timestep_scaling: float = 10.0):
    """``LCMScheduler.step`` (multistep latent consistency sampling, Luo et al. 2023): the boundary-condition output
    ``out = c_skip(t) x + c_out(t) x0`` (:func:`lcm_boundary_scalings`), then fresh noise to the next timestep,
    ``alpha' out + sigma' z``; the last step (``t_next`` None) returns ``out``."""
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling)
    out = c_out * x0 + c_skip * x
    return out if t_next is None else renoise(out, t_next, levels, noise)


def flow_lcm_rule(x, x0, t, t_next, levels: NoiseLevels, noise=None):
    """``FlowMatchLCMScheduler.step`` and DMD2's backward simulation (Yin et al. 2024b, Sec. 4.5): the x0 prediction
    as is, then fresh noise to the next timestep, ``alpha' x0 + sigma' z`` (flow: ``(1 - s') x0 + s' z``); the last
    step (``t_next`` None) returns x0."""
    return x0 if t_next is None else renoise(x0, t_next, levels, noise)


def tcd_rule(x, x0, t, t_next, levels: NoiseLevels, noise=None, *, gamma: float = 0.3):
    """``TCDScheduler.step`` (Zheng et al. 2024, strategic stochastic sampling) with ``gamma`` (the pipeline call's
    ``eta``): a DDIM jump with the x0 prediction and its noise ``eps = (x - alpha_t x0) / sigma_t`` to
    ``s = floor((1 - gamma) t')``, ``x_s = alpha_s x0 + sigma_s eps``, then, given ``noise``, fresh noise from ``s``
    up to ``t'``: ``sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z``. The last step has ``t' = 0``
    (``t_next`` 0 or None) and no noise; gamma = 0 is DDIM, gamma = 1 re-noises x0 as LCM does (no boundary
    scalings)."""
    t_next = 0 if t_next is None else t_next
    alpha, sigma = levels.alpha_sigma(t)
    eps = (x - alpha * x0) / sigma
    s = int(torch.floor((1 - gamma) * torch.tensor(t_next)))  # as TCDScheduler rounds it (float32)
    alpha_s, sigma_s = levels.alpha_sigma(s)
    x_s = alpha_s * x0 + sigma_s * eps
    if noise is None:
        return x_s
    ratio = levels.abar(t_next) / levels.abar(s)
    return _sqrt(ratio) * x_s + _sqrt(1 - ratio) * noise


def flow_euler_rule(x, velocity, t, t_next, levels: NoiseLevels, noise=None):
    """``FlowMatchEulerDiscreteScheduler.step``: Euler in sigma on the velocity ``u = eps - x0``,
    ``x' = x + (sigma' - sigma) u``; the last step (``t_next`` 0 or None) ends at sigma = 0, i.e. x0."""
    _, sigma = levels.alpha_sigma(t)
    _, sigma_next = levels.alpha_sigma(0 if t_next is None else t_next)
    return x + (sigma_next - sigma) * velocity


def cm_rule(x, x0, t, t_next, levels: NoiseLevels, noise=None, *, sigma_min: float = 0.002,
            sigma_max: float = 80.0, clip: bool = True):
    """``CMStochasticIterativeScheduler.step`` (Song et al. 2023, Alg. 1, multistep consistency sampling) on EDM
    levels (``alpha = 1``): the consistency model's output ``x0`` (clamped to [-1, 1] when ``clip``), then, given
    ``noise``, ``x' = x0 + sqrt(sigma_hat^2 - sigma_min^2) z`` at ``sigma_hat = clamp(sigma_{t'}, sigma_min,
    sigma_max)``; the last step (``t_next`` None) returns x0."""
    if clip:
        x0 = x0.clamp(-1, 1)
    if t_next is None or noise is None:
        return x0
    _, sigma_next = levels.alpha_sigma(t_next)
    sigma_hat = (sigma_next.clamp(min=sigma_min, max=sigma_max) if torch.is_tensor(sigma_next)
                 else min(max(sigma_next, sigma_min), sigma_max))
    return x0 + noise * (sigma_hat**2 - sigma_min**2) ** 0.5


@dataclass(frozen=True)
class StepRule:
    """A student's update ``rule(x, pred, t, t_next, levels, noise=None, **params) -> x'`` from its prediction at
    timestep ``t`` (a number) to its sample at ``t_next`` (None: the last step, whose output is the sample).
    ``prediction``: the parameterization ``pred`` is in (x0, or the flow velocity); ``fresh_noise``: whether the
    rule takes fresh noise between steps (the caller draws it, in its own generator's order)."""

    name: str
    step: Callable[..., torch.Tensor]
    prediction: str = "sample"
    fresh_noise: bool = False

    def __call__(self, x, pred, t, t_next, levels: NoiseLevels, noise=None, **params) -> torch.Tensor:
        return self.step(x, pred, t, t_next, levels, noise, **params)


#: the student step rules by name (the names ``pipelines.sampling.sampler_of`` gives a Diffusers scheduler)
STEP_RULES: dict[str, StepRule] = {rule.name: rule for rule in (
    StepRule("ddim", ddim_rule),
    StepRule("lcm", lcm_rule, fresh_noise=True),
    StepRule("tcd", tcd_rule, fresh_noise=True),
    StepRule("flow_euler", flow_euler_rule, prediction="flow"),
    StepRule("flow_lcm", flow_lcm_rule, fresh_noise=True),
    StepRule("cm", cm_rule, fresh_noise=True),
)}


def step_rule(name: str) -> StepRule:
    """The step rule ``name`` of :data:`STEP_RULES`; an error naming the rules otherwise."""
    if name not in STEP_RULES:
        raise ValueError(f"unknown step rule {name!r}; expected one of {sorted(STEP_RULES)}")
    return STEP_RULES[name]
