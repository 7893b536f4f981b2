"""Noise schedules and conversions between parameterizations.

One time variable everywhere: ``t``, the backbone timestep, in ``[0, num_train_timesteps]``.

- Discrete VP (DDPM/DDIM): ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(abar_t)``,
  ``sigma_t = sqrt(1 - abar_t)``; fractional ``t`` interpolates ``abar`` linearly.
- Flow matching (``FlowMatchEulerDiscreteScheduler``): ``sigma = t / num_train_timesteps``,
  ``x_t = (1 - sigma) x0 + sigma eps``, velocity ``u = eps - x0``. The scheduler's ``shift`` bends
  where timesteps are *sampled*; it never changes the map from ``t`` to ``sigma``.

Papers that run time the other way (t=0 is noise) are converted where their configs are read, never
inside a loss. Parameterizations: ``epsilon``, ``v_prediction``, ``sample`` (x0) and ``flow`` (velocity).
All conversions go through x0 and run in float32 (or float64 if given float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "velocity": "flow", "flow_prediction": "flow"}


def canonical_prediction_type(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {name!r}; expected one of {PREDICTION_TYPES} "
                         f"(or the aliases {sorted(_ALIASES)})")
    return name


def _expand(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.ndim - 1)))


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, src: str) -> torch.Tensor:
    """x0 from a prediction of type ``src`` at a point with coefficients (alpha, sigma).

    epsilon: ``x0 = (x_t - sigma eps) / alpha``; v: ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``
    (``v = alpha eps - sigma x0``); flow: ``x0 = (x_t - sigma u) / (alpha + sigma)`` (``u = eps - x0``).
    """
    a, s = _expand(alpha, x_t), _expand(sigma, x_t)
    if src == "epsilon":
        return (x_t - s * pred) / a
    if src == "v_prediction":
        return (a * x_t - s * pred) / (a * a + s * s)
    if src == "flow":
        return (x_t - s * pred) / (a + s)
    if src == "sample":
        return pred
    raise ValueError(f"unknown prediction type {src!r}")


def from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, dst: str) -> torch.Tensor:
    """The prediction of type ``dst`` implied by x0 at x_t: ``eps = (x_t - alpha x0) / sigma``,
    ``v = alpha eps - sigma x0``, ``u = eps - x0``."""
    if dst == "sample":
        return x0
    a, s = _expand(alpha, x_t), _expand(sigma, x_t)
    eps = (x_t - a * x0) / s
    if dst == "epsilon":
        return eps
    if dst == "v_prediction":
        return a * eps - s * x0
    if dst == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction type {dst!r}")


@dataclass
class NoiseSchedule:
    """A noise schedule read from a Diffusers scheduler config (never a hand-copied table).

    ``kind`` is ``"vp"`` (with ``alphas_cumprod``) or ``"flow"`` (with ``shift``).
    """

    kind: str
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """From a Diffusers scheduler instance or its config dict."""
        config = dict(getattr(scheduler, "config", scheduler))
        name = config.get("_class_name", type(scheduler).__name__)
        n = int(config.get("num_train_timesteps", 1000))
        if "FlowMatch" in name or "shift" in config and "beta_schedule" not in config:
            shift = float(config.get("shift", 1.0))
            if config.get("use_dynamic_shifting"):
                # Flux-style: sigma' = e^mu / (e^mu + 1/sigma - 1), identical to a static shift of e^mu.
                shift = math.exp(float(config.get("mu", config.get("base_shift", 0.5))))
            return cls(kind="flow", num_train_timesteps=n, shift=shift)
        if isinstance(scheduler, dict) or not hasattr(scheduler, "alphas_cumprod"):
            from diffusers import DDPMScheduler

            keep = {k: v for k, v in config.items() if not k.startswith("_")}
            scheduler = DDPMScheduler.from_config(keep)
        abar = scheduler.alphas_cumprod.detach().to(torch.float64).clone()
        return cls(kind="vp", num_train_timesteps=n, alphas_cumprod=abar)

    # ---------------------------------------------------------------- coefficients
    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)
        t = t.to(torch.float64).clamp(0, len(abar) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(abar) - 1)
        frac = t - lo.to(torch.float64)
        return abar[lo] * (1 - frac) + abar[hi] * frac

    def alpha_sigma(self, t: torch.Tensor | float, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            sigma = (t / self.num_train_timesteps).clamp(0, 1)
            return (1 - sigma).to(dtype), sigma.to(dtype)
        abar = self._abar(t)
        return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)

    def alpha(self, t, dtype=torch.float32) -> torch.Tensor:
        return self.alpha_sigma(t, dtype)[0]

    def sigma(self, t, dtype=torch.float32) -> torch.Tensor:
        return self.alpha_sigma(t, dtype)[1]

    def _coeffs(self, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a, s = self.alpha_sigma(t, dtype)
        return a.to(x.device), s.to(x.device)

    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` shaped ``(B, 1, ..., 1)`` to broadcast over ``like`` (a scalar ``t`` holds for every
        sample), on its device, in float32 (float64 for a float64 ``like``): the numbers :meth:`add_noise` uses."""
        a, s = self._coeffs(t, like)
        return _expand(a, like), _expand(s, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t eps``, computed in float32 and returned in x0's dtype."""
        a, s = self.coefficients(t, x0)
        out = a * x0.to(a.dtype) + s * noise.to(a.dtype)
        return out.to(x0.dtype)

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """Convert a prediction between parameterizations (through x0, in float32 or float64)."""
        src, dst = canonical_prediction_type(src), canonical_prediction_type(dst)
        if src == dst:
            return pred
        a, s = self._coeffs(t, x_t)
        work = a.dtype
        x0 = to_x0(pred.to(work), x_t.to(work), a, s, src)
        return from_x0(x0, x_t.to(work), a, s, dst).to(pred.dtype)

    def snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t, torch.float64)
        return (a / s) ** 2

    # ---------------------------------------------------------------- conversions of time
    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1) if self.kind == "vp" else float(self.num_train_timesteps)

    def t_from_edm_sigma(self, sigma_edm: torch.Tensor) -> torch.Tensor:
        """The timestep whose noise-to-signal ratio sigma_t/alpha_t equals ``sigma_edm``."""
        sigma_edm = torch.as_tensor(sigma_edm, dtype=torch.float64)
        if self.kind == "flow":
            return sigma_edm / (1 + sigma_edm) * self.num_train_timesteps
        ratio = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        idx = torch.searchsorted(ratio, sigma_edm.clamp(ratio[0], ratio[-1]))
        return idx.clamp(0, len(ratio) - 1).to(torch.float64)

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The flow scheduler's timestep shift: ``shift*s / (1 + (shift-1)*s)``."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    # ---------------------------------------------------------------- sampling timesteps
    def sample_t(self, n: int, dist: str = "uniform", *, t_min: float = 0.0, t_max: float | None = None,
                 grid=None, mean: float = 0.0, std: float = 1.0, a: float = 4.0,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Draw ``n`` training timesteps.

        ``uniform``: over [t_min, t_max] (integers for VP; for flow, shifted like the scheduler's grid).
        ``logit_normal``: sigma = sigmoid(N(mean, std)) (SD3), flow only, shifted.
        ``lognormal``: EDM noise level ``sigma_edm = exp(N(mean, std))`` mapped to t (e.g. mean=-1.1, std=2.0).
        ``u_shaped``: density ~ exp(a u) + exp(a (1 - u)) on u in [0,1] (rfpp's U-shaped t, a=4), to [t_min, t_max].
        ``discrete``: uniform over the timesteps in ``grid``.
        """
        t_max = self.t_max if t_max is None else t_max
        g = dict(generator=generator)
        if dist == "discrete":
            if grid is None or len(grid) == 0:
                raise ValueError("sample_t(dist='discrete') needs a non-empty grid of timesteps")
            grid = torch.as_tensor(grid, dtype=torch.float64)
            t = grid[torch.randint(0, len(grid), (n,), **g)]
        elif dist == "uniform":
            if self.kind == "vp":
                t = torch.randint(int(t_min), int(t_max) + 1, (n,), **g).to(torch.float64)
            else:
                u = torch.rand(n, dtype=torch.float64, **g)
                sigma = self.shift_sigma(u)
                t = t_min + sigma * (t_max - t_min)
        elif dist == "logit_normal":
            if self.kind != "flow":
                raise ValueError("logit_normal timestep sampling is for flow-matching schedules; use 'lognormal' for VP")
            sigma = torch.sigmoid(mean + std * torch.randn(n, dtype=torch.float64, **g))
            t = (self.shift_sigma(sigma) * self.num_train_timesteps).clamp(t_min, t_max)
        elif dist == "lognormal":
            sigma_edm = torch.exp(mean + std * torch.randn(n, dtype=torch.float64, **g))
            t = self.t_from_edm_sigma(sigma_edm).clamp(t_min, t_max)
        elif dist == "u_shaped":
            # inverse CDF of p(u) ~ exp(a u) on [0,1], mirrored half the time
            v = torch.rand(n, dtype=torch.float64, **g)
            u = torch.log1p(v * math.expm1(a)) / a
            flip = torch.rand(n, **g) < 0.5
            u = torch.where(flip, 1 - u, u)
            t = t_min + u * (t_max - t_min)
            if self.kind == "vp":
                t = t.round()
        else:
            raise ValueError(f"unknown timestep distribution {dist!r}; expected uniform, logit_normal, "
                             "lognormal, u_shaped or discrete")
        return t.to(device=device, dtype=torch.float32)
