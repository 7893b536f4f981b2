"""NoiseSchedule: coefficients, add_noise, conversions between parameterizations, timestep sampling.

Formulas are checked in float64 against ground truth built from (x0, eps) and against Diffusers' own
schedulers, so that the conventions of the design (Diffusers time and noise) are pinned.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.schedule import PREDICTION_TYPES, NoiseSchedule, canonical_prediction_type

VP_BETAS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
# timesteps away from the ends where a conversion divides by (nearly) zero: per-sample, incl. fractional
VP_T = [0.0, 1.0, 10.0, 250.5, 500.0, 998.0, 999.0]
FLOW_T = [5.0, 100.0, 250.5, 500.0, 750.0, 995.0]


def _vp(name):
    sched = DDPMScheduler(**VP_BETAS[name])
    return NoiseSchedule.from_scheduler(sched), sched


def _flow(shift=3.0):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    return NoiseSchedule.from_scheduler(sched), sched


def _schedules():
    out = [(f"vp-{name}", _vp(name)[0], VP_T) for name in VP_BETAS]
    out.append(("flow-shift3", _flow()[0], FLOW_T))
    return out


SCHEDULES = _schedules()
SCHEDULE_IDS = [s[0] for s in SCHEDULES]


def _ground_truth(schedule, ts, seed=0):
    """x0, eps, x_t and the true value of every parameterization at per-sample timesteps ``ts``."""
    g = torch.Generator().manual_seed(seed)
    n = len(ts)
    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor(ts, dtype=torch.float64)
    a, s = schedule.alpha_sigma(t, torch.float64)
    a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    truth = {"sample": x0, "epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0}
    return t, x_t, truth


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("name", list(VP_BETAS))
def test_vp_alpha_sigma_match_alphas_cumprod(name):
    schedule, sched = _vp(name)
    assert schedule.kind == "vp" and schedule.num_train_timesteps == 1000
    t = torch.arange(1000)
    a, s = schedule.alpha_sigma(t, torch.float64)
    abar = sched.alphas_cumprod.to(torch.float64)
    torch.testing.assert_close(a, abar.sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(s, (1 - abar).sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.alpha(t, torch.float64), a)
    torch.testing.assert_close(schedule.sigma(t, torch.float64), s)
    torch.testing.assert_close(schedule.snr(t), abar / (1 - abar))
    # fractional t interpolates abar linearly; t is clamped to the table
    a_half, _ = schedule.alpha_sigma(torch.tensor([10.25]), torch.float64)
    torch.testing.assert_close(a_half**2, 0.75 * abar[10:11] + 0.25 * abar[11:12], rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.alpha(torch.tensor([1500.0]), torch.float64), abar[-1:].sqrt())
    assert schedule.t_max == 999.0


def test_from_scheduler_accepts_config_dicts():
    vp = NoiseSchedule.from_scheduler(dict(DDPMScheduler(**VP_BETAS["scaled_linear"]).config))
    assert vp.kind == "vp"
    torch.testing.assert_close(vp.alphas_cumprod, _vp("scaled_linear")[0].alphas_cumprod)
    flow = NoiseSchedule.from_scheduler(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert flow.kind == "flow" and flow.shift == 3.0 and flow.t_max == 1000.0


def test_flow_dynamic_shift_equals_static_shift_of_exp_mu():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    schedule = NoiseSchedule.from_scheduler(sched)
    assert schedule.shift == pytest.approx(math.exp(0.5))
    mu = 0.5
    sched.set_timesteps(10, mu=mu)
    unshifted = torch.linspace(1.0, 1 / 1000, 10, dtype=torch.float64)  # the scheduler's grid before the shift
    torch.testing.assert_close(schedule.shift_sigma(unshifted).float(), sched.sigmas[:-1], rtol=1e-5, atol=1e-6)


def test_flow_convention_sigma_is_timestep_over_1000():
    schedule, sched = _flow(3.0)
    assert schedule.kind == "flow" and schedule.shift == 3.0
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 1000.0])
    a, s = schedule.alpha_sigma(t, torch.float64)
    torch.testing.assert_close(s, t.double() / 1000)
    torch.testing.assert_close(a, 1 - t.double() / 1000)
    # the backbone timestep the scheduler runs is sigma * 1000, and the shift lives in the grid, not in t -> sigma
    sched.set_timesteps(12)
    torch.testing.assert_close(schedule.sigma(sched.timesteps, torch.float64),
                               sched.sigmas[:-1].double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(schedule.shift_sigma(torch.tensor(0.5, dtype=torch.float64)),
                               torch.tensor(0.75, dtype=torch.float64))


def test_canonical_prediction_type_aliases_and_errors():
    assert canonical_prediction_type("eps") == "epsilon"
    assert canonical_prediction_type("v") == "v_prediction"
    assert canonical_prediction_type("x0") == "sample"
    assert canonical_prediction_type("velocity") == "flow"
    assert canonical_prediction_type("flow_prediction") == "flow"
    with pytest.raises(ValueError, match="unknown prediction type"):
        canonical_prediction_type("score")
    schedule = _vp("linear")[0]
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        schedule.convert(x, x, 10, "epsilon", "score")


# ------------------------------------------------------------------------------------------ add_noise
@pytest.mark.parametrize("name", list(VP_BETAS))
def test_vp_add_noise_matches_diffusers(name):
    schedule, sched = _vp(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    ours = schedule.add_noise(x0, eps, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, sched.add_noise(x0, eps, t), rtol=0, atol=1e-12)
    # float32 in, float32 out; a scalar t broadcasts over the batch
    ours32 = schedule.add_noise(x0.float(), eps.float(), 500)
    assert ours32.dtype == torch.float32
    ref = sched.add_noise(x0.float(), eps.float(), torch.full((6,), 500))
    torch.testing.assert_close(ours32, ref, rtol=1e-6, atol=1e-6)


def test_flow_add_noise_is_linear_interpolation():
    schedule, sched = _flow(3.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 333.0, 750.0, 1000.0])
    sigma = (t.double() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps, rtol=0, atol=1e-14)
    # the Diffusers scheduler's scale_noise at one of its own timesteps
    sched.set_timesteps(10)
    tt = sched.timesteps[3]
    ref = sched.scale_noise(x0.float(), tt.reshape(1), eps.float())
    torch.testing.assert_close(schedule.add_noise(x0.float(), eps.float(), tt), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("sid,schedule,ts", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTION_TYPES, repeat=2)))
def test_convert_every_pair_matches_ground_truth_and_round_trips(sid, schedule, ts, src, dst):
    t, x_t, truth = _ground_truth(schedule, ts)
    out = schedule.convert(truth[src], x_t, t, src, dst)
    assert out.dtype == torch.float64 and out.shape == x_t.shape
    torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9)
    back = schedule.convert(out, x_t, t, dst, src)
    torch.testing.assert_close(back, truth[src], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(VP_BETAS))
def test_vp_named_conversions(name):
    schedule = _vp(name)[0]
    t, x_t, truth = _ground_truth(schedule, VP_T, seed=3)
    a, s = (c.view(-1, 1, 1, 1) for c in schedule.alpha_sigma(t, torch.float64))
    x0, eps = truth["sample"], truth["epsilon"]
    torch.testing.assert_close(schedule.convert(eps, x_t, t, "epsilon", "sample"), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.convert(x0, x_t, t, "sample", "v_prediction"), a * eps - s * x0,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.convert(x0, x_t, t, "x0", "eps"), eps, rtol=1e-9, atol=1e-9)


def test_flow_velocity_is_eps_minus_x0():
    schedule = _flow()[0]
    t, x_t, truth = _ground_truth(schedule, FLOW_T, seed=4)
    x0, eps = truth["sample"], truth["epsilon"]
    torch.testing.assert_close(schedule.convert(x0, x_t, t, "sample", "flow"), eps - x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(schedule.convert(eps, x_t, t, "epsilon", "flow"), eps - x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(schedule.convert(eps - x0, x_t, t, "flow", "sample"), x0, rtol=1e-10, atol=1e-10)
    # for flow, x_t = x0 + sigma * u
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, x0 + sigma * (eps - x0), rtol=1e-12, atol=1e-12)


def test_convert_float32_keeps_dtype_and_scalar_t():
    schedule = _vp("scaled_linear")[0]
    t, x_t, truth = _ground_truth(schedule, [400.0, 400.0], seed=5)
    out = schedule.convert(truth["epsilon"].float(), x_t.float(), 400, "epsilon", "v_prediction")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), truth["v_prediction"], rtol=1e-5, atol=1e-5)
    same = truth["epsilon"].float()
    assert schedule.convert(same, x_t.float(), 400, "eps", "epsilon") is same


# ------------------------------------------------------------------------------------------ time maps
@pytest.mark.parametrize("name", list(VP_BETAS))
def test_t_from_edm_sigma_inverts_vp(name):
    schedule = _vp(name)[0]
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    a, s = schedule.alpha_sigma(t, torch.float64)
    got = schedule.t_from_edm_sigma(s / a)
    # searchsorted on the table; allow the neighbour for round-off exactly at a table entry
    assert torch.all((got - t.double()).abs() <= 1)


def test_t_from_edm_sigma_inverts_flow():
    schedule = _flow()[0]
    t = torch.tensor([10.0, 250.0, 500.0, 900.0], dtype=torch.float64)
    a, s = schedule.alpha_sigma(t, torch.float64)
    torch.testing.assert_close(schedule.t_from_edm_sigma(s / a), t)


# ------------------------------------------------------------------------------------------ sample_t
def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("dist", ["uniform", "logit_normal", "lognormal", "u_shaped", "discrete"])
def test_sample_t_in_range(kind, dist):
    schedule = _vp("scaled_linear")[0] if kind == "vp" else _flow()[0]
    kwargs = {"grid": [999, 749, 499, 249]} if dist == "discrete" else {}
    if dist == "lognormal":
        kwargs.update(mean=-1.1, std=2.0)
    if dist == "logit_normal" and kind == "vp":
        with pytest.raises(ValueError, match="lognormal"):
            schedule.sample_t(10, dist, generator=_g())
        return
    t = schedule.sample_t(4000, dist, generator=_g(), **kwargs)
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= schedule.t_max
    if kind == "vp" and dist != "logit_normal":
        assert torch.equal(t, t.round()), f"VP {dist} timesteps must be integers"
    if dist == "discrete":
        assert set(t.tolist()) <= {999.0, 749.0, 499.0, 249.0}
        assert len(set(t.tolist())) == 4
    # reproducible with a generator
    assert torch.equal(t, schedule.sample_t(4000, dist, generator=_g(), **kwargs))


def test_sample_t_respects_t_min_t_max():
    vp = _vp("linear")[0]
    t = vp.sample_t(5000, "uniform", t_min=20, t_max=30, generator=_g(1))
    assert t.min() == 20 and t.max() == 30 and torch.equal(t, t.round())
    t = vp.sample_t(5000, "u_shaped", t_min=100, t_max=200, generator=_g(1))
    assert t.min() >= 100 and t.max() <= 200
    t = vp.sample_t(5000, "lognormal", t_min=100, t_max=200, generator=_g(1))
    assert t.min() >= 100 and t.max() <= 200


def test_sample_t_vp_uniform_covers_all_integers():
    t = _vp("linear")[0].sample_t(50000, "uniform", generator=_g(2))
    assert t.min() == 0 and t.max() == 999
    assert len(torch.unique(t)) == 1000


def test_sample_t_errors():
    schedule = _vp("linear")[0]
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        schedule.sample_t(4, "gaussian")
    with pytest.raises(ValueError, match="grid"):
        schedule.sample_t(4, "discrete")
    with pytest.raises(ValueError, match="grid"):
        schedule.sample_t(4, "discrete", grid=[])


def test_flow_uniform_is_shifted_like_the_scheduler():
    schedule, sched = _flow(3.0)
    t = schedule.sample_t(40000, "uniform", generator=_g(3)).double()
    sigma = t / 1000
    # the median of sigma is shift_sigma(0.5) = 0.75 for shift 3
    assert float(sigma.median()) == pytest.approx(float(schedule.shift_sigma(torch.tensor(0.5))), abs=0.01)
    # quantiles match those of the scheduler's own training grid (which carries the same shift)
    qs = np.linspace(0.05, 0.95, 19)
    ours = np.quantile(sigma.numpy(), qs)
    ref = np.quantile(sched.sigmas.double().numpy(), qs)
    np.testing.assert_allclose(ours, ref, atol=0.015)
    # shift 1 is plain uniform
    t1 = _flow(1.0)[0].sample_t(40000, "uniform", generator=_g(3)).double() / 1000
    assert float(t1.median()) == pytest.approx(0.5, abs=0.01)


def test_logit_normal_is_shifted_sigmoid_of_gaussian():
    schedule = _flow(1.0)[0]
    t = schedule.sample_t(40000, "logit_normal", mean=0.0, std=1.0, generator=_g(4)).double() / 1000
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(logit.std()) == pytest.approx(1.0, abs=0.03)
    shifted = _flow(3.0)[0].sample_t(40000, "logit_normal", generator=_g(4)).double() / 1000
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.01)


def test_lognormal_maps_edm_sigma_to_t():
    schedule = _flow(1.0)[0]
    t = schedule.sample_t(40000, "lognormal", mean=-1.1, std=2.0, generator=_g(5)).double()
    s = t / 1000
    edm = s / (1 - s).clamp(min=1e-12)
    inside = (t > 0) & (t < 1000)
    assert float(torch.log(edm[inside]).median()) == pytest.approx(-1.1, abs=0.05)


def test_u_shaped_puts_mass_at_the_ends():
    t = _flow(1.0)[0].sample_t(40000, "u_shaped", a=4.0, generator=_g(6)).double() / 1000
    ends = ((t < 0.1) | (t > 0.9)).double().mean()
    middle = ((t > 0.45) & (t < 0.55)).double().mean()
    assert ends > 3 * middle  # 20% of the interval holds > 3x the mass of a central 10%
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)  # symmetric
    # rfpp's U shape: p(u) = a (e^{au} + e^{a(1-u)}) / (2 (e^a - 1)) on [0, 1] (their code: exponential
    # samples, mirrored half the time) -> P(u < 0.1)
    a = 4.0
    p_low = ((math.exp(a * 0.1) - 1) + (math.exp(a) - math.exp(a * 0.9))) / (2 * (math.exp(a) - 1))
    assert float((t < 0.1).double().mean()) == pytest.approx(p_low, abs=0.01)
