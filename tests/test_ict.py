"""iCT: grid, curriculum, lognormal index distribution, scalings against CMStochasticIterativeScheduler, the loss
against its formula, training from data alone, and the stock ConsistencyModelPipeline export."""
import logging as pylogging
import math

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from stepdistill.config import ConfigError

from stepdistill.trainers import resolve
from stepdistill.trainers import build_trainer
from stepdistill.trainers.ict import (cm_scalings, discretization_steps, ict_loss, karras_sigmas,
                                     lognormal_index_probs)
from tiny import tiny_teacher_raw


def test_grid_curriculum_and_index_distribution():
    sched = CMStochasticIterativeScheduler(num_train_timesteps=11)
    torch.testing.assert_close(karras_sigmas(11), sched.sigmas.double().flip(0))  # same grid, increasing here
    assert karras_sigmas(11)[0] == pytest.approx(0.002) and karras_sigmas(11)[-1] == pytest.approx(80.0)
    # K = 800, s0 = 10, s1 = 1280: K' = floor(800 / 8) = 100; N doubles every 100 steps from 11 to 1281
    assert [discretization_steps(k, 800) for k in (0, 99, 100, 250, 699, 799)] == [11, 11, 21, 41, 641, 1281]
    sig = karras_sigmas(41)
    p = lognormal_index_probs(sig)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) - -1.1) / (math.sqrt(2) * 2.0)))  # the lognormal's CDF
    mass = torch.tensor([cdf(sig[i + 1]) - cdf(sig[i]) for i in range(40)], dtype=torch.float64)
    torch.testing.assert_close(p, mass / mass.sum())


def test_scalings_and_loss_match_the_scheduler_and_the_paper():
    sched = CMStochasticIterativeScheduler()
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = cm_scalings(sigma)
    ref_skip, ref_out = sched.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(c_skip, ref_skip.float())
    torch.testing.assert_close(c_out, ref_out.float())
    torch.testing.assert_close(c_noise, torch.tensor(sched.sigma_to_t(sigma.numpy())).float())
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 0.25))
    assert float(c_skip[0]) == 1.0 and abs(float(c_out[0])) < 1e-8  # f(x, sigma_min) = x
    a, b, w = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1.0, 2.0, 0.5])
    c = 0.00054 * 4
    per_sample = torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c * c) - c
    assert float(ict_loss(a, b, w, c)) == pytest.approx(float((w * per_sample).mean()), rel=1e-6)


def ict_run(tmp_path, max_steps=4):
    raw = tiny_teacher_raw(tmp_path / "ict", max_steps=max_steps)
    raw["method"] = "ict"
    raw["optim"] = {"model": {"lr": 1e-3}}
    raw["objective"] = {"s0": 2, "s1": 8}
    return resolve(raw)


def test_trains_from_data_alone_and_exports_a_stock_consistency_pipeline(tmp_path):
    import json

    from diffusers import ConsistencyModelPipeline, DiffusionPipeline

    from stepdistill.runs import export_run

    trainer = build_trainer(ict_run(tmp_path))
    o = trainer.objective
    assert o.huber_c == pytest.approx(0.00054 * 8)  # sqrt(1 x 8 x 8)
    assert type(trainer.optimizers["model"].optimizer) is torch.optim.RAdam  # iCT's optimizer
    trainer.train(resume=None)
    logs = [json.loads(l) for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["model/N"] for l in logs] == [3, 5, 9, 9]  # K' = floor(4 / 3) = 1: N = min(2 * 2^k, 8) + 1
    folder = export_run(trainer.output_dir, tmp_path / "export", ema=False)
    from stepdistill.cli import main

    assert main(["export", str(trainer.output_dir), "--out", str(tmp_path / "cli_export")]) == 0  # the CLI's summary
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["pipeline"] == "ConsistencyModelPipeline" and not info["trust_remote_code"]
    pipe = DiffusionPipeline.from_pretrained(folder)  # plain Diffusers
    assert isinstance(pipe, ConsistencyModelPipeline)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):  # (the stock pipeline checks latents against 3 channels: let it draw them)
        out = pipe(batch_size=2, class_labels=[3, 4], num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # the trainer's own sampler is the pipeline's sampling
    for steps in (1, 2):
        mine = o.sample({"batch_size": 2}, generator=torch.Generator().manual_seed(5), steps=steps)
        theirs = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(5)).images
        torch.testing.assert_close(theirs, (mine / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)

    # stepdistill eval's sampler runs the stock pipeline at other timesteps (--timesteps), without its warning about
    # num_inference_steps given with timesteps
    from diffusers.utils import logging as dlogging

    from stepdistill.metrics.samplers import load_eval_model

    model = load_eval_model(str(folder))
    model.use_timesteps([5, 0])
    warnings = []

    class Record(pylogging.Handler):  # diffusers' loggers do not propagate to pytest's caplog
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Record()
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_warning()
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        images = model.sample([0, 1], nfe=2, seed=3)
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
        dlogging.set_verbosity(level)
    assert not any("num_inference_steps" in w for w in warnings)
    default = load_eval_model(str(folder)).sample([0, 1], nfe=2, seed=3)
    assert images.shape == default.shape and not torch.allclose(images, default)

    # eval gives the stock pipeline sample i's class i % 10 (left to itself it draws labels from all 11 embeddings,
    # the untrained null class too)
    from stepdistill.metrics.samplers import sample_generators

    model = load_eval_model(str(folder))
    assert model.num_classes == 10 and model.describe()["class_labels"] == "i % 10"
    indices = [8, 9, 10, 11]
    labelled = pipe(batch_size=4, class_labels=[8, 9, 0, 1], num_inference_steps=1, output_type="np",
                    generator=sample_generators(indices, 3)).images
    torch.testing.assert_close(model.sample(indices, nfe=1, seed=3), torch.as_tensor(labelled).permute(0, 3, 1, 2))


def test_dropout_reaches_the_unet_and_the_target_shares_the_students_mask(tmp_path):
    run = ict_run(tmp_path)
    run.objective.dropout = 0.3
    o = build_trainer(run).objective
    assert o.model.backbone.config.dropout == 0.3
    assert 0.3 in {m.p for m in o.model.modules() if isinstance(m, torch.nn.Dropout)}  # the resnets'

    class DropOnes(torch.nn.Module):  # output = a dropout mask: pred equals target only if the masks agree
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, sigma, cond=None):
            return self.drop(torch.ones_like(x))

    o.model = DropOnes().train()
    batch = {"image": torch.randn(8, 1, 8, 8)}
    loss, _ = o.loss(o.phases(o.config)[0], batch, step=0)
    assert float(loss) == 0.0
    bad = ict_run(tmp_path / "bad")
    bad.objective.dropout = 1.0
    with pytest.raises(ConfigError, match="objective.dropout"):
        bad.objective.validate()


def test_sample_timesteps_reach_the_trainers_sampler_the_export_and_its_card(tmp_path):
    import json

    from diffusers import DiffusionPipeline

    from stepdistill.metrics.samplers import load_eval_model
    from stepdistill.runs import export_run

    run = ict_run(tmp_path)
    run.objective.student_steps, run.objective.sample_timesteps = 2, [6, 0]  # final grid: N = 9, timesteps 0..8
    trainer = build_trainer(run)
    trainer.train(resume=None)
    o = trainer.objective
    folder = export_run(trainer.output_dir, tmp_path / "export", ema=False)
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["call"]["kwargs"] == {"num_inference_steps": None, "timesteps": [6, 0]}
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("PATH", str(folder))
    scope = {}
    exec(snippet, scope)  # the model card's own call runs on stock Diffusers
    assert len(scope["images"]) == 3 and "num_inference_steps=None, timesteps=[6, 0]" in snippet
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = lambda **kw: pipe(batch_size=2, class_labels=[0, 1], output_type="pt",  # noqa: E731
                             generator=torch.Generator().manual_seed(5), **kw).images
    mine = (o.sample({"batch_size": 2}, generator=torch.Generator().manual_seed(5)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(call(num_inference_steps=None, timesteps=[6, 0]), mine, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(call(num_inference_steps=2), mine, atol=1e-3)  # not the scheduler's own 2 steps
    assert load_eval_model(str(folder)).timesteps == [6, 0]  # stepdistill eval samples its 2 steps there

    for timesteps, steps, match in (([9, 0], 2, "0..8"), ([0, 6], 2, "decreasing"), ([6, 0], 1, "student_steps=1")):
        bad = ict_run(tmp_path / "bad")
        bad.objective.student_steps, bad.objective.sample_timesteps = steps, timesteps
        with pytest.raises(ConfigError, match=match):
            bad.objective.validate()
            build_trainer(bad)
