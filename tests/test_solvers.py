"""Teacher ODE/SDE steps against Diffusers' schedulers and against analytic solutions.

The "model" is a fixed smooth function of (x, t) that stands for a network's raw prediction (eps or velocity);
it is turned into the x0 predictor the solvers take through the schedule. For Gaussian data
``x0 ~ N(0, c^2 I)`` the exact x0 predictor is ``E[x0 | x_t] = a c^2 / (a^2 c^2 + s^2) x_t`` and the exact
probability-flow ODE solution scales ``x_t`` with the marginal std ``sqrt(a^2 c^2 + s^2)``.
"""
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)

from stepdistill.schedule import NoiseSchedule
from stepdistill.solvers import (
    ddim_from_x0,
    ddim_step,
    euler_step,
    heun_step,
    sample,
    scheduler_timesteps,
    solver_step,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (3, 2, 4, 4)


def _x(seed=0, dtype=torch.float32, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def raw_fn(x, t):
    """A fixed smooth stand-in for a network output at (x, t); ``t`` is the backbone timestep, shape [B]."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * x * torch.cos(t / 300) + 0.3 * torch.sin(1.5 * x + t / 170) - 0.1


def x0_model(schedule, src):
    """The x0 predictor for a network that outputs ``raw_fn`` in parameterization ``src``."""
    return lambda x, t: schedule.convert(raw_fn(x, t), x, t, src, "sample")


def gaussian_x0(schedule, c):
    def model(x, t):
        a, s = (v.reshape(-1, *([1] * (x.ndim - 1))) for v in schedule.alpha_sigma(t, x.dtype))
        return a * c**2 / (a**2 * c**2 + s**2) * x
    return model


def marginal_std(schedule, t, c):
    a, s = schedule.alpha_sigma(torch.tensor(float(t)), torch.float64)
    return math.sqrt(float(a**2 * c**2 + s**2))


def _vp():
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    return NoiseSchedule.from_scheduler(sched), sched


def _flow(shift=3.0):
    return NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))


# ------------------------------------------------------------------------------------------ DDIM
@pytest.mark.parametrize("num_steps,t", [(10, 999), (10, 501), (50, 120), (2, 999), (4, 750)])
def test_ddim_matches_diffusers(num_steps, t):
    """eta = 0, epsilon model; (2, 999) jumps 500 timesteps."""
    schedule, sched = _vp()
    sched.set_timesteps(num_steps)
    x = _x(1)
    t_next = t - 1000 // num_steps
    ref = sched.step(raw_fn(x, torch.tensor([float(t)])), t, x, eta=0.0).prev_sample
    ours = ddim_step(x0_model(schedule, "epsilon"), schedule, x, t, t_next)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ddim_matches_diffusers_v_prediction_and_eta():
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    schedule = NoiseSchedule.from_scheduler(sched)
    sched.set_timesteps(10)
    x, z = _x(2), _x(3)
    for eta in (0.0, 0.5, 1.0):
        ref = sched.step(raw_fn(x, torch.tensor([601.0])), 601, x, eta=eta, variance_noise=z).prev_sample
        ours = ddim_step(x0_model(schedule, "v_prediction"), schedule, x, 601, 501, eta=eta, noise=z)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ddim_per_sample_timesteps_and_from_x0():
    schedule, _ = _vp()
    model = x0_model(schedule, "epsilon")
    x = _x(4, torch.float64)
    t, t_next = torch.tensor([900.0, 500.0, 100.0]), torch.tensor([700.0, 20.0, 99.0])
    batched = ddim_step(model, schedule, x, t, t_next)
    assert batched.dtype == torch.float64
    for i in range(3):
        one = ddim_step(model, schedule, x[i:i + 1], t[i], t_next[i])
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ddim_from_x0(model(x, t), x, schedule, t, t_next), batched)
    # to the same timestep is the identity; the x0 prediction is kept along the step
    torch.testing.assert_close(ddim_step(model, schedule, x, t, t), x, rtol=1e-12, atol=1e-12)
    x0 = model(x, t)
    eps_before = schedule.convert(x0, x, t, "sample", "epsilon")
    eps_after = schedule.convert(x0, batched, t_next, "sample", "epsilon")
    torch.testing.assert_close(eps_after, eps_before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t", [999, 500, 37, 1])
def test_ddim_eta1_is_the_ddpm_posterior(t):
    """eta = 1 between consecutive timesteps is DDPM's ancestral step: same mean, same variance."""
    sched = DDPMScheduler(**SD_BETAS, clip_sample=False)
    schedule = NoiseSchedule.from_scheduler(sched)
    x = _x(5)
    raw = raw_fn(x, torch.tensor([float(t)]))
    ref = sched.step(raw, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    model = x0_model(schedule, "epsilon")
    ours = ddim_step(model, schedule, x, t, t - 1, eta=1.0, noise=z)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # mean and variance separately (float64)
    x64 = x.double()
    mean = ddim_step(model, schedule, x64, t, t - 1, eta=1.0, noise=torch.zeros_like(x64))
    std = (ddim_step(model, schedule, x64, t, t - 1, eta=1.0, noise=torch.ones_like(x64)) - mean)
    torch.testing.assert_close(std, torch.full_like(std, float(sched._get_variance(t)) ** 0.5),
                               rtol=1e-5, atol=1e-9)  # Diffusers' variance is float32
    abar = sched.alphas_cumprod.double()
    ab_t, ab_p = abar[t], abar[t - 1]
    beta = 1 - ab_t / ab_p
    x0 = model(x64, torch.tensor([float(t)]))
    post_mean = (ab_p.sqrt() * beta / (1 - ab_t)) * x0 + ((1 - beta).sqrt() * (1 - ab_p) / (1 - ab_t)) * x64
    torch.testing.assert_close(mean, post_mean, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ Euler
def test_flow_euler_matches_diffusers_and_ddim():
    schedule = _flow(3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    ts = [float(t) for t in sched.timesteps] + [0.0]
    model = x0_model(schedule, "flow")
    x_ref = x = _x(6)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x_ref = sched.step(raw_fn(x_ref, torch.tensor([t])), torch.tensor(t), x_ref).prev_sample
        x_ddim = ddim_step(model, schedule, x, t, t_next)
        x = euler_step(model, schedule, x, t, t_next)
        torch.testing.assert_close(x_ddim, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)


def test_flow_euler_is_x_plus_dsigma_times_velocity():
    schedule = _flow(1.0)
    x = _x(7, torch.float64)
    t, t_next = torch.tensor([800.0, 600.0, 300.0]), torch.tensor([500.0, 100.0, 0.0])
    ours = euler_step(x0_model(schedule, "flow"), schedule, x, t, t_next)
    ref = x + ((t_next - t).double() / 1000).view(-1, 1, 1, 1) * raw_fn(x, t)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t,t_next", [(999, 899), (999, 0), (500, 499), (300, 20)])
def test_vp_euler_equals_ddim(t, t_next):
    schedule, _ = _vp()
    model = x0_model(schedule, "epsilon")
    x = _x(8, torch.float64)
    torch.testing.assert_close(euler_step(model, schedule, x, t, t_next), ddim_step(model, schedule, x, t, t_next),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ Heun
def test_flow_heun_matches_diffusers():
    schedule = _flow(3.0)
    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    grid = [float(t) for t in sched.timesteps[::2]] + [0.0]  # unique timesteps, then sigma = 0
    x_ref = x = _x(9)
    model = x0_model(schedule, "flow")
    calls = iter(sched.timesteps)
    for t, t_next in zip(grid[:-1], grid[1:]):
        for _ in range(1 if t_next == 0 else 2):  # Diffusers (and EDM) end with an Euler step to sigma = 0
            tt = next(calls)
            x_ref = sched.step(raw_fn(x_ref, tt.reshape(1)), tt, x_ref).prev_sample
        x = heun_step(model, schedule, x, t, t_next)
        torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)
    assert next(calls, None) is None


def test_vp_heun_matches_diffusers_heun_discrete():
    """HeunDiscreteScheduler works on y = x / alpha with EDM sigmas; custom integer timesteps make its
    sigmas exactly those of the VP table, so the comparison is exact up to float32."""
    sched = HeunDiscreteScheduler(**SD_BETAS)
    schedule = NoiseSchedule.from_scheduler(sched)
    grid = [999.0, 800.0, 601.0, 400.0, 250.0, 100.0]
    sched.set_timesteps(timesteps=grid)
    model = x0_model(schedule, "epsilon")
    x = _x(10)
    y = x / schedule.alpha(torch.tensor(grid[0]))  # Diffusers' latents, scaled by init_noise_sigma
    calls = list(sched.timesteps)
    k = 0
    for t, t_next in zip(grid[:-1], grid[1:]):
        for _ in range(2):
            tt = calls[k]
            k += 1
            inp = sched.scale_model_input(y, tt)
            y = sched.step(raw_fn(inp, tt.reshape(1)), tt, y).prev_sample
        x = heun_step(model, schedule, x, t, t_next)
        torch.testing.assert_close(x, y * schedule.alpha(torch.tensor(t_next)), rtol=1e-4, atol=1e-5)


def test_vp_heun_is_edm_algorithm_1():
    """Karras et al. 2022, Alg. 1 (no churn), written out in EDM's sigma and x / alpha."""
    schedule, _ = _vp()
    model = x0_model(schedule, "epsilon")
    x = _x(11, torch.float64)
    t, t_next = torch.tensor([700.0] * 3), torch.tensor([450.0] * 3)
    a, s = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t, torch.float64))
    a_n, s_n = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t_next, torch.float64))
    sig, sig_n = s / a, s_n / a_n
    D = lambda y, sg, tt, aa: model(y * aa, tt)  # noqa: E731  EDM's denoiser on the scaled variable
    y = x / a
    d = (y - D(y, sig, t, a)) / sig
    y_n = y + (sig_n - sig) * d
    d2 = (y_n - D(y_n, sig_n, t_next, a_n)) / sig_n
    y_n = y + (sig_n - sig) * 0.5 * (d + d2)
    torch.testing.assert_close(heun_step(model, schedule, x, t, t_next), y_n * a_n, rtol=1e-10, atol=1e-10)


def test_heun_final_step_to_zero_is_euler():
    schedule = _flow(1.0)
    model = x0_model(schedule, "flow")
    x = _x(12, torch.float64)
    torch.testing.assert_close(heun_step(model, schedule, x, 400, 0), euler_step(model, schedule, x, 400, 0))
    # per sample: only the samples that end at sigma = 0 take the Euler step (and nothing is NaN)
    t, t_next = torch.tensor([400.0, 400.0, 700.0]), torch.tensor([0.0, 200.0, 0.0])
    mixed = heun_step(model, schedule, x, t, t_next)
    assert torch.isfinite(mixed).all()
    for i in range(3):
        torch.testing.assert_close(mixed[i:i + 1], heun_step(model, schedule, x[i:i + 1], t[i], t_next[i]),
                                   rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ accuracy
def _solve(solver, schedule, model, x, ts):
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = solver_step(solver, model, schedule, x, t, t_next)
    return x


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_heun_is_second_order_euler_first_order_on_gaussian_data(kind):
    c = 0.5
    schedule = _vp()[0] if kind == "vp" else _flow(1.0)
    t0, t1 = (900.0, 60.0) if kind == "vp" else (1000.0, 50.0)
    model = gaussian_x0(schedule, c)
    x = _x(13, torch.float64)
    exact = x * marginal_std(schedule, t1, c) / marginal_std(schedule, t0, c)
    err = {}
    for solver in ("euler", "heun"):
        for n in (8, 16, 32):
            # integer timesteps, uniform in t: the endpoints (and so the exact answer) do not move with n
            ts = [float(round(v)) for v in torch.linspace(t0, t1, n + 1).tolist()]
            err[solver, n] = float((_solve(solver, schedule, model, x, ts) - exact).abs().max() / exact.abs().max())
    for n in (8, 16, 32):
        assert err["heun", n] < err["euler", n] / 3, err
    # halving the step halves Euler's error and quarters Heun's
    assert 1.7 < err["euler", 8] / err["euler", 16] < 2.3, err
    assert 1.7 < err["euler", 16] / err["euler", 32] < 2.3, err
    assert 3.2 < err["heun", 8] / err["heun", 16] < 5.0, err
    assert 3.2 < err["heun", 16] / err["heun", 32] < 5.0, err


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_sample_converges_to_data_std(kind):
    """DDIM with the exact x0 predictor: the output std tends to the data std c as the step count grows
    (both schedulers' grids end near t = 0 for every step count, so the error is the solver's)."""
    c = 0.5
    if kind == "vp":
        schedule, sched = _vp()  # "leading" spacing: the last timestep is 0
    else:
        schedule = _flow(3.0)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = gaussian_x0(schedule, c)
    noise = _x(14, torch.float64, shape=(2048, 1, 1, 1))
    errors = []
    for n in (4, 16, 64, 256):
        ts = scheduler_timesteps(sched, n)
        assert ts[-1] < 10
        out = sample(model, schedule, noise, ts, solver="ddim")
        assert out.dtype == torch.float64
        # every solver here is linear in x for Gaussian data: out = k * noise exactly
        k = (out / noise).flatten()
        torch.testing.assert_close(k, k[:1].expand_as(k), rtol=1e-9, atol=1e-12)
        # the std the output has when x_T has the marginal std at ts[0]
        errors.append(abs(float(k[0]) * marginal_std(schedule, ts[0], c) - c) / c)
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.015, errors
    assert 2.5 < errors[2] / errors[3] < 5.5, errors  # first order in the step count
    # the empirical std follows (noise is used as x_T directly)
    assert float(out.std()) == pytest.approx(c * float(noise.std()) / marginal_std(schedule, ts[0], c), rel=0.02)


def test_sample_solvers_agree_in_the_limit_and_ancestral_std():
    c = 0.5
    schedule, sched = _vp()
    sched.config.timestep_spacing = "trailing"
    model = gaussian_x0(schedule, c)
    noise = _x(15, torch.float64, shape=(4096, 1, 1, 1))
    ts = scheduler_timesteps(sched, 50)
    outs = {s: sample(model, schedule, noise, ts, solver=s) for s in ("ddim", "euler", "heun")}
    torch.testing.assert_close(outs["ddim"], outs["euler"], rtol=1e-9, atol=1e-9)
    # exact: the ODE carries x_T to std c * a c / m(t_last) at t_last, then E[x0 | x] is taken
    m_T, m_l = marginal_std(schedule, ts[0], c), marginal_std(schedule, ts[-1], c)
    a_l = float(schedule.alpha(torch.tensor(ts[-1]), torch.float64))
    exact = noise * (a_l * c**2 / (m_l * m_T))
    err = {s: float((o - exact).abs().max() / exact.abs().max()) for s, o in outs.items()}
    assert err["heun"] < err["ddim"] / 10 and err["ddim"] < 0.05, err
    # ancestral sampling (eta = 1, DDPM's "fixed_small" variance) with the exact posterior mean
    # under-disperses at coarse steps and tends to the data std as the steps shrink
    stds = []
    for n in (50, 200):
        ts = scheduler_timesteps(sched, n)
        out = sample(model, schedule, noise, ts, solver="ddim", eta=1.0, generator=torch.Generator().manual_seed(0))
        stds.append(float(out.std()) / float(noise.std()))
    assert stds[0] < stds[1] < c and stds[1] == pytest.approx(c, rel=0.05), stds
    with pytest.raises(ValueError, match="unknown solver"):
        sample(model, schedule, noise, ts, solver="dpm")


def test_zero_terminal_snr_start():
    """With ``rescale_betas_zero_snr`` alpha_999 = 0 (tau = inf): every solver starts there (as trailing grids do)
    and stays finite; Euler is DDIM, and Heun's first step from tau = inf is the Euler step."""
    sched = DDPMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True, prediction_type="v_prediction",
                          timestep_spacing="trailing")
    schedule = NoiseSchedule.from_scheduler(sched)
    assert float(schedule.alpha(torch.tensor(999.0))) == 0.0
    model = x0_model(schedule, "v_prediction")
    x = _x(16, torch.float64)
    t, t_next = torch.tensor([999.0, 999.0, 899.0]), torch.tensor([899.0, 500.0, 799.0])
    d = ddim_step(model, schedule, x, t, t_next)
    e = euler_step(model, schedule, x, t, t_next)
    h = heun_step(model, schedule, x, t, t_next)
    assert torch.isfinite(d).all() and torch.isfinite(e).all() and torch.isfinite(h).all()
    torch.testing.assert_close(e, d)
    torch.testing.assert_close(h[:2], e[:2])
    torch.testing.assert_close(h[2:], heun_step(model, schedule, x[2:], 899, 799))
    c = 0.5
    noise = _x(17, torch.float64, shape=(256, 1, 1, 1))
    ts = scheduler_timesteps(sched, 32)
    assert ts[0] == 999
    # exact: x_T has std m_T = 1; the ODE ends at std m(t_last), then E[x0 | x] scales by a c^2 / m^2
    a_l = float(schedule.alpha(torch.tensor(ts[-1]), torch.float64))
    k_exact = a_l * c**2 / marginal_std(schedule, ts[-1], c)
    for solver, tol in (("ddim", 0.1), ("euler", 0.1), ("heun", 0.01)):
        out = sample(gaussian_x0(schedule, c), schedule, noise, ts, solver=solver)
        assert torch.isfinite(out).all(), solver
        assert float((out / noise).mean()) == pytest.approx(k_exact, rel=tol), solver


# ------------------------------------------------------------------------------------------ DPM-Solver++(2M)
@pytest.mark.parametrize("num_steps,prediction", [(10, "epsilon"), (4, "v_prediction"), (25, "epsilon")])
def test_dpmpp_2m_sample_matches_diffusers(num_steps, prediction):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**SD_BETAS, prediction_type=prediction, algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="zero", timestep_spacing="trailing")
    schedule = NoiseSchedule.from_scheduler(DDIMScheduler(**SD_BETAS, prediction_type=prediction))
    sched.set_timesteps(num_steps)
    x = ref = _x(5, torch.float64)
    for t in sched.timesteps:
        ref = sched.step(raw_fn(ref, torch.tensor([float(t)])).double(), t, ref).prev_sample
    ours = sample(x0_model(schedule, prediction), schedule, x, sched.timesteps, "dpmpp_2m")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_dpmpp_2m_is_second_order_on_gaussian_data():
    from stepdistill.solvers import dpmpp_2m_step

    c, (t0, t1) = 0.5, (900.0, 60.0)
    schedule = _vp()[0]
    model = gaussian_x0(schedule, c)
    x_start = _x(13, torch.float64)
    exact = x_start * marginal_std(schedule, t1, c) / marginal_std(schedule, t0, c)
    err = {}
    for n in (8, 32, 64, 128):
        ts = [float(round(v)) for v in torch.linspace(t0, t1, n + 1).tolist()]
        x, x0_prev = x_start, None
        for i in range(n):
            x0 = model(x, torch.full((x.shape[0],), ts[i], dtype=torch.float64))
            x = dpmpp_2m_step(x0, x0_prev, x, schedule, ts[i - 1] if i else None, ts[i], ts[i + 1])
            x0_prev = x0
        err[n] = float((x - exact).abs().max() / exact.abs().max())
        assert err[n] < float((_solve("euler", schedule, model, x_start, ts) - exact).abs().max()
                              / exact.abs().max()) / 10, err
    assert 3.0 < err[32] / err[64] < 5.0 and 3.2 < err[64] / err[128] < 5.0, err  # second order (asymptotically)
