"""The student step rules (``stepdistill.solvers.STEP_RULES``) and LCM's grid and scalings: each rule against the
Diffusers scheduler step it reproduces, and the three places that use them (``sample_student``, the DMD family's
backward simulation, consistency distillation's sampling) against their code before the rules were shared, to the
bit (the ``_before_*`` functions below are that code, kept as the reference)."""
import math

import pytest
import torch
from diffusers import (CMStochasticIterativeScheduler, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchLCMScheduler, LCMScheduler, TCDScheduler, UNet2DModel)

from stepdistill import Cond, Denoiser, NoiseSchedule
from stepdistill.pipelines.recipes import _lcm_grid
from stepdistill.pipelines.sampling import SchedulerLevels, sample_student, sampler_of, student_timesteps
from stepdistill.solvers import (STEP_RULES, ScheduleLevels, lcm_boundary_scalings, lcm_grid, renoise, step_rule)
from stepdistill.trainers.consistency import ConsistencyConfig, ConsistencyObjective
from stepdistill.trainers.dmd import DMDConfig, DMDObjective
from tiny import TINY_SCHEDULER, TINY_UNET

VP_CONFIG = {k: v for k, v in TINY_SCHEDULER.items()}


def vp_scheduler(cls, **config):
    return cls.from_config({**VP_CONFIG, "prediction_type": "sample", **config})


@pytest.fixture(scope="module")
def students():
    """A tiny class-conditional VP (v-prediction) and flow (velocity) student, with their schedulers."""
    torch.manual_seed(0)
    vp_sched = DDPMScheduler(**TINY_SCHEDULER)
    vp = Denoiser(UNet2DModel(**TINY_UNET), NoiseSchedule.from_scheduler(vp_sched), "v_prediction", null_class=10)
    flow_sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = Denoiser(UNet2DModel(**TINY_UNET), NoiseSchedule.from_scheduler(flow_sched), "flow", null_class=10)
    return {"vp": (vp, vp_sched), "flow": (flow, flow_sched)}


NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
COND = Cond(class_labels=torch.tensor([0, 3, 7]))


# ---------------------------------------------------------------------------------------------- LCM's grid, scalings
def test_lcm_grid_and_boundary_scalings_are_lcm_schedulers_in_both_forms():
    sched = vp_scheduler(LCMScheduler)
    for original, k in ((50, 4), (50, 1), (4, 4), (20, 3)):
        sched.set_timesteps(k, original_inference_steps=original)
        assert _lcm_grid(1000, original, k) == sched.timesteps.tolist()
    assert lcm_grid(1000, 50) == list(range(19, 1000, 20))
    t = torch.arange(0, 1000, dtype=torch.float32)
    for scaling in (10.0, 7.0):
        c_skip, c_out = lcm_boundary_scalings(t, scaling)
        assert c_skip.dtype == c_out.dtype == torch.float32
        for i in range(1000):  # the number form is the formula in Python floats; both round to the same float32
            sd, st = 0.25, float(i) * scaling
            skip, out = lcm_boundary_scalings(i, scaling)
            assert (skip, out) == (sd / (st**2 + sd), st / math.sqrt(st**2 + sd))
            assert torch.tensor(skip, dtype=torch.float32) == c_skip[i] and torch.tensor(out) == c_out[i]
        ref_skip, ref_out = LCMScheduler(timestep_scaling=scaling).get_scalings_for_boundary_condition_discrete(259)
        assert float(c_skip[259]) == pytest.approx(float(ref_skip), rel=1e-6)
        assert float(c_out[259]) == pytest.approx(float(ref_out), rel=1e-6)


def test_schedule_levels_are_add_noise_and_the_registry_names_its_rules():
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER))
    x0, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t in (0, 259.0, 999):
        assert torch.equal(renoise(x0, t, ScheduleLevels(schedule, x0), z), schedule.add_noise(x0, z, t))
    assert set(STEP_RULES) == {"ddim", "lcm", "tcd", "flow_euler", "flow_lcm", "cm"}
    assert all(rule.step.__doc__ for rule in STEP_RULES.values())
    assert step_rule("flow_euler").prediction == "flow" and not step_rule("ddim").fresh_noise
    with pytest.raises(ValueError, match="unknown step rule 'euler'"):
        step_rule("euler")


# ---------------------------------------------------------------------------------------------- rules vs Diffusers
def _model(x, t):
    """A stand-in network output (an x0 or a velocity) that depends on the sample and the timestep."""
    return torch.tanh(x) * 0.8 + 0.001 * float(t)


@pytest.mark.parametrize("name, make, kwargs", [
    ("ddim", lambda: vp_scheduler(DDIMScheduler, timestep_spacing="trailing"), {"eta": 0.0}),
    ("lcm", lambda: vp_scheduler(LCMScheduler), {}),
    ("tcd", lambda: vp_scheduler(TCDScheduler), {"eta": 0.3}),
    ("tcd", lambda: vp_scheduler(TCDScheduler), {"eta": 1.0}),
    ("flow_euler", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
    ("flow_lcm", lambda: FlowMatchLCMScheduler(shift=3.0), {}),
])
def test_each_rule_is_its_diffusers_step(name, make, kwargs):
    sched, steps = make(), 4
    assert sampler_of(sched) == name
    sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps]
    levels = SchedulerLevels(sched, "flow" if name.startswith("flow") else "vp")
    gamma = kwargs.get("eta", 0.3)
    params = {"gamma": gamma} if name == "tcd" else {}
    x_ref = x = NOISE.clone()
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(_model(x_ref, t), t, x_ref, generator=g, **kwargs).prev_sample
    rule, g = step_rule(name), torch.Generator().manual_seed(3)
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        t_next = {"ddim": int(t) - 1000 // steps, "tcd": 0 if last else int(ts[i + 1]),
                  "flow_euler": 0 if last else ts[i + 1]}.get(name, None if last else ts[i + 1])
        draw = rule.fresh_noise and not last and gamma > 0
        z = torch.randn(x.shape, generator=g) if draw else None
        pred = _model(x, sched.timesteps[i])
        if name == "flow_lcm":  # FlowMatchLCMScheduler takes the velocity; the rule takes its x0, x - sigma u
            pred = x - levels.alpha_sigma(t)[1] * pred
        x = rule(x, pred, t, t_next, levels, z, **params)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)


def test_cm_rule_is_consistency_models_multistep_step():
    sched = CMStochasticIterativeScheduler(num_train_timesteps=41)
    sched.set_timesteps(timesteps=[40, 25, 10])

    class KarrasLevels:  # EDM levels (alpha = 1) by step index; the last index is the appended sigma_min
        def alpha_sigma(self, i):
            return 1.0, sched.sigmas[i]

    x_ref = x = NOISE * sched.init_noise_sigma
    g_ref, g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rule, bounds = step_rule("cm"), dict(sigma_min=sched.config.sigma_min, sigma_max=sched.config.sigma_max)
    for i, t in enumerate(sched.timesteps):
        out = _model(x, t)
        c_skip, c_out = sched.get_scalings_for_boundary_condition(sched.sigmas[i])
        x0 = c_out * out + c_skip * x  # the consistency model's output f(x, sigma)
        sched.scale_model_input(x_ref, t)
        x_ref = sched.step(out, t, x_ref, generator=g_ref).prev_sample
        z = torch.randn(x.shape, generator=g)
        assert torch.equal(rule(x, x0, i, None, KarrasLevels(), z, **bounds), x0.clamp(-1, 1))  # the last step's
        # the scheduler steps to sigma_min at the end, adding noise of sqrt(float32(s_min)^2 - s_min^2) ~ 1e-6
        x = rule(x, x0, i, i + 1, KarrasLevels(), z, **bounds)
        assert torch.equal(x, x_ref)


# ---------------------------------------------------------------------------------------------- before and after
def _before_sample_student(denoiser, scheduler, noise, num_steps, cond=None, *, guidance_scale=None, generator=None,
                           eta=None):
    """``sample_student`` as it was written before the step rules (its five update rules inline)."""
    sampler = sampler_of(scheduler)
    ts = student_timesteps(scheduler, num_steps)
    x, n = noise.float(), noise.shape[0]

    def abar(t):
        if t < 0:
            return 1.0 if scheduler.config.get("set_alpha_to_one", True) else float(scheduler.alphas_cumprod[0])
        return float(scheduler.alphas_cumprod[int(t)])

    def predict(x, t, output):
        return denoiser(x, torch.full((n,), float(t)), cond, output=output, guidance_scale=guidance_scale).float()

    big_t = scheduler.config.num_train_timesteps
    if sampler == "flow_euler":
        sigmas = [t / big_t for t in ts] + [0.0]
        for i, t in enumerate(ts):
            x = x + (sigmas[i + 1] - sigmas[i]) * predict(x, t, "flow")
        return x
    if sampler == "flow_lcm":
        for i, t in enumerate(ts):
            x0 = predict(x, t, "sample")
            if i == len(ts) - 1:
                return x0
            z = torch.randn(x.shape, generator=generator, dtype=x0.dtype)
            s_next = float(ts[i + 1]) / big_t
            x = (1 - s_next) * x0 + s_next * z
    if sampler == "ddim":
        for t in ts:
            x0 = predict(x, t, "sample")
            a_t = abar(int(t))
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            a_p = abar(int(t) - big_t // len(ts))
            x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
        return x
    if sampler == "tcd":
        gamma = 0.3 if eta is None else float(eta)
        for i, t in enumerate(ts):
            x0 = predict(x, t, "sample")
            a_t = abar(int(t))
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            t_next = int(ts[i + 1]) if i + 1 < len(ts) else 0
            s = int(torch.floor((1 - gamma) * torch.tensor(t_next)))
            a_s = abar(s)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
            if gamma > 0 and i + 1 < len(ts):
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                ratio = abar(t_next) / a_s
                x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * z
        return x
    scaling = scheduler.config.get("timestep_scaling", 10.0)
    for i, t in enumerate(ts):
        x0 = predict(x, t, "sample")
        scaled = float(t) * scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
        denoised = c_out * x0 + c_skip * x
        if i == len(ts) - 1:
            return denoised
        z = torch.randn(x.shape, generator=generator, dtype=denoised.dtype)
        a_p = abar(int(ts[i + 1]))
        x = math.sqrt(a_p) * denoised + math.sqrt(1 - a_p) * z


@pytest.mark.parametrize("kind, make, eta", [
    ("vp", lambda: vp_scheduler(DDIMScheduler, timestep_spacing="leading"), None),
    ("vp", lambda: vp_scheduler(DDIMScheduler, timestep_spacing="leading", set_alpha_to_one=False), None),
    ("vp", lambda: vp_scheduler(DDIMScheduler, timestep_spacing="trailing"), None),
    ("vp", lambda: vp_scheduler(LCMScheduler), None),
    ("vp", lambda: vp_scheduler(LCMScheduler, original_inference_steps=4, timestep_scaling=7.0), None),
    ("vp", lambda: vp_scheduler(TCDScheduler), None),
    ("vp", lambda: vp_scheduler(TCDScheduler), 0.0),
    ("vp", lambda: vp_scheduler(TCDScheduler), 1.0),
    ("flow", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), None),
    ("flow", lambda: FlowMatchLCMScheduler(shift=3.0), None),
])
def test_sample_student_is_what_it_was(students, kind, make, eta):
    student, _ = students[kind]
    for steps in (1, 2, 4):
        args = (student, make(), NOISE, steps, COND)
        kw = {"guidance_scale": 2.0, "eta": eta}
        after = sample_student(*args, **kw, generator=torch.Generator().manual_seed(3))
        before = _before_sample_student(*args, **kw, generator=torch.Generator().manual_seed(3))
        assert torch.equal(after, before), (steps, (after - before).abs().max())


def _before_generate(o, noise, cond, grad=True):
    """DMD's backward simulation as it was written before the step rules."""
    ts = o.timesteps
    stop = int(torch.randint(0, len(ts), ())) if grad else len(ts) - 1
    x, scaling, limit = noise, o.student_scheduler.config.get("timestep_scaling", 10.0), o.config.output_clamp
    for i in range(stop + 1):
        t = torch.full((x.shape[0],), ts[i])
        with torch.set_grad_enabled(grad and i == stop):
            x0 = o.generator(x, t, cond)
            x0 = x0 if not limit else limit * torch.tanh(x0 / limit)
            if o.sampler == "lcm":
                scaled = ts[i] * scaling
                x0 = scaled / math.sqrt(scaled**2 + 0.25) * x0 + 0.25 / (scaled**2 + 0.25) * x
        if i < stop:
            if o.sampler in ("lcm", "flow_lcm"):
                x = o.schedule.add_noise(x0.detach(), torch.randn_like(x0), ts[i + 1])
            else:
                eps = o.schedule.convert(x0.detach(), x, t, "sample", "epsilon")
                x = o.schedule.add_noise(x0.detach(), eps, ts[i + 1])
    return x0


@pytest.mark.parametrize("kind, config", [
    ("vp", dict(recipe="lcm_uniform", student_steps=4)),
    ("vp", dict(recipe="lcm", student_steps=4, output_clamp=1.5)),
    ("vp", dict(recipe="lcm_uniform", conditioning_timestep=399)),
    ("flow", dict(recipe="flow_lcm", student_steps=4)),
    ("flow", dict(recipe="flow_euler", student_steps=4, output_clamp=2.0)),
])
def test_dmd_backward_simulation_is_what_it_was(students, kind, config):
    teacher, sched = students[kind]
    o = DMDObjective(DMDConfig(**config), teacher, sched, 10, 8, 1)
    for seed in range(4):  # grad=True: a random number of no-grad steps, then one with gradients
        torch.manual_seed(seed)
        after = o._generate(NOISE, COND)
        torch.manual_seed(seed)
        before = _before_generate(o, NOISE, COND)
        assert torch.equal(after, before) and after.requires_grad
        (g_after,) = torch.autograd.grad(after.sum(), next(o.generator.parameters()))
        (g_before,) = torch.autograd.grad(before.sum(), next(o.generator.parameters()))
        assert torch.equal(g_after, g_before)


@pytest.mark.parametrize("kind, config", [
    ("vp", dict(student_steps=4)),
    ("vp", dict(student_steps=3, sample_timesteps=[999, 499, 99], timestep_scaling=7.0)),
    ("flow", dict(student_steps=4)),
])
def test_consistency_sampling_is_what_it_was(students, kind, config):
    teacher, sched = students[kind]
    o = ConsistencyObjective(ConsistencyConfig(**config), teacher, sched, 10, 8, 1)
    torch.manual_seed(1)
    after = o.sample({"batch_size": 3}, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)  # before: x0 from the consistency function, then add_noise to the next timestep
    x, cond = o._sample_inputs(3, torch.Generator().manual_seed(2))
    ts = o.sample_timesteps()
    for i, t in enumerate(ts):
        tt = torch.full((3,), float(t))
        x0 = o.f(x, o.student(x, tt, cond), tt)
        x = x0 if i == len(ts) - 1 else o.schedule.add_noise(x0, torch.randn_like(x0), float(ts[i + 1]))
    assert torch.equal(after, x.clamp(-1, 1))
