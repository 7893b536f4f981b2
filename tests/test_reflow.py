"""Reflow, improved reflow (rfpp) and rectified-flow distillation (stepdistill/trainers/reflow.py), the digits flow
teacher, make-pairs from a student run, and the straightness measure.

The formulas are checked on random inputs; the recipes (configs/teacher_digits_flow.yaml, reflow_digits.yaml,
reflow_rfpp_digits.yaml, rf_distill_digits_1step.yaml, and the CIFAR-10 ones on a tiny model of their architecture)
each train two steps, export and reload; the bad inputs give ConfigErrors that name the fix.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from flow_digits import CONFIGS, flow_teacher, logged, recipe, reload_matches, train
from stepdistill.cli import main
from stepdistill.config import ConfigError, ModelConfig
from stepdistill.data import PairDataset
from stepdistill.metrics.samplers import load_eval_model
from stepdistill.metrics.straightness import euler_straightness, straightness
from stepdistill.models import load_model
from stepdistill.pairs import make_pairs
from stepdistill.runs import export_run
from stepdistill.schedule import NoiseSchedule
from stepdistill.trainers import RectifiedFlowDistillTrainer, ReflowTrainer, load_config
from stepdistill.trainers.common import teacher_fingerprint
from stepdistill.trainers.reflow import (ReflowConfig, lpips_huber, paper_sigma, reflow_distance, reflow_target,
                                         rfpp_huber_c, rfpp_pseudo_huber, u_shaped_pdf, x0_of)

PAIRS = ["--n", "8", "--nfe", "2", "--batch-size", "8", "--shard-size", "4", "--no-progress"]


# ---------------------------------------------------------------------------------------------- formulas
def test_paper_times_convert_to_sigma_where_the_config_is_read():
    """RectifiedFlow/InstaFlow/SlimFlow: X_t = t X1 + (1 - t) X0 with X0 noise and v = X1 - X0, so sigma = 1 - t and
    u = -v; rfpp: z_t = (1 - t) x + t z, so sigma = t. The config's range is converted once."""
    assert paper_sigma(0.0, "rectified_flow") == 1.0 and paper_sigma(1.0, "rectified_flow") == 0.0
    assert paper_sigma(1.0, "rfpp") == 1.0 and paper_sigma(0.25, "rfpp") == 0.25
    with pytest.raises(ConfigError, match="unknown time convention"):
        paper_sigma(0.5, "edm")
    assert ReflowConfig(t_min=1e-3, t_max=1.0).sigma_range() == pytest.approx((0.0, 0.999))
    assert ReflowConfig(t_min=0.2, t_max=0.5).sigma_range() == pytest.approx((0.5, 0.8))
    assert ReflowConfig(time_convention="rfpp", t_min=0.2, t_max=0.5).sigma_range() == (0.2, 0.5)
    g = torch.Generator().manual_seed(0)
    x1, z0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    rf_point = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * z0  # RectifiedFlow's interpolation
    sigma = paper_sigma(t, "rectified_flow")
    flow = NoiseSchedule(kind="flow", num_train_timesteps=1000)
    torch.testing.assert_close(flow.add_noise(x1, z0, sigma * 1000), rf_point)
    torch.testing.assert_close(reflow_target(z0, x1), -(x1 - z0))  # u = -v
    rfpp_point = (1 - t.view(-1, 1, 1, 1)) * x1 + t.view(-1, 1, 1, 1) * z0  # rfpp's, target z - x
    torch.testing.assert_close(flow.add_noise(x1, z0, paper_sigma(t, "rfpp") * 1000), rfpp_point)


def test_u_shaped_times_follow_rfpps_density():
    """rfpp's t_dist.py: draws from p(t) ~ e^{a t} on [0, 1] and their mirrors 1 - t, i.e. the density
    a (e^{a t} + e^{a (1 - t)}) / (2 (e^a - 1)); the histogram and the moments of our draws match it."""
    a = 4.0
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert torch.trapezoid(u_shaped_pdf(grid, a), grid) == pytest.approx(1.0, abs=1e-6)
    flow = NoiseSchedule(kind="flow", num_train_timesteps=1000)
    torch.manual_seed(0)
    sigma = flow.sample_t(200_000, "u_shaped", a=a).double() / 1000
    counts = torch.histc(sigma, bins=20, min=0, max=1) / len(sigma)
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    cdf = lambda x: (torch.exp(a * x) - torch.exp(a * (1 - x)) + math.exp(a) - 1) / (2 * math.expm1(a))  # noqa
    expected = cdf(edges[1:]) - cdf(edges[:-1])
    torch.testing.assert_close(counts, expected, atol=3e-3, rtol=0)
    second = torch.trapezoid(grid**2 * u_shaped_pdf(grid, a), grid)
    assert sigma.mean() == pytest.approx(0.5, abs=3e-3) and (sigma**2).mean() == pytest.approx(float(second), abs=3e-3)
    assert counts[0] > 3 * counts[10]  # U-shaped: most mass near the ends


def test_rfpp_pseudo_huber_is_per_sample_with_c_proportional_to_d():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    d = 3 * 8 * 8
    assert rfpp_huber_c(d) == pytest.approx(0.00054 * d) and rfpp_huber_c(d) != pytest.approx(0.00054 * d**0.5)
    c = 0.00054 * d
    norm2 = ((pred.double() - target.double()) ** 2).flatten(1).sum(1)
    expected = (torch.sqrt(norm2 + c * c) - c) / d
    got = rfpp_pseudo_huber(pred, target)
    assert got.shape == (5,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    tiny = target + 1e-4 * torch.randn(5, 3, 8, 8, generator=g)  # quadratic near 0: ||.||^2 / (2 c d)
    small = ((tiny.double() - target.double()) ** 2).flatten(1).sum(1) / (2 * c * d)
    torch.testing.assert_close(rfpp_pseudo_huber(tiny, target).double(), small, rtol=1e-2, atol=1e-12)


def test_lpips_huber_and_the_distances_on_the_straight_path():
    g = torch.Generator().manual_seed(2)
    huber, lp, sigma = torch.rand(4, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g)
    torch.testing.assert_close(lpips_huber(huber, lp, sigma), (1 - sigma) * huber + lp)
    torch.testing.assert_close(lpips_huber(huber, lp, sigma, divide_t=True), (1 - sigma) * huber + lp / sigma)
    x0, z = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * z
    u_star = reflow_target(z, x0)
    torch.testing.assert_close(x0_of(x_t, u_star, sigma), x0, atol=1e-6, rtol=1e-6)
    u = u_star + 0.1 * torch.randn(4, 1, 4, 4, generator=g)
    fake_lpips = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731 - any per-sample image distance
    mse = ((u - u_star) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(reflow_distance(u, u_star, x_t, sigma, "mse"), mse)
    torch.testing.assert_close(reflow_distance(u, u_star, x_t, sigma, "pseudo_huber"), rfpp_pseudo_huber(u, u_star))
    image = fake_lpips(x_t - sigma.view(-1, 1, 1, 1) * u, x0)  # the image one Euler step reaches, against x0
    torch.testing.assert_close(reflow_distance(u, u_star, x_t, sigma, "lpips", fake_lpips), image)
    torch.testing.assert_close(reflow_distance(u, u_star, x_t, sigma, "lpips_mse", fake_lpips), image + mse)
    torch.testing.assert_close(reflow_distance(u, u_star, x_t, sigma, "lpips_huber", fake_lpips),
                               (1 - sigma) * rfpp_pseudo_huber(u, u_star) + image)


def test_straightness_is_zero_for_a_straight_flow_and_known_for_a_curved_one():
    """S = int ||(x_noise - x_end) - u||^2 dsigma along the Euler path (values averaged)."""
    g = torch.Generator().manual_seed(3)
    target, noise = torch.randn(1, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    # every path of the flow to one point is a straight line walked at constant speed
    point = euler_straightness(lambda x, s: (x - target) / s, noise, torch.linspace(1, 0, 9))
    assert point.shape == (6,) and point.abs().max() < 1e-10
    # u(x, sigma) = 2 sigma b: x = x_noise + (sigma^2 - 1) b bends; continuous S = ||b||^2 / 3 per value
    b = torch.randn(6, 2, 4, 4, generator=g)
    for k in (4, 1000):
        sigmas = torch.linspace(1, 0, k + 1, dtype=torch.float64)
        got = euler_straightness(lambda x, s: 2 * s * b, noise, sigmas)
        s_k = sigmas[:-1]
        discrete = ((2 * s_k - (1 + 1 / k)) ** 2).mean()  # the Euler path's own straight velocity is (1 + 1/k) b
        torch.testing.assert_close(got, discrete * (b.double() ** 2).flatten(1).mean(1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got, (b.double() ** 2).flatten(1).mean(1) / 3, rtol=1e-2, atol=0)
    ends = torch.zeros(1, 3), torch.zeros(1, 3)
    assert straightness(torch.ones(2, 1, 3), torch.tensor([1.0, 0.5, 0.0]), *ends) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- the digits chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The flow teacher recipe (2 steps), its pairs through the CLI, and a 2-step reflow run on them."""
    root = tmp_path_factory.mktemp("flow")
    teacher = flow_teacher(root / "teacher")
    pairs = root / "pairs"
    assert main(["make-pairs", "--teacher", str(teacher), "--out", str(pairs), *PAIRS]) == 0
    reflow = train(recipe("reflow_digits", root / "reflow", teacher, pairs))
    return root, teacher, pairs, reflow


def test_flow_teacher_recipe_samples_with_euler_and_exports_for_eval(chain, tmp_path):
    root, teacher, _, _ = chain
    run = load_config(CONFIGS / "teacher_digits_flow.yaml")
    assert run.model.scheduler == "FlowMatchEulerDiscreteScheduler" and run.model.scheduler_config["shift"] == 1.0
    folder = export_run(teacher, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler" and info["pipeline"] == "ClassConditionalPipeline"
    assert info["timesteps"] == [1000.0, 500.0]  # the uniform Euler grid sigma = 1, 1/2
    for source in (folder, teacher):  # the export, and the run folder (its final/ model) as a teacher
        model = load_eval_model(str(source))
        images = model.sample([0, 1, 2], 2, seed=0)
        assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()


def test_make_pairs_takes_a_student_run_through_the_cli_and_resumes(chain, tmp_path, capsys):
    root, teacher, pairs, reflow = chain
    manifest = json.loads((pairs / "pairs.json").read_text())
    assert manifest["timesteps"] == [1000.0, 500.0] and manifest["teacher"]["source"] == str(teacher)
    out = tmp_path / "from_run"
    half = ["--n", "4", *PAIRS[2:]]
    assert main(["make-pairs", "--teacher", str(reflow.output_dir), "--out", str(out), *half]) == 0
    first = (out / "pairs-00000.safetensors").stat().st_mtime_ns
    assert main(["make-pairs", "--teacher", str(reflow.output_dir), "--out", str(out), *PAIRS]) == 0  # resumes
    assert (out / "pairs-00000.safetensors").stat().st_mtime_ns == first
    whole = tmp_path / "whole"
    assert main(["make-pairs", "--teacher", str(reflow.output_dir), "--out", str(whole), *PAIRS]) == 0
    a, b = PairDataset(out, verify=True), PairDataset(whole)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.images, b.images) and len(a) == 8
    student = load_model(ModelConfig(source=str(reflow.output_dir)))  # the run's final/ (EMA) model
    assert a.manifest["teacher_weights"] == teacher_fingerprint(student.denoiser)
    assert student.denoiser.prediction_type == "flow" and a.manifest["prediction_type"] == "flow"
    assert main(["make-pairs", "--teacher", str(root / "nothing"), "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    # an exported student is a source too: the same (EMA) weights, the same pairs
    exported = export_run(reflow.output_dir, tmp_path / "export")
    make_pairs(str(exported), tmp_path / "from_export", 8, nfe=2, batch_size=8, shard_size=4, progress=False)
    c = PairDataset(tmp_path / "from_export")
    assert c.manifest["teacher_weights"] == a.manifest["teacher_weights"] and torch.equal(c.images, b.images)


def test_reflow_recipe_trains_from_the_teacher_exports_and_reloads(chain, tmp_path):
    root, teacher, pairs, reflow = chain
    o = reflow.objective
    assert o.student.prediction_type == "flow" and o.config.t_dist == "uniform" and o.t_range == pytest.approx(
        (0.0, 999.0))
    assert [r["student/reflow"] for r in logged(reflow)] and o.timesteps == [1000.0, 500.0]
    folder = export_run(reflow.output_dir, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler" and info["call"]["kwargs"]["num_inference_steps"] == 2
    reload_matches(reflow, folder)
    # the student starts from the teacher's weights
    fresh = ReflowTrainer(recipe("reflow_digits", tmp_path / "fresh", teacher, pairs)).objective
    t = load_model(ModelConfig(source=str(teacher))).denoiser.backbone.state_dict()
    assert all(torch.equal(t[k], v) for k, v in fresh.student.backbone.state_dict().items())
    # eval reports the straightness of the flow
    out = tmp_path / "eval" / "results.json"
    assert main(["eval", str(folder), "--nfe", "1,2", "--n", "12", "--batch-size", "12", "--floor-splits", "0",
                 "--metrics", "fid,kid", "--kid-subset-size", "6", "--no-progress", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["models"][0]["results"]
    assert "straightness" not in rows[0] and rows[1]["straightness"] >= 0


def test_rfpp_recipe_and_lpips_huber(chain, tmp_path, vgg_file):
    root, teacher, pairs, _ = chain
    run = recipe("reflow_rfpp_digits", tmp_path / "rfpp", teacher, pairs)
    assert (run.objective.t_dist, run.objective.u_shape_a, run.objective.distance) == ("u_shaped", 4.0, "pseudo_huber")
    assert run.objective.sigma_range() == pytest.approx((1e-5, 1 - 1e-5))
    trainer = train(run)
    assert all(math.isfinite(r["student/reflow"]) for r in logged(trainer))
    run = recipe("reflow_rfpp_digits", tmp_path / "lpips", teacher, pairs, "objective.distance=lpips_huber",
                 f"objective.lpips_weights={vgg_file}", "train.max_steps=1")
    assert math.isfinite(logged(train(run))[-1]["student/reflow"])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16's features (tests/test_lpips.py's file)."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in make_layers(cfgs["D"]).state_dict().items()}, str(path))
    return path


def test_rf_distill_recipe_on_the_pairs_of_the_reflow_run(chain, tmp_path):
    root, teacher, pairs, reflow = chain
    pairs2 = tmp_path / "pairs2"
    make_pairs(str(reflow.output_dir), pairs2, 8, nfe=2, batch_size=8, shard_size=8, progress=False)
    run = recipe("rf_distill_digits_1step", tmp_path / "distill", reflow.output_dir, pairs2)
    trainer = RectifiedFlowDistillTrainer(run).trainer
    trainer.train(resume=None)
    o = trainer.objective
    assert o.timesteps == [1000.0] and o.config.t_dist == "grid"  # RectifiedFlow's t0: only sigma = 1
    assert set(o.draw_t(64, "cpu").tolist()) == {1000.0}
    reload_matches(trainer, export_run(trainer.output_dir, tmp_path / "export"))
    with pytest.raises(ConfigError, match="t_dist"):
        recipe("rf_distill_digits_1step", tmp_path / "x", reflow.output_dir, pairs2, "objective.t_dist=uniform")


def test_bad_inputs_are_clear_errors(chain, tmp_path, teacher_folder):
    root, teacher, pairs, reflow = chain
    other = tmp_path / "other_pairs"
    make_pairs(str(reflow.output_dir), other, 4, nfe=2, batch_size=4, shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="made by another teacher"):  # pairs of the 2-RF, model the 1-RF
        ReflowTrainer(recipe("reflow_digits", tmp_path / "a", teacher, other))
    with pytest.raises(ConfigError, match=r"are 1x16x16 .* data.resolution is 8"):
        ReflowTrainer(recipe("reflow_digits", tmp_path / "b", teacher, pairs, "data.resolution=8"))
    with pytest.raises(ConfigError, match="needs objective.lpips_weights"):
        recipe("reflow_digits", tmp_path / "c", teacher, pairs, "objective.distance=lpips")
    with pytest.raises(ConfigError, match="objective.lpips_weights: LPIPS needs the VGG16 weights"):
        ReflowTrainer(recipe("reflow_digits", tmp_path / "d", teacher, pairs, "objective.distance=lpips",
                             "objective.lpips_weights=/nonexistent/vgg16.pth"))
    with pytest.raises(ConfigError, match="data.dataset=pairs"):
        ReflowTrainer(recipe("reflow_digits", tmp_path / "e", teacher, pairs, "data.dataset=digits"))
    vp_pairs = tmp_path / "vp_pairs"
    make_pairs(str(teacher_folder), vp_pairs, 4, nfe=2, batch_size=4, shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="rf_distill distils a rectified flow"):
        RectifiedFlowDistillTrainer(recipe("rf_distill_digits_1step", tmp_path / "f", teacher_folder, vp_pairs,
                                           "data.resolution=8"))
    with pytest.raises(ConfigError, match="trains method 'reflow'"):
        ReflowTrainer(recipe("rf_distill_digits_1step", tmp_path / "g", reflow.output_dir, pairs))


@pytest.mark.parametrize("name", ["reflow_cifar10", "rfpp_cifar10"])
def test_cifar10_recipes_train_on_a_tiny_model_of_their_architecture(name, tmp_path, vgg_file):
    """The published CIFAR-10 settings parse and run two steps on an unconditional 32x32 RGB flow UNet2DModel."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model

    run = load_config(CONFIGS / f"{name}.yaml")
    assert (run.optim["student"].lr, run.data.resolution, run.data.channels) == (2e-4, 32, 3)
    assert run.train.ema_decay == 0.9999 and run.optim["student"].warmup_steps == 5000
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    flow = save_model(Denoiser(unet, NoiseSchedule.from_scheduler(sched), "flow"), sched, tmp_path / "cifar_1rf",
                      {"resolution": 32, "channels": 3})
    make_pairs(str(flow), tmp_path / "pairs", 4, nfe=2, batch_size=4, shard_size=4, progress=False)
    extra = [f"objective.lpips_weights={vgg_file}", "objective.lpips_size=32"] if name == "rfpp_cifar10" else []
    trainer = train(recipe(name, tmp_path / "run", flow, tmp_path / "pairs", "train.batch_size=2", *extra))
    assert math.isfinite(logged(trainer)[-1]["student/reflow"])
    if name == "rfpp_cifar10":
        assert run.objective.distance == "lpips_huber" and run.objective.lpips_divt and run.train.batch_size == 512
