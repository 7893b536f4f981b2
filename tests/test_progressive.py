"""Progressive distillation (method ``progressive``): the implied x-target and the snr_trunc weighting against their
formulas, rounds that halve the steps on a guidance-distilled student (each exporting with its steps, the scale passed
through in one call per step), the odd-step and grid errors, and a round improving over its initial student."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stepdistill.config import ConfigError
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runs import export_run
from stepdistill.trainers import build_trainer, load_config
from stepdistill.trainers.progressive import ddim_to, implied_target, loss_weight, progressive_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["data.resolution=8", "train.batch_size=8", "train.progress=false", "train.log_every=1",
          "train.checkpoint_every=0", "train.ema_decay=0"]


def test_the_implied_target_is_the_x0_whose_one_ddim_step_lands_on_the_teachers_two():
    g = torch.Generator().manual_seed(0)
    z_t, x_a, x_b = (torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    abar = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)  # at t; the levels at mid and s are higher
    abar_mid, abar_s = abar ** 0.6, abar ** 0.3
    shape = (-1, 1, 1, 1)
    at, st = abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)
    am, sm = abar_mid.sqrt().view(shape), (1 - abar_mid).sqrt().view(shape)
    a_s, s_s = abar_s.sqrt().view(shape), (1 - abar_s).sqrt().view(shape)
    z_mid = ddim_to(x_a, z_t, at, st, am, sm)
    z_s = ddim_to(x_b, z_mid, am, sm, a_s, s_s)  # the teacher's two DDIM steps (x0 predictions x_a, x_b)
    target = implied_target(z_s, z_t, at, st, a_s, s_s)
    torch.testing.assert_close(ddim_to(target, z_t, at, st, a_s, s_s), z_s)  # one step from z_t with x~ lands there
    logsnr_t, logsnr_s = torch.log(abar / (1 - abar)), torch.log(abar_s / (1 - abar_s))
    frac = torch.exp(0.5 * (torch.nn.functional.softplus(logsnr_t) - torch.nn.functional.softplus(logsnr_s)))
    dpm = (z_s - frac.view(shape) * z_t) / (a_s - frac.view(shape) * at)  # dpm.py's stdv_frac form
    torch.testing.assert_close(target, dpm)
    one, zero = torch.ones_like(a_s), torch.zeros_like(s_s)  # the last step: s < 0 is x0 (alpha 1, sigma 0)
    final = ddim_to(x_b, z_mid, am, sm, one, zero)
    torch.testing.assert_close(implied_target(final, z_t, at, st, one, zero), x_b)  # dpm.py's i == 0: x_pred


def test_snr_trunc_is_the_larger_of_the_x_and_eps_mse():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 1, 4, 4, generator=g)
    x_pred, x_target = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    abar = torch.tensor([0.0, 0.1, 0.5, 0.8, 0.99])  # SNR 0 (zero terminal SNR), < 1, = 1, > 1
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    snr = abar / (1 - abar)
    x_mse = ((x_pred - x_target) ** 2).flatten(1).mean(1)
    eps_mse = (((z - a * x_pred) / s - (z - a * x_target) / s) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss_weight(snr), torch.maximum(snr, torch.ones_like(snr)))
    torch.testing.assert_close(progressive_loss(x_pred, x_target, snr), torch.maximum(x_mse, eps_mse).mean())
    torch.testing.assert_close(progressive_loss(x_pred, x_target, snr, "snr"), eps_mse.mean())
    torch.testing.assert_close(progressive_loss(x_pred, x_target, snr, "constant"), x_mse.mean())
    v_mse = x_mse / s.flatten() ** 2  # v = (alpha z - x) / sigma at a fixed z
    torch.testing.assert_close(progressive_loss(x_pred, x_target, snr, "v_mse"), v_mse.mean())


def round_run(tmp_path, source, out, *extra):
    return load_config(CONFIGS / "progressive_digits.yaml",
                       [f"model.source={source}", f"output_dir={tmp_path / out}", "train.max_steps=2", *COMMON, *extra])


def test_rounds_halve_the_steps_of_a_guidance_student_and_each_exports_with_its_steps(tmp_path, teacher_folder):
    guided = load_config(CONFIGS / "guidance_digits.yaml",
                         [f"model.source={teacher_folder}", f"output_dir={tmp_path / 'guided'}", "train.max_steps=2",
                          "objective.guidance_embedding_dim=8", "objective.sample_steps=4", *COMMON])
    build_trainer(guided).train(resume=None)
    first = build_trainer(round_run(tmp_path, tmp_path / "guided", "round2", "objective.teacher_steps=4"))
    o = first.objective
    assert (o.teacher_steps, o.student_steps, o.timesteps) == (4, 2, [999.0, 499.0]) and o.embedded
    assert o.guidance_range == [1.0, 4.0]  # the guidance student's trained range, read from its folder
    x = torch.randn(2, 1, 8, 8)
    from stepdistill.conditioning import Cond

    cond = Cond(class_labels=torch.tensor([1, 2]), guidance=torch.tensor([1.5, 3.0]))
    with torch.no_grad():  # the student starts as its teacher (the previous stage)
        t = torch.tensor([999.0, 499.0])
        assert torch.equal(o.student(x, t, cond), o.teacher(x, t, cond))
    first.train(resume=None)
    meta = json.loads((tmp_path / "round2" / "final" / "stepdistill.json").read_text())
    assert meta["student_steps"] == 2 and meta["guidance_range"] == [1.0, 4.0]
    second = build_trainer(round_run(tmp_path, tmp_path / "round2", "round1", "objective.teacher_steps=null"))
    assert (second.objective.teacher_steps, second.objective.student_steps) == (2, 1)  # read from the round's folder
    second.train(resume=None)
    for run, steps in (("round2", 2), ("round1", 1)):
        folder = export_run(tmp_path / run, tmp_path / f"export_{run}")
        info = json.loads((folder / "stepdistill.json").read_text())["export"]
        assert info["num_inference_steps"] == steps and info["scheduler"] == "DDIMScheduler"
        assert info["guidance"]["mode"] == "embedded" and info["nfe_per_image"] == steps
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        calls = []
        pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["timestep_cond"].shape[0]),
                                            with_kwargs=True)
        pipe(class_labels=[3, 4], guidance_scale=2.5, num_inference_steps=steps, output_type="pt")
        assert calls == [2] * steps  # one call per step, the scale given as the embedding


def test_odd_step_counts_and_uneven_grids_are_clear_errors(tmp_path, teacher_folder):
    with pytest.raises(ConfigError, match="teacher samples with 3 step\\(s\\), which cannot be halved"):
        round_run(tmp_path, teacher_folder, "odd", "objective.teacher_steps=3")
    with pytest.raises(ConfigError, match="1000 / 3 is not whole"):  # 6 -> 3 steps of 333.3 timesteps
        build_trainer(round_run(tmp_path, teacher_folder, "uneven", "objective.teacher_steps=6"))
    odd = tmp_path / "odd_student"  # a student trained for 3 steps (e.g. another method's) as the next teacher
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model, save_model

    loaded = load_model(ModelConfig(source=str(teacher_folder)))
    save_model(loaded.denoiser, loaded.scheduler, odd, {**loaded.meta, "student_steps": 3})
    with pytest.raises(ConfigError, match="3 step\\(s\\), which cannot be halved"):
        build_trainer(round_run(tmp_path, odd, "from_odd", "objective.teacher_steps=null"))
    with pytest.raises(ConfigError, match="records no step count"):
        build_trainer(round_run(tmp_path, teacher_folder, "unknown", "objective.teacher_steps=null"))


def test_a_round_improves_over_its_initial_student(tmp_path, teacher_folder):
    run = round_run(tmp_path, teacher_folder, "improve", "objective.teacher_steps=4", "train.max_steps=30",
                    "optim.student.lr=1e-3", "optim.student.lr_schedule=constant", "train.batch_size=16")
    trainer = build_trainer(run)
    o = trainer.objective
    batch = {"image": torch.stack([trainer.data[i]["image"] for i in range(32)]),
             "class_label": torch.tensor([trainer.data[i]["class_label"] for i in range(32)]), "batch_size": 32}

    def fixed_loss():
        torch.manual_seed(7)
        with torch.no_grad():
            return float(o.loss("student", batch, 0)[0])

    before = fixed_loss()
    trainer.train(resume=None)
    assert fixed_loss() < 0.8 * before
    assert math.isfinite(before)
