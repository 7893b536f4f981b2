"""Adversarial consistency distillation (and the consistency family's optional adversarial term): the PatchGAN,
both losses against their formulas, an image-conditioned (super-resolution) teacher distilled, exported as an
ImageConditionedPipeline and sampled in 1, 2 and 4 steps, PSNR / SSIM, and the bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from stepdistill.config import ConfigError

from stepdistill.trainers import resolve
from stepdistill.trainers import build_trainer
from stepdistill.trainers.consistency import PatchDiscriminator, consistency_loss
from tiny import TINY_SCHEDULER, TINY_UNET


def sr_teacher(tmp_path):
    """A tiny image-conditioned teacher (the 8x8 digit's 4x4 source on a second channel) as a Diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model
    from stepdistill.schedule import NoiseSchedule

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "in_channels": 2, "num_class_embeds": None})
    sched = DDPMScheduler(**TINY_SCHEDULER)
    d = Denoiser(unet, NoiseSchedule.from_scheduler(sched), "v_prediction")
    return save_model(d, sched, tmp_path / "sr_teacher", {"resolution": 8, "channels": 1, "source_resolution": 4})


def acd_run(tmp_path, teacher, method="acd", source_resolution=4, **objective):
    return resolve({
        "method": method, "output_dir": str(tmp_path / method), "model": {"source": str(teacher)},
        "data": {"dataset": "digits", "resolution": 8, "source_resolution": source_resolution},
        "train": {"max_steps": 2, "batch_size": 8, "checkpoint_every": 0, "log_every": 1, "progress": False},
        "optim": {"student": {"lr": 1e-3, "warmup_steps": 0}},
        "objective": {"num_ddim_timesteps": 50, "student_steps": 4, **objective},
    })


def test_patch_discriminator_sees_the_source_and_gives_a_logit_per_patch():
    d = PatchDiscriminator(channels=1, source_channels=1, width=8, downsamplings=2)
    x, src = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    assert d(x, src).shape == (3, 1, 4, 4)
    assert not torch.allclose(d(x, src), d(x, -src))  # conditioned on the source
    assert d.net[0].in_channels == 2
    with pytest.raises(ValueError, match="pass source="):
        d(x)
    assert PatchDiscriminator(4, 0, 8, 3)(torch.randn(2, 4, 32, 32)).shape == (2, 1, 4, 4)  # latents, no source


def test_losses_are_consistency_plus_the_adversarial_terms(tmp_path):
    trainer = build_trainer(acd_run(tmp_path, sr_teacher(tmp_path), adv_weight=0.3, disc_width=8))
    o = trainer.objective
    assert [p.name for p in o.phases(o.config)] == ["student", "discriminator"] and o.source_channels == 1
    outputs, seen = [], []
    f = o.f
    o.f = lambda *a: outputs.append(f(*a)) or outputs[-1]  # the student's output, then the target

    def disc(x, source):
        seen.append((x, source))
        return (x * source).flatten(1).mean(1)  # a stand-in discriminator with a known value

    o.discriminator.forward = disc
    batch = trainer._next_batch()
    loss, logs = o.loss("student", batch, 0)
    pred, target = outputs
    assert seen[0][0] is pred and torch.equal(seen[0][1], batch["source_image"])
    adv = F.softplus(-(pred * batch["source_image"]).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss, consistency_loss(pred, target, "huber", 0.001) + 0.3 * adv)
    assert float(logs["adv"]) == pytest.approx(float(adv.detach()))
    outputs.clear(), seen.clear()
    loss, _ = o.loss("discriminator", batch, 0)
    (real, _), (fake, _) = seen
    assert real is batch["image"] and fake is outputs[0] and not fake.requires_grad
    src = batch["source_image"]
    expected = (F.softplus((fake * src).flatten(1).mean(1)).mean()
                + F.softplus(-(real * src).flatten(1).mean(1)).mean())
    torch.testing.assert_close(loss, expected)


def test_acd_distils_a_super_resolution_teacher_into_an_image_conditioned_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines import ImageConditionedPipeline

    from stepdistill.runs import export_run

    teacher = sr_teacher(tmp_path)
    trainer = build_trainer(acd_run(tmp_path, teacher, disc_width=8))
    before = {k: v.clone() for k, v in trainer.objective.discriminator.state_dict().items()}
    trainer.train(resume=None)
    after = trainer.objective.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the discriminator phase trained
    folder = export_run(trainer.output_dir, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)  # the installed class, via its shim
    assert isinstance(pipe, ImageConditionedPipeline) and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.config.source_resolution == 4 and pipe.config.num_inference_steps == 4
    pipe.set_progress_bar_config(disable=True)
    low = torch.rand(2, 1, 4, 4) * 2 - 1
    for steps in (1, 2, 4):
        images = pipe(image=low, num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    # the pipeline's nearest upsampling is the training sources': same output for the 4x4 and the 8x8 source
    up = F.interpolate(low, size=(8, 8), mode="nearest")
    a, b = (pipe(image=s, output_type="pt", generator=torch.Generator().manual_seed(1)).images for s in (low, up))
    torch.testing.assert_close(a, b)
    card = (folder / "README.md").read_text()
    assert "image=low_res" in card and "ImageConditionedPipeline" in card
    with pytest.raises(ValueError, match="1-channel source images"):
        pipe(image=torch.zeros(2, 3, 4, 4))


def test_psnr_and_ssim_scores_and_the_super_resolution_eval(tmp_path):
    from stepdistill.metrics.nfe import BenchSettings, ReconstructionScores, run_benchmark
    from stepdistill.metrics.samplers import load_eval_model
    from stepdistill.runs import export_run

    target = torch.rand(4, 1, 16, 16)
    noisy = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    scores = ReconstructionScores()
    scores.add(noisy, target)
    mse = ((noisy - target) ** 2).flatten(1).mean(1)
    assert scores.result()["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    same = ReconstructionScores()
    same.add(target, target)
    assert same.result()["ssim"] == pytest.approx(1.0, abs=1e-6) and math.isinf(same.result()["psnr"])
    assert 0 < scores.result()["ssim"] < 1

    trainer = build_trainer(acd_run(tmp_path, sr_teacher(tmp_path)))
    trainer.train(resume=None)
    model = load_eval_model(str(export_run(trainer.output_dir, tmp_path / "export")))
    assert model.sources.shape == (1797, 1, 8, 8) and model.describe()["sources"].startswith("digits i % 1797")
    settings = BenchSettings(n=8, batch_size=4, metrics=("fid",), floor_splits=0, kid_subsets=2, kid_subset_size=4,
                             progress=False)
    results = run_benchmark([(model, [1, 2])], settings, tmp_path / "bench" / "results.json", log=lambda *_: None)
    rows = results["models"][0]["results"]
    assert [r["nfe"] for r in rows] == [1, 2] and all(r["psnr"] > 0 and -1 < r["ssim"] <= 1 for r in rows)


def test_bad_inputs_are_clear_errors(tmp_path):
    teacher = sr_teacher(tmp_path)
    with pytest.raises(ConfigError, match="image-conditioned .* no source images: set data.source_resolution"):
        build_trainer(acd_run(tmp_path, teacher, source_resolution=None))
    with pytest.raises(ConfigError, match="set objective.adv_weight > 0"):
        build_trainer(acd_run(tmp_path, teacher, adv_weight=0.0))
    with pytest.raises(ConfigError, match="tscd's outputs are points on segment boundaries"):
        build_trainer(acd_run(tmp_path, teacher, method="tscd", adv_weight=0.1, num_ddim_timesteps=40))
    run = acd_run(tmp_path, teacher)
    run.train.sample_every = 5
    with pytest.raises(ConfigError, match="samples from source images: set train.sample_every=0"):
        build_trainer(run)
