"""What several methods share (``stepdistill.trainers.common``): the one pseudo-Huber against each method's own form
of it before it was shared (to the bit), the denoising loss, the new-backbone student, the shared generator config
and the ``real_score_x0`` hook of the DMD family."""
import dataclasses

import pytest
import torch
from diffusers import UNet2DModel

from stepdistill import Cond, Denoiser, NoiseSchedule
from stepdistill.config import ConfigError
from stepdistill.trainers import build_trainer, resolve
from stepdistill.trainers.common import (GeneratorConfig, GeneratorObjective, denoising_loss, new_student, pseudo_huber,
                                         soft_clamp)
from stepdistill.trainers.consistency import consistency_loss
from stepdistill.trainers.dmd import DMDConfig, DMDObjective, dmd_gradient, dmd_loss
from stepdistill.trainers.ict import ict_loss
from stepdistill.trainers.regression import RegressionConfig, RegressionObjective
from tiny import TINY_SCHEDULER, TINY_UNET, tiny_dmd_raw


# ---------------------------------------------------------------------------------------------- pseudo-Huber
def test_pseudo_huber_is_each_methods_distance_to_the_bit():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    weight = torch.rand(4, generator=g)
    # DMD's regression distance and LCM's loss: elementwise (as dmd.pseudo_huber and consistency_loss computed it)
    for c in (0.03, 0.001):
        before = (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()
        assert torch.equal(pseudo_huber(a, b, c), before)
    assert torch.equal(consistency_loss(a, b, "huber", 0.001), pseudo_huber(a, b, 0.001))
    # iCT: over each sample's norm, weighted by lambda (as ict_loss computed it), c = 0.00054 sqrt(d)
    c = 0.00054 * (3 * 5 * 5) ** 0.5
    sq = ((a.float() - b.detach().float()) ** 2).flatten(1).sum(1)
    assert torch.equal(pseudo_huber(a, b, c, per_sample=True, weight=weight),
                       (weight.float() * (torch.sqrt(sq + c * c) - c)).mean())
    assert torch.equal(ict_loss(a, b, weight, c), pseudo_huber(a, b, c, per_sample=True, weight=weight))
    # rfpp's c = 0.00054 d on the per-sample norm, unweighted; float64 inputs are computed in float32
    d = 3 * 5 * 5
    per_sample = torch.stack([torch.sqrt(((a[i] - b[i]) ** 2).sum() + (0.00054 * d) ** 2) - 0.00054 * d
                              for i in range(4)])
    torch.testing.assert_close(pseudo_huber(a.double(), b.double(), 0.00054 * d, per_sample=True), per_sample.mean())
    assert float(pseudo_huber(a, a, 0.5, per_sample=True)) == 0.0
    # large differences grow like |d| - c, small ones like d^2 / 2c
    x = torch.tensor([[1e3]])
    torch.testing.assert_close(pseudo_huber(x, torch.zeros(1, 1), 0.01), torch.tensor(1e3 - 0.01))


def test_denoising_loss_targets_and_soft_clamp():
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER))
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([10.0, 500.0, 990.0])
    x_t = schedule.add_noise(x0, noise, t)
    a, s = (c.view(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    for ptype, target in (("epsilon", noise), ("v_prediction", a * noise - s * x0), ("sample", x0)):
        pred = torch.randn_like(x0)
        torch.testing.assert_close(denoising_loss(pred, x0, noise, x_t, t, schedule, ptype),
                                   ((pred - target) ** 2).mean())
        assert float(denoising_loss(target, x0, noise, x_t, t, schedule, ptype)) == pytest.approx(0.0, abs=1e-10)
    assert torch.equal(soft_clamp(x0, None), x0)
    torch.testing.assert_close(soft_clamp(x0 * 100, 1.5), 1.5 * torch.tanh(x0 * 100 / 1.5))


# ---------------------------------------------------------------------------------------------- networks
def test_new_student_is_a_fresh_backbone_of_the_teachers_config():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    teacher = Denoiser(UNet2DModel(**TINY_UNET), NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER)),
                       "v_prediction", null_class=10)
    student = new_student(teacher, {"block_out_channels": [8, 16], "norm_num_groups": 4}, "objective.key")
    config = student.backbone.config
    assert list(config.block_out_channels) == [8, 16] and config.num_class_embeds == 11
    assert student.schedule is teacher.schedule and student.prediction_type == "v_prediction"
    assert student.null_class == 10 and all(p.requires_grad for p in student.parameters()) and not student.training
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])
    assert student(x, t, Cond(class_labels=torch.tensor([1, 2]))).shape == x.shape
    with pytest.raises(ConfigError, match="objective.key: UNet2DModel has no key"):
        new_student(teacher, {"no_such_key": 1}, "objective.key")
    with pytest.raises(ConfigError, match="objective.key does not make a valid UNet2DModel"):
        new_student(teacher, {"block_out_channels": [8, 16, 32]}, "objective.key")  # 2 block types, 3 widths


# ---------------------------------------------------------------------------------------------- the generator
def test_dmd_and_regression_share_the_generator_config_and_objective():
    shared = {f.name for f in dataclasses.fields(GeneratorConfig)}
    assert shared == {f.name for f in dataclasses.fields(RegressionConfig)}
    assert shared < {f.name for f in dataclasses.fields(DMDConfig)}
    for cls in (DMDObjective, RegressionObjective):
        assert issubclass(cls, GeneratorObjective)
        assert not any(name in cls.__dict__ for name in ("_generate", "regression_loss", "sample", "export_spec"))
    assert not issubclass(RegressionObjective, DMDObjective)
    for Config in (DMDConfig, RegressionConfig):
        with pytest.raises(ConfigError, match="conditioning_timestep is for 1-step"):
            Config(student_steps=2, conditioning_timestep=399).validate()
        with pytest.raises(ConfigError, match="use one or the other"):
            Config(generator_lora_rank=4, generator_init="run").validate()
        with pytest.raises(ConfigError, match="generator_lora_rank must be >= 0"):
            Config(generator_lora_rank=-1).validate()
    with pytest.raises(ConfigError, match="fake_score_lora_rank must be >= 0"):
        DMDConfig(fake_score_lora_rank=-1).validate()


def test_the_real_score_hook_is_what_distribution_matching_reads(tmp_path, teacher_folder):
    """DMD2's gradient uses ``real_score_x0`` (the teacher with CFG, by default): replacing the hook alone replaces
    the real score, as DisBack does."""
    o = build_trainer(resolve(tiny_dmd_raw(tmp_path / "dmd", teacher_folder, real_guidance_scale=2.0))).objective
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = Cond(class_labels=torch.tensor([3, 4]))
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(o.real_score_x0(x, t, cond), o.teacher(x, t, cond, guidance_scale=2.0))
    seen = []

    def other_real_score(x_t, t, cond):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    o.real_score_x0 = other_real_score
    x = x.requires_grad_(True)
    torch.manual_seed(2)
    o.distribution_matching(x, cond)["dm"].backward()
    x_t, t = seen[0]
    torch.manual_seed(2)  # the same timesteps and noise
    t_ref = o.dm_timesteps(2, x.device)
    x_t_ref = o.schedule.add_noise(x.detach(), torch.randn_like(x), t_ref)
    assert torch.equal(t, t_ref) and torch.equal(x_t, x_t_ref)
    with torch.no_grad():
        grad = dmd_gradient(x.detach(), torch.zeros_like(x), o.fake_score(x_t, t, cond))
    x2 = x.detach().clone().requires_grad_(True)
    dmd_loss(x2, grad).backward()
    torch.testing.assert_close(x.grad, x2.grad)
