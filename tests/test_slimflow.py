"""SlimFlow (stepdistill/trainers/slimflow.py): annealing reflow into a smaller student, then flow-guided
distillation into one step. The annealing schedule and the flow-guided target are checked against SlimFlow's
formulas (its time: t = 0 noise); the digits recipes (configs/slimflow_digits.yaml, slimflow_digits_distill.yaml)
and the CIFAR-10 one (on a tiny model of its architecture) train two steps; the smaller student exports its own
architecture."""
from __future__ import annotations

import json
import math

import pytest
import torch

from flow_digits import CONFIGS, flow_teacher, logged, recipe, reload_matches, train
from stepdistill.config import ConfigError
from stepdistill.pairs import make_pairs
from stepdistill.runs import export_run
from stepdistill.trainers import SlimFlowTrainer, load_config
from stepdistill.trainers.reflow import flow_guided_point, flow_guided_target, paper_sigma
from stepdistill.trainers.slimflow import annealed_noise, annealing_beta

#: a student narrower than the (narrow) test teacher's 8/16/16
SLIM = ["objective.student_config.block_out_channels=[4,8,8]", "objective.student_config.norm_num_groups=2",
        "objective.student_config.attention_head_dim=2"]


def test_annealing_beta_falls_linearly_from_one_to_zero_over_warmup_n():
    assert [annealing_beta(s, 300) for s in (0, 75, 150, 300, 10_000)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert annealing_beta(5, 0) == 0.0  # no annealing
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g)
    for beta in (0.0, 0.6, 1.0):
        mixed = annealed_noise(z, eps, beta)
        torch.testing.assert_close(mixed, math.sqrt(1 - beta**2) * z + beta * eps)
        assert mixed.std() == pytest.approx(1.0, abs=0.01)  # still unit Gaussian noise
    assert torch.equal(annealed_noise(z, eps, 0.0), z) and torch.equal(annealed_noise(z, eps, 1.0), eps)


def test_flow_guided_target_is_slimflows_in_its_own_time():
    """SlimFlow: x_t' = z + t' v_s, x1 = x_t' + (1 - t') v_T with v = -u and t' = 1 - sigma'."""
    g = torch.Generator().manual_seed(1)
    z, u_s, u_t = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t_prime = 0.2 + 0.6 * torch.rand(4, generator=g, dtype=torch.float64)
    sigma = paper_sigma(t_prime, "rectified_flow")
    tp = t_prime.view(-1, 1, 1, 1)
    x_tp = z + tp * (-u_s)
    torch.testing.assert_close(flow_guided_point(z, u_s, sigma), x_tp)
    torch.testing.assert_close(flow_guided_target(x_tp, u_t, sigma), x_tp + (1 - tp) * (-u_t))
    assert not flow_guided_point(z, u_s.requires_grad_(), sigma).requires_grad  # sg(v_s)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    root = tmp_path_factory.mktemp("slim")
    teacher = flow_teacher(root / "teacher")
    make_pairs(str(teacher), root / "pairs", 8, nfe=2, batch_size=8, shard_size=8, progress=False)
    trainer = train(recipe("slimflow_digits", root / "stage1", teacher, root / "pairs", *SLIM,
                           "objective.warmup_N=2"))
    return root, teacher, trainer


def test_stage_reflow_trains_a_smaller_student_that_exports_its_own_architecture(slim, tmp_path):
    root, teacher, trainer = slim
    o = trainer.objective
    assert (o.config.stage, o.config.t_dist, o.config.h_flip) == ("reflow", "uniform", False)
    assert [row["student/beta"] for row in logged(trainer)] == [1.0, 0.5]  # linear over warmup_N = 2 steps
    assert o.meta["student_parameters"] < o.meta["teacher_parameters"] / 3
    folder = export_run(trainer.output_dir, tmp_path / "export")
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [4, 8, 8]
    reload_matches(trainer, folder)
    flipped = recipe("slimflow_digits", tmp_path / "flip", teacher, root / "pairs", *SLIM, "objective.h_flip=true")
    o = SlimFlowTrainer(flipped).objective
    batch = {"noise": torch.randn(64, 1, 16, 16), "image": torch.randn(64, 1, 16, 16)}
    torch.manual_seed(0)
    noise, image = o.pair(batch, 10**9)
    same = (noise == batch["noise"]).flatten(1).all(1)
    mirrored = (noise == batch["noise"].flip(-1)).flatten(1).all(1)
    assert torch.equal(same, (image == batch["image"]).flatten(1).all(1))  # noise and image flipped together
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_stage_distill_adds_the_flow_guided_term(slim, tmp_path):
    root, teacher, stage1 = slim
    run = recipe("slimflow_digits_distill", tmp_path / "stage2", teacher, root / "pairs",
                 f"objective.student_init={stage1.output_dir}")
    assert (run.objective.t_dist, run.objective.student_steps) == ("grid", 1)
    trainer = train(run)
    o = trainer.objective
    assert o.timesteps == [1000.0] and o.guide_sigma == pytest.approx((0.2, 0.8))
    assert all(math.isfinite(r["student/flow_guided"]) and r["student/flow_guided"] > 0 for r in logged(trainer))
    assert not any(p.requires_grad for p in o.guide.parameters())
    reload_matches(trainer, export_run(trainer.output_dir, tmp_path / "export"))


def test_bad_inputs_are_clear_errors(slim, tmp_path):
    root, teacher, stage1 = slim
    with pytest.raises(ConfigError, match="student must take and give the teacher's 1-channel samples"):
        SlimFlowTrainer(recipe("slimflow_digits", tmp_path / "a", teacher, root / "pairs", *SLIM,
                               "objective.student_config.in_channels=3"))
    with pytest.raises(ConfigError, match="objective.student_config"):
        SlimFlowTrainer(recipe("slimflow_digits", tmp_path / "b", teacher, root / "pairs",
                               "objective.student_config.no_such_key=1"))
    with pytest.raises(ConfigError, match="set objective.student_init"):
        recipe("slimflow_digits_distill", tmp_path / "c", teacher, root / "pairs", "objective.student_init=null")
    other = flow_teacher(tmp_path / "other", "train.seed=1")  # another 1-RF: its pairs are not this run's model's
    make_pairs(str(other), tmp_path / "other_pairs", 4, nfe=2, batch_size=4, shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="made by another teacher"):
        SlimFlowTrainer(recipe("slimflow_digits", tmp_path / "d", teacher, tmp_path / "other_pairs", *SLIM))


def test_cifar10_recipe_on_a_tiny_model_of_its_architecture(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model
    from stepdistill.schedule import NoiseSchedule

    run = load_config(CONFIGS / "slimflow_cifar10.yaml")
    assert (run.objective.warmup_N, run.objective.h_flip, run.train.batch_size, run.optim["student"].lr) == \
        (300000, True, 128, 2e-4)
    torch.manual_seed(0)
    blocks = ("DownBlock2D",) * 3
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16, 16), down_block_types=blocks, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=4)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    flow = save_model(Denoiser(unet, NoiseSchedule.from_scheduler(sched), "flow"), sched, tmp_path / "cifar_1rf",
                      {"resolution": 32, "channels": 3})
    make_pairs(str(flow), tmp_path / "pairs", 2, nfe=2, batch_size=2, shard_size=2, progress=False)
    trainer = train(recipe("slimflow_cifar10", tmp_path / "run", flow, tmp_path / "pairs", "train.batch_size=2",
                           "objective.student_config.block_out_channels=[4,8,8]",
                           "objective.student_config.norm_num_groups=2"))
    assert math.isfinite(logged(trainer)[-1]["student/reflow"]) and trainer.objective.config.h_flip
