import typing

import pytest
import torch

from stepdistill import Cond
from stepdistill.config import ConfigError
from stepdistill.trainers import resolve
from stepdistill.trainers import build_trainer
from stepdistill.trainers.dmd import dmd_gradient
from stepdistill.trainers.f_distill import (Divergence, FDistillConfig, density_ratio, f_distill_gradient, f_weight,
                                            ratio_bin_normalize)
from tiny import tiny_dmd_raw

# h(r) as written in f-distill's table / FastGen, and the f of each divergence (D_f(p||q) = E_q f(p/q))
H = {"rkl": lambda r: torch.ones_like(r), "kl": lambda r: r, "js": lambda r: 1 - 1 / (1 + r),
     "sh": lambda r: r ** 0.5, "jf": lambda r: 1 + r, "sf": lambda r: 1 / (1 + r), "neyman": lambda r: 1 / r}
F = {"rkl": lambda r: -torch.log(r), "kl": lambda r: r * torch.log(r),
     "js": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2), "sh": lambda r: (r.sqrt() - 1) ** 2,
     "jf": lambda r: (r - 1) * torch.log(r), "sf": lambda r: (1 + r) * torch.log((1 + r) / (2 * r)),
     "neyman": lambda r: (1 - r) ** 2 / r}


def random_ratio(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2.3, 3.0, generator=g))  # in [0.1, 20]


# ------------------------------------------------------------------------------------------- the formulas
def test_every_divergence_weight_matches_its_formula_and_r2_f2():
    assert set(typing.get_args(Divergence)) == set(H)
    r = random_ratio()
    for name in H:
        h = f_weight(r, name)
        torch.testing.assert_close(h.double(), H[name](r) / H[name](r).mean(), rtol=1e-5, atol=1e-6, msg=name)
        # the paper's weighting is r^2 f''(r): check it from f itself by autograd (constants cancel)
        rr = r.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(F[name](rr).sum(), rr, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), rr)
        w = r**2 * d2
        torch.testing.assert_close(h.double(), w / w.mean(), rtol=1e-5, atol=1e-6, msg=name)


def test_weight_is_normalised_over_the_batch():
    r = random_ratio(seed=1).float()
    for name in H:
        assert abs(float(f_weight(r, name).mean()) - 1) < 1e-5
    assert torch.equal(f_weight(r, "rkl"), torch.ones_like(r))
    torch.testing.assert_close(f_weight(3 * r, "kl"), f_weight(r, "kl"))  # only relative r matters for KL


def test_density_ratio_clamps_logits_then_clips():
    logits = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0])
    r = density_ratio(logits, 0.1, 20.0)
    torch.testing.assert_close(r, torch.tensor([0.1, torch.e**-1, 1.0, torch.e**2, 20.0]))
    assert torch.isfinite(density_ratio(torch.tensor([1e9]), 0.1, 1e9)).all()  # exp of a clamped logit
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])
    t = torch.tensor([10.0, 20.0, 900.0, 950.0])  # two bins of [0, 1000]: each normalised by its own mean
    torch.testing.assert_close(ratio_bin_normalize(r, t, 2, 0.0, 1000.0), torch.tensor([0.5, 1.5, 0.5, 1.5]))


def test_gradient_is_h_times_dmd2_and_rkl_is_exactly_dmd2():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(4, 1, 4, 4, generator=g) for _ in range(3))
    assert torch.equal(f_distill_gradient(x, real, fake, f_weight(torch.rand(4), "rkl")), dmd_gradient(x, real, fake))
    h = torch.rand(4, generator=g) + 0.5
    grad, base = f_distill_gradient(x, real, fake, h), dmd_gradient(x, real, fake)
    for i in range(4):
        torch.testing.assert_close(grad[i], h[i] * base[i])


# ------------------------------------------------------------------------------------------- the objective
def run_config(tmp_path, teacher_folder, method="f_distill", **objective):
    return resolve(tiny_dmd_raw(tmp_path / method, teacher_folder, method, **objective))


def dm_grad(objective, x, cond, seed=1):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    logs = objective.distribution_matching(x, cond)
    logs["dm"].backward()
    return logs, x.grad


def test_rkl_objective_reduces_exactly_to_dmd2(tmp_path, teacher_folder):
    dmd2 = build_trainer(run_config(tmp_path, teacher_folder, "dmd2", real_guidance_scale=1.5)).objective
    rkl = build_trainer(run_config(tmp_path, teacher_folder, divergence="rkl", real_guidance_scale=1.5)).objective
    x, cond = torch.randn(4, 1, 8, 8), Cond(class_labels=torch.tensor([0, 3, 5, 9]))
    (logs_a, grad_a), (logs_b, grad_b) = dm_grad(dmd2, x, cond), dm_grad(rkl, x, cond)
    assert torch.equal(logs_a["dm"], logs_b["dm"]) and torch.equal(grad_a, grad_b)


def test_ratio_comes_from_the_gan_head_on_the_noised_fake_sample(tmp_path, teacher_folder):
    o = build_trainer(run_config(tmp_path, teacher_folder, divergence="kl", ratio_upper=5.0)).objective
    x, cond = torch.randn(4, 1, 8, 8), Cond(class_labels=torch.tensor([1, 2, 3, 4]))
    torch.manual_seed(2)  # replay what distribution_matching draws: the DM timestep, then the noise
    t = o.dm_timesteps(4, x.device)
    with torch.no_grad():
        x_t = o.schedule.add_noise(x, torch.randn_like(x), t)
        x0_fake, feats = o.fake_score(x_t, t, cond, return_features=True)
        last = o.disc_head.net[-1]  # make the head's logits spread around 0, so that the weights differ
        last.weight.mul_(100)
        last.bias.sub_(o.disc_head(feats).mean())
        r = density_ratio(o.disc_head(feats), 0.1, 5.0)
        expected = f_distill_gradient(x, o.teacher(x_t, t, cond), x0_fake, r / r.mean())
    assert float(r.max() - r.min()) > 0.1
    logs, grad = dm_grad(o, x, cond, seed=2)
    torch.testing.assert_close(grad * x.numel(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["ratio"], r.mean())


def test_f_distill_trains_the_generator(tmp_path, teacher_folder):
    import json

    trainer = build_trainer(run_config(tmp_path, teacher_folder, divergence="js", ratio_bins=4))
    before = {k: v.clone() for k, v in trainer.objective.generator.state_dict().items()}
    trainer.train(resume=None)
    after = trainer.objective.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logs)
    assert {"generator/dm", "generator/gan", "generator/ratio", "critic/disc"} <= keys


def test_f_distill_needs_the_gan_term(tmp_path, teacher_folder):
    with pytest.raises(ConfigError, match="objective.gan_weight_gen and objective.gan_weight_disc"):
        run_config(tmp_path, teacher_folder, gan_weight_gen=0.0, gan_weight_disc=0.0)
    with pytest.raises(ConfigError, match="ratio_lower"):
        run_config(tmp_path, teacher_folder, ratio_lower=30.0)
    with pytest.raises(ConfigError, match="'js'"):
        run_config(tmp_path, teacher_folder, divergence="pearson")
    assert FDistillConfig().divergence == "js" and FDistillConfig().gan_weight_gen > 0  # defaults are valid
