import pytest
import torch

from stepdistill.config import ConfigError

from stepdistill.trainers import resolve
from stepdistill.trainers import build_trainer
from stepdistill.trainers.dmd import (dmd_gradient, dmd_loss, gan_discriminator_loss, gan_generator_loss,
                                      pseudo_huber)
from tiny import tiny_dmd_raw


# ------------------------------------------------------------------------------------------- the formulas
def test_dmd_gradient_is_per_sample_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    grad = dmd_gradient(x, real, fake)
    for i in range(3):  # (p_real - p_fake) / mean|p_real|, p = x - x0, one normaliser per sample
        p_real, p_fake = x[i] - real[i], x[i] - fake[i]
        torch.testing.assert_close(grad[i].double(), (p_real - p_fake) / p_real.abs().mean(), rtol=1e-5, atol=1e-6)
    scaled = real.clone()
    scaled[1] = x[1] - 10 * (x[1] - real[1])  # change sample 1 only: the others keep their gradient
    other = dmd_gradient(x, scaled, fake)
    torch.testing.assert_close(other[0], grad[0]) and torch.testing.assert_close(other[2], grad[2])
    assert not torch.allclose(other[1], grad[1])


def test_dmd_loss_gradient_is_the_dmd_gradient():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    grad = torch.randn(2, 1, 4, 4)
    dmd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_gan_losses_and_pseudo_huber_match_their_formulas():
    real, fake = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(gan_generator_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    torch.testing.assert_close(gan_discriminator_loss(real, fake),
                               torch.log1p(torch.exp(fake)).mean() + torch.log1p(torch.exp(-real)).mean())
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(pseudo_huber(a, b, 0.03), ((a - b) ** 2 + 0.03**2).sqrt().sub(0.03).mean())
    assert float(pseudo_huber(a, a, 0.5)) == 0.0


# ------------------------------------------------------------------------------------------- the objective
def dmd_run(tmp_path, teacher_folder, **objective):
    return resolve(tiny_dmd_raw(tmp_path / "dmd", teacher_folder, "dmd2", **objective))


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dmd2_ttur_updates_generator_only_on_its_steps(tmp_path, teacher_folder):
    from stepdistill.trainers import Callback

    seen = []

    class Record(Callback):
        def on_step_end(self, trainer, step):
            o = trainer.objective
            seen.append((step, weights(o.generator), weights(o.fake_score), weights(o.disc_head)))

    trainer = build_trainer(dmd_run(tmp_path, teacher_folder), [Record()])
    teacher0 = weights(trainer.objective.teacher)
    prev = (weights(trainer.objective.generator), weights(trainer.objective.fake_score))
    trainer.train(resume=None)
    for step, gen, fake, head in seen:
        changed_gen = any(not torch.equal(gen[k], prev[0][k]) for k in gen)
        assert changed_gen == ((step - 1) % 2 == 0), step  # generator every 2nd step (TTUR)
        assert any(not torch.equal(fake[k], prev[1][k]) for k in fake)  # critic every step
        prev = (gen, fake)
    assert all(torch.equal(v, teacher0[k]) for k, v in weights(trainer.objective.teacher).items())
    import json

    logs = [json.loads(l) for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"generator/dm", "generator/gan", "critic/fake_score", "critic/disc"} <= set(logs[-1])


def test_four_step_student_trains_at_its_export_timesteps(tmp_path, teacher_folder):
    trainer = build_trainer(dmd_run(tmp_path, teacher_folder, student_steps=4))
    o = trainer.objective
    assert o.timesteps == [999.0, 749.0, 499.0, 249.0]
    calls = []
    hook = o.generator.backbone.register_forward_pre_hook(lambda m, args: calls.append(float(args[1][0])))
    torch.manual_seed(3)
    o._generate(torch.randn(2, 1, 8, 8), o._random_cond(2, torch.device("cpu")))
    hook.remove()
    assert calls == o.timesteps[:len(calls)] and 1 <= len(calls) <= 4  # backward simulation from t=999


def test_one_step_export_reproduces_the_generator(tmp_path, teacher_folder):
    from stepdistill.pipelines import ClassConditionalPipeline, export_pipeline

    trainer = build_trainer(dmd_run(tmp_path, teacher_folder))
    o = trainer.objective
    folder = export_pipeline(o.export_spec(), None, tmp_path / "export")
    assert_pipeline_is_the_generator(ClassConditionalPipeline.from_pretrained(folder), o)


def assert_pipeline_is_the_generator(pipe, o):
    """The exported pipeline's images from given noise and labels are the generator's own samples."""
    from stepdistill import Cond

    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    images = pipe(class_labels=labels, latents=noise, output_type="pt").images
    with torch.no_grad():
        direct = o._generate(noise, Cond(class_labels=labels), grad=False)
    torch.testing.assert_close(images, (direct / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path, teacher_folder):
    raw_run = dmd_run(tmp_path, teacher_folder)
    with pytest.raises(ConfigError, match="needs real images"):
        run = dmd_run(tmp_path, teacher_folder)
        run.data.dataset = "none"
        build_trainer(run)
    with pytest.raises(ConfigError, match="make-pairs"):
        build_trainer(dmd_run(tmp_path, teacher_folder, regression_weight=1.0))
    with pytest.raises(ConfigError, match="gan_weight_gen and objective.gan_weight_disc"):
        dmd_run(tmp_path, teacher_folder, gan_weight_gen=0.0)
    assert raw_run.optim["generator"].every == 2


def test_generator_init_starts_from_another_run(tmp_path, teacher_folder):
    first = build_trainer(dmd_run(tmp_path / "a", teacher_folder, gan_weight_gen=0.0, gan_weight_disc=0.0))
    first.train(resume=None)  # writes a/dmd/final
    trained = weights(first.objective.generator.backbone)
    second = build_trainer(dmd_run(tmp_path / "b", teacher_folder, generator_init=str(first.output_dir)))
    assert all(torch.equal(v, trained[k]) for k, v in weights(second.objective.generator.backbone).items())
    assert not all(torch.equal(v, trained[k]) for k, v in weights(second.objective.teacher.backbone).items())
    from stepdistill.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        build_trainer(dmd_run(tmp_path / "c", teacher_folder, generator_init=str(tmp_path / "missing")))


def test_regression_and_dmd_regression_term_fit_teacher_pairs(tmp_path, teacher_folder):
    from stepdistill import Cond
    from stepdistill.pairs import make_pairs

    make_pairs(str(teacher_folder), tmp_path / "pairs", 16, nfe=3, shard_size=16, batch_size=16, progress=False)
    raw = tiny_dmd_raw(tmp_path / "reg", teacher_folder, "regression")
    raw["data"] = {"dataset": "pairs", "path": str(tmp_path / "pairs"), "resolution": 8, "channels": 1}
    raw["optim"] = {"generator": {"lr": 1e-3}}
    raw["objective"] = {"huber_c": 0.05}
    trainer = build_trainer(resolve(raw))
    o = trainer.objective
    assert o.fake_score is None and [p.name for p in o.phases(o.config)] == ["generator"]
    batch = trainer._next_batch()
    loss, logs = o.loss("generator", batch, 0)
    with torch.no_grad():  # the loss is pseudo-Huber between G(noise) and the teacher's image from that noise
        pred = o._generate(batch["noise"], Cond.from_batch(batch), grad=False)
    torch.testing.assert_close(loss, pseudo_huber(pred, batch["image"], 0.05))
    first = float(loss)
    trainer.train(resume=None)
    assert float(o.loss("generator", batch, 0)[0]) < first  # 4 steps of lr 1e-3 on 16 pairs fit them better

    raw = tiny_dmd_raw(tmp_path / "dmd", teacher_folder, "dmd", regression_weight=1.0, gan_weight_gen=0.0,
                       gan_weight_disc=0.0)
    raw["data"] = {"dataset": "pairs", "path": str(tmp_path / "pairs"), "resolution": 8, "channels": 1}
    trainer = build_trainer(resolve(raw))
    trainer.train(resume=None)
    import json

    logs = [json.loads(l) for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"generator/dm", "generator/regression", "critic/fake_score"} <= set(logs[-1])


def test_lora_generator_and_fake_score_share_the_frozen_teacher_weights(tmp_path, teacher_folder):
    from stepdistill.pipelines import ClassConditionalPipeline
    from stepdistill.runs import export_run

    run = dmd_run(tmp_path, teacher_folder, generator_lora_rank=4, fake_score_lora_rank=4)
    trainer = build_trainer(run)
    o = trainer.objective
    teacher0 = weights(o.teacher.backbone)
    teacher_storage = {p.data_ptr() for p in o.teacher.parameters()}
    for net in (o.generator, o.fake_score):
        assert {p.data_ptr() for n, p in net.named_parameters() if "lora_" not in n} <= teacher_storage
        assert all("lora_" in n for n, p in net.named_parameters() if p.requires_grad)
    gen0, fake0 = weights(o.generator), weights(o.fake_score)
    trainer.train(resume=None)
    assert all(torch.equal(v, teacher0[k]) for k, v in weights(o.teacher.backbone).items())
    for net, before in ((o.generator, gen0), (o.fake_score, fake0)):
        after = weights(net)
        assert any(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)  # the adapters trained
    # the export is the teacher's weights plus the generator's LoRA file, and reproduces the generator
    folder = export_run(trainer.output_dir, tmp_path / "export", ema=False)
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.load_lora_weights(folder)
    assert_pipeline_is_the_generator(pipe, o)
    with pytest.raises(ConfigError, match="one or the other"):
        dmd_run(tmp_path, teacher_folder, generator_lora_rank=4, generator_init="x")


def test_final_model_holds_the_generators_ema_weights(tmp_path, teacher_folder):
    from stepdistill.models import load_model
    from stepdistill.config import ModelConfig

    run = dmd_run(tmp_path, teacher_folder)
    run.train.ema_decay = 0.5
    trainer = build_trainer(run)
    trainer.train(resume=None)  # two phases; the EMA is the generator's only
    names = trainer.trainable["generator"]
    ema = dict(zip(names, trainer.ema.shadow_params))
    final = load_model(ModelConfig(source=str(trainer.output_dir / "final"))).denoiser.backbone.state_dict()
    raw = trainer.objective.generator.backbone.state_dict()
    key = next(n for n in names if n.endswith("conv_in.weight")).removeprefix("backbone.")
    assert torch.equal(final[key], ema[f"backbone.{key}"]) and not torch.equal(final[key], raw[key])
