import pytest
import torch

from stepdistill import Cond
from stepdistill.config import ConfigError
from stepdistill.trainers import resolve
from stepdistill.denoiser import cfg
from stepdistill.trainers import build_trainer
from stepdistill.trainers.decoupled_dmd import ca_term, dm_term, normalize_per_sample, paper_tau_to_diffusers
from stepdistill.trainers.dmd import dmd_gradient
from tiny import tiny_dmd_raw


def randn(*shape, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


# ------------------------------------------------------------------------------------------- the formulas
def test_each_term_matches_its_formula():
    x, cond, uncond, fake = randn(3, 2, 4, 4)
    alpha = 3.5
    torch.testing.assert_close(dm_term(cond, fake).double(), fake - cond)  # -(s_real^c - s_fake^c), x0 space
    torch.testing.assert_close(ca_term(cond, uncond, alpha).double(), -(alpha - 1) * (cond - uncond))
    assert torch.count_nonzero(ca_term(cond, uncond, 1.0)) == 0  # no guidance, no CFG augmentation
    norm = normalize_per_sample(dm_term(cond, fake), x, cond)
    for i in range(3):  # DMD2's per-sample normaliser, mean |x - x0_real|
        torch.testing.assert_close(norm[i].double(), (fake[i] - cond[i]) / (x[i] - cond[i]).abs().mean(),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.float(), dmd_gradient(x, cond, fake))  # DM alone is DMD2 without guidance


def test_dm_plus_ca_is_the_cfg_dmd_gradient():
    x, cond, uncond, fake = randn(3, 2, 4, 4, seed=1)
    for alpha in (1.0, 1.75, 8.0):
        real_cfg = cfg(cond, uncond, alpha)  # standard CFG: uncond + alpha (cond - uncond)
        total = dm_term(cond, fake) + ca_term(cond, uncond, alpha)
        torch.testing.assert_close(total.double(), fake - real_cfg)  # Eq. 5 = Eq. 6
        torch.testing.assert_close(normalize_per_sample(total, x, real_cfg).float(), dmd_gradient(x, real_cfg, fake))


def test_paper_time_is_converted_at_the_boundary():
    assert paper_tau_to_diffusers(0.0, 0.05) == (0.95, 1.0)  # the paper's noisy range is high t here
    assert paper_tau_to_diffusers(0.7, 1.0) == pytest.approx((0.0, 0.3))


# ------------------------------------------------------------------------------------------- the objective
def run_config(tmp_path, teacher_folder, **objective):
    return resolve(tiny_dmd_raw(tmp_path / "ddmd", teacher_folder, "decoupled_dmd", **objective))


def test_decomposition_holds_through_the_teacher(tmp_path, teacher_folder):
    """Same x_t for both terms (tau_CA = tau_DM, same noise): DM + CA from the teacher's cond/uncond x0 equals
    the CFG'd DMD gradient computed by the Denoiser's own CFG (applied to its v prediction, then to x0)."""
    o = build_trainer(run_config(tmp_path, teacher_folder)).objective
    alpha = 2.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([50.0, 300.0, 600.0, 950.0])
    cond = Cond(class_labels=torch.tensor([0, 4, 7, 9]))
    with torch.no_grad():
        x_t = o.schedule.add_noise(x, torch.randn(x.shape, generator=g), t)
        x0_cond, x0_uncond = o.real_cond_uncond(x_t, t, cond)
        x0_cfg = o.teacher(x_t, t, cond, guidance_scale=alpha)
        x0_fake = o.fake_score(x_t, t, cond)
    assert not torch.allclose(x0_cond, x0_uncond)
    total = dm_term(x0_cond, x0_fake) + ca_term(x0_cond, x0_uncond, alpha)
    torch.testing.assert_close(total, x0_fake - x0_cfg, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(normalize_per_sample(total, x, x0_cfg), dmd_gradient(x, x0_cfg, x0_fake),
                               rtol=1e-4, atol=1e-5)


def test_generator_loss_gradient_is_the_weighted_sum_of_both_terms(tmp_path, teacher_folder):
    o = build_trainer(run_config(tmp_path, teacher_folder, real_guidance_scale=3.0, dm_weight=0.5,
                                 ca_weight=2.0)).objective
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    cond = Cond(class_labels=torch.tensor([1, 2, 3, 4]))
    torch.manual_seed(5)
    logs = o.distribution_matching(x, cond)
    sum(w * logs[k] for k, w in o.dm_weights().items()).backward()
    torch.manual_seed(5)  # replay: tau_DM, tau_CA, then one noise each
    t_dm, t_ca = o.dm_timesteps(4, x.device), o.ca_timesteps(4, x.device)
    xd = x.detach()
    with torch.no_grad():
        x_dm = o.schedule.add_noise(xd, torch.randn_like(xd), t_dm)
        x_ca = o.schedule.add_noise(xd, torch.randn_like(xd), t_ca)
        real_dm = o.teacher(x_dm, t_dm, cond)
        g_dm = dmd_gradient(xd, real_dm, o.fake_score(x_dm, t_dm, cond))
        c, u = o.teacher(x_ca, t_ca, cond), o.teacher(x_ca, t_ca, cond.null_like(null_class=10))
        g_ca = -(3.0 - 1) * (c - u) / (xd - o.teacher(x_ca, t_ca, cond, guidance_scale=3.0)).abs().mean(
            dim=(1, 2, 3), keepdim=True)  # DMD2's normaliser: the CFG'd real x0 at tau_CA
    assert not torch.equal(t_dm, t_ca)  # each term at its own re-noising timestep
    torch.testing.assert_close(x.grad * x.numel(), 0.5 * g_dm + 2.0 * g_ca, rtol=1e-4, atol=1e-5)


def test_ca_timesteps_stay_below_the_generator_input_noise(tmp_path, teacher_folder):
    o = build_trainer(run_config(tmp_path, teacher_folder, student_steps=4, ca_t_min=0.02, ca_t_max=0.98)).objective
    assert o.timesteps == [999.0, 749.0, 499.0, 249.0]
    o.generator_step = 0  # from pure noise (paper t = 0): tau_CA anywhere in its range
    t = o.ca_timesteps(4000, torch.device("cpu"))
    assert 20 <= t.min() < 30 and 970 < t.max() <= 980
    o.generator_step = 2  # input re-noised to t = 499: tau_CA < 499 (the paper's tau_CA > t)
    t = o.ca_timesteps(4000, torch.device("cpu"))
    assert 20 <= t.min() and 490 < t.max() <= 498
    o.config.ca_below_generator_t = False
    assert o.ca_timesteps(4000, torch.device("cpu")).max() > 900
    o.config.ca_below_generator_t = True
    from stepdistill.schedule import NoiseSchedule

    vp, o.schedule = o.schedule, NoiseSchedule("flow", 1000, shift=3.0)  # flow: sigma ~ U, then shifted
    edge = lambda u: float(o.schedule.shift_sigma(torch.tensor(u, dtype=torch.float64))) * 1000  # noqa: E731
    o.generator_step = 0
    t = o.ca_timesteps(4000, torch.device("cpu"))
    assert edge(0.02) - 1e-3 <= t.min() < edge(0.05) and edge(0.95) < t.max() <= edge(0.98) + 1e-3
    o.generator_step = 2  # below t = 499 as well
    t = o.ca_timesteps(4000, torch.device("cpu"))
    assert 480 < t.max() < 499
    o.schedule = vp
    for _ in range(6):  # the objective records which step made the sample
        o._generate(torch.randn(2, 1, 8, 8), Cond(class_labels=torch.tensor([0, 1])))
        limit = 980 if o.generator_step == 0 else o.timesteps[o.generator_step] - 1
        assert o.ca_timesteps(64, torch.device("cpu")).max() <= limit


@pytest.mark.parametrize("steps", [1, 4])
def test_decoupled_dmd_trains_the_generator(tmp_path, teacher_folder, steps):
    import json

    trainer = build_trainer(run_config(tmp_path, teacher_folder, student_steps=steps, real_guidance_scale=2.0))
    before = {k: v.clone() for k, v in trainer.objective.generator.state_dict().items()}
    trainer.train(resume=None)
    after = trainer.objective.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"generator/dm", "generator/ca", "generator/gan", "critic/fake_score"} <= set().union(*logs)


def test_bad_schedules_are_clear_errors(tmp_path, teacher_folder):
    with pytest.raises(ConfigError, match="ca_t_min and ca_t_max"):
        run_config(tmp_path, teacher_folder, ca_t_min=0.9, ca_t_max=0.5)
    with pytest.raises(ConfigError, match="ca_weight"):
        run_config(tmp_path, teacher_folder, ca_weight=-1.0)
