"""Guidance distillation (method ``guidance``), LoRA-enhanced distillation (its LoRA student) and diversity-rewarded CFG
distillation (``diversity_guidance``): the formulas, the guidance input of each backbone (the scale reaches the
embedding, one call), the LoRA student's one copy of the weights, the digits recipes end to end (export, reload, the
pipeline's guidance_scale drives the student in one UNet call per step), the trained-range checks, the diversity reward
and the weight interpolation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from stepdistill.backbones import guidance_scale_embedding
from stepdistill.conditioning import Cond
from stepdistill.config import ConfigError
from stepdistill.denoiser import Denoiser
from stepdistill.pipelines import ClassConditionalPipeline, export_pipeline, interpolate_weights, load_interpolated
from stepdistill.pipelines.recipes import ExportError
from stepdistill.runs import export_run
from stepdistill.schedule import NoiseSchedule
from stepdistill.trainers import LoRADistillTrainer, build_trainer, load_config
from stepdistill.trainers.common import memory_footprint
from stepdistill.trainers.diversity import diversity_reward
from stepdistill.trainers.guidance import GuidanceConfig, cfg_target, guidance_loss, make_guided_student
from tiny import TINY_SCHEDULER, TINY_UNET

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_teacher(seed=0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(UNet2DModel(**TINY_UNET), NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER)),
                    "v_prediction", null_class=10).freeze()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([999.0, 500.0, 20.0][:n]), torch.arange(n) % 10


def randomize(module, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------------ formulas
def test_the_cfg_target_and_the_loss_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    s = torch.tensor([1.0, 2.0, 3.5, 7.0])
    target = cfg_target(c, u, s)
    for i in range(4):  # Meng's (1 + w) x_c - w x_u with w = s - 1
        w = s[i] - 1
        torch.testing.assert_close(target[i], (1 + w) * c[i] - w * u[i])
    torch.testing.assert_close(target[0], c[0])  # s = 1: no guidance
    pred = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    torch.testing.assert_close(guidance_loss(pred, target), ((pred - target) ** 2).mean())


# ------------------------------------------------------------------------------------------------ the guidance input
def test_the_digits_unet_takes_the_scale_through_its_embedding_in_one_call(tmp_path):
    teacher = tiny_teacher()
    student = teacher.guidance_embedded(8, guidance_range=[1.0, 4.0])
    backbone = student.backbone
    assert type(backbone).__name__ == "GuidedUNet2DModel" and student.family == "UNet2DModel"
    assert backbone.config.time_cond_proj_dim == 8 and backbone.config.guidance_range == [1.0, 4.0]
    x, t, labels = inputs()
    s = torch.tensor([1.0, 2.5, 4.0])
    with torch.no_grad():  # the zeroed projection: the teacher, bit for bit, at every scale
        assert torch.equal(student(x, t, Cond(class_labels=labels, guidance=s)),
                           teacher(x, t, Cond(class_labels=labels)))
    seen, calls = [], []
    backbone.time_embedding.cond_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    randomize(backbone.time_embedding.cond_proj)
    with torch.no_grad():
        out = student(x, t, Cond(class_labels=labels, guidance=s))
        other = student(x, t, Cond(class_labels=labels, guidance=s + 1))
    assert calls == [3, 3]  # one network call of the batch itself per evaluation (CFG would make one of 6)
    torch.testing.assert_close(seen[0], guidance_scale_embedding(s - 1, 8))  # LCM's embedding of w = s - 1
    assert not torch.allclose(out, other)  # the scale drives the output
    backbone.save_pretrained(tmp_path / "unet")  # loads back as the same class and the same function
    from stepdistill.models import _diffusers_class

    again = _diffusers_class("GuidedUNet2DModel", "model").from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        emb = guidance_scale_embedding(s - 1, 8)
        torch.testing.assert_close(again(x, t, labels, timestep_cond=emb).sample,
                                   backbone(x, t, labels, timestep_cond=emb).sample)
    with pytest.raises(ValueError, match="pass Cond\\(guidance=scale\\)"):
        student(x, t, Cond(class_labels=labels))


def test_text_unets_and_flux_get_their_own_guidance_inputs_and_dit_is_refused():
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, UNet2DConditionModel

    from text_teachers import UNET

    vp = NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER))
    torch.manual_seed(0)
    unet = Denoiser(UNet2DConditionModel(cross_attention_dim=8, **UNET), vp, "epsilon").freeze()
    student = unet.guidance_embedded(16)
    assert type(student.backbone).__name__ == "UNet2DConditionModel"
    assert student.backbone.config.time_cond_proj_dim == 16
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 100.0])
    cond = Cond(encoder_hidden_states=torch.randn(2, 5, 8))
    with torch.no_grad():
        assert torch.equal(student(x, t, Cond(**{**cond.__dict__, "guidance": torch.tensor([3.0, 9.0])})),
                           unet(x, t, cond))
    flow = NoiseSchedule(kind="flow")
    flux = Denoiser(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                           pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), flow, "flow").freeze()
    guided = flux.guidance_embedded(16)
    assert guided.backbone.config.guidance_embeds
    fc = Cond(encoder_hidden_states=torch.randn(2, 3, 8), pooled=torch.randn(2, 8))
    with torch.no_grad():
        torch.testing.assert_close(guided(x, t, Cond(**{**fc.__dict__, "guidance": torch.tensor([2.0, 5.0])})),
                                   flux(x, t, fc))
    dit = Denoiser(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                         num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10), vp,
                   "epsilon")
    with pytest.raises(ValueError, match="method agd"):
        dit.guidance_embedded(16)


# ------------------------------------------------------------------------------------------------ LoRA-enhanced
def test_the_lora_student_holds_one_copy_of_the_weights_and_adapters_off_is_the_base_bit_for_bit():
    from stepdistill.trainers.common import trainable_copy

    teacher = tiny_teacher()
    student = make_guided_student(teacher, GuidanceConfig(guidance_range=[1.0, 4.0], guidance_embedding_dim=8,
                                                          student_lora_rank=4))
    own = {p.data_ptr() for p in student.parameters()}
    assert all(p.data_ptr() in own for p in teacher.parameters())  # the teacher's tensors, not a copy
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "cond_proj" in n for n in trainable)
    assert any("cond_proj" in n for n in trainable)
    both, base = memory_footprint(teacher, student)["weights"], memory_footprint(teacher)["weights"]
    assert both < 1.3 * base  # a full student copy would double it
    for layer in student.lora_layers():  # make the adapters matter
        for b in layer.lora_B.values():
            randomize(b, scale=0.5)
    x, t, labels = inputs()
    cond = Cond(class_labels=labels, guidance=torch.tensor([2.0, 2.0, 2.0]))
    with torch.no_grad():
        assert not torch.allclose(student(x, t, cond), teacher(x, t, Cond(class_labels=labels)))
        with student.adapters_disabled():  # adapters off (and the embedding at zero): the teacher itself
            assert torch.equal(student(x, t, cond), teacher(x, t, Cond(class_labels=labels)))
    plain = trainable_copy(teacher, 4)  # any LoRA student: adapters off is the frozen base, bit for bit
    for layer in plain.lora_layers():
        for b in layer.lora_B.values():
            randomize(b, scale=0.5)
    with torch.no_grad(), plain.adapters_disabled():
        assert torch.equal(plain(x, t, Cond(class_labels=labels)), teacher(x, t, Cond(class_labels=labels)))


# ------------------------------------------------------------------------------------------------ the recipes
def recipe_run(name, tmp_path, teacher_folder, *extra):
    return load_config(CONFIGS / f"{name}.yaml", [
        f"model.source={teacher_folder}", "data.resolution=8", f"output_dir={tmp_path / name}", "train.max_steps=2",
        "train.batch_size=8", "train.progress=false", "train.log_every=1", "train.checkpoint_every=0",
        "train.ema_decay=0", "objective.sample_steps=3", "objective.guidance_embedding_dim=8", *extra])


def load_export(folder):
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    if info.get("lora"):
        pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


@pytest.mark.parametrize("name", ["guidance_digits", "lora_guidance_digits", "diversity_guidance_digits"])
def test_the_digits_recipes_train_export_and_the_guidance_scale_drives_one_call_per_step(name, tmp_path,
                                                                                        teacher_folder):
    extra = ["objective.groups=2", "objective.group_size=2"] if name.startswith("diversity") else []
    run = recipe_run(name, tmp_path, teacher_folder, *extra)
    trainer = LoRADistillTrainer(run).trainer if name.startswith("lora") else build_trainer(run)
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")
    pipe, info = load_export(folder)
    assert info["guidance"] == {"mode": "embedded", "guidance_scale": 2.0} and info["nfe_per_image"] == 3
    assert (info["lora"] is not None) == name.startswith("lora")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))

    def run_pipe(scale):
        return pipe(class_labels=[0, 1, 2], guidance_scale=scale, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    images = run_pipe(2.0)
    assert calls == [3, 3, 3]  # one UNet call of the batch per step: no CFG doubling
    with torch.no_grad():
        samples = trainer.objective.sample({"batch_size": 3}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (samples / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=2e-5)
    assert not torch.equal(run_pipe(3.5), images)  # the pipeline's guidance_scale reaches the student


def test_guidance_training_improves_over_the_initial_student(tmp_path, teacher_folder):
    run = recipe_run("guidance_digits", tmp_path, teacher_folder, "train.max_steps=25", "optim.student.lr=2e-3",
                     "optim.student.warmup_steps=0", "train.batch_size=16")
    trainer = build_trainer(run)
    o = trainer.objective
    batch = {"image": torch.stack([trainer.data[i]["image"] for i in range(32)]),
             "class_label": torch.tensor([trainer.data[i]["class_label"] for i in range(32)]), "batch_size": 32}

    def fixed_loss():
        torch.manual_seed(123)  # the same noise, timesteps and scales each time
        with torch.no_grad():
            return float(o.guidance_terms(batch)["guidance"])

    before = fixed_loss()
    trainer.train(resume=None)
    assert fixed_loss() < 0.95 * before


def test_a_scale_outside_the_trained_range_is_refused_at_export_and_warned_about_at_call_time(tmp_path,
                                                                                            teacher_folder):
    run = recipe_run("guidance_digits", tmp_path, teacher_folder)
    trainer = build_trainer(run)
    trainer.train(resume=None)
    spec = trainer.objective.export_spec()
    with pytest.raises(ExportError, match=r"guidance_scale 6 is outside the range \[1.0, 4.0\]"):
        export_pipeline(spec, out_dir=tmp_path / "bad", guidance_scale=6.0)
    folder = export_pipeline(spec, out_dir=tmp_path / "ok", guidance_scale=4.0)  # the range's edge is in it
    pipe, _ = load_export(folder)
    with pytest.warns(UserWarning, match=r"outside the range \[1.0, 4.0\] this model was trained for"):
        pipe(class_labels=[1], guidance_scale=5.0, output_type="pt")
    with pytest.raises(ConfigError, match="sample_guidance=6.0 is outside guidance_range"):
        recipe_run("guidance_digits", tmp_path, teacher_folder, "objective.sample_guidance=6.0")
    with pytest.raises(ConfigError, match="LoRADistillTrainer trains a LoRA student"):
        LoRADistillTrainer(recipe_run("guidance_digits", tmp_path, teacher_folder))


# ------------------------------------------------------------------------------------------------ diversity
def test_the_diversity_reward_matches_its_formula():
    same = torch.randn(1, 5).repeat(6, 1)
    assert float(diversity_reward(same, 3)) == pytest.approx(0.0, abs=1e-6)  # identical samples: no reward
    orthogonal = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None]
    assert float(diversity_reward(orthogonal, 4)) == pytest.approx(1.0)  # 1 - cos = 1 for every pair
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 7, generator=g)  # two groups of three
    expected = []
    for group in (f[:3], f[3:]):
        pairs = [1 - torch.nn.functional.cosine_similarity(group[i], group[j], dim=0)
                 for i in range(3) for j in range(i + 1, 3)]
        expected.append(torch.stack(pairs).mean())
    torch.testing.assert_close(diversity_reward(f, 3), torch.stack(expected).mean())
    with pytest.raises(ValueError, match="groups of 4"):
        diversity_reward(f, 4)


def test_quality_and_diversity_students_interpolate_in_one_line(tmp_path):
    a, b = tiny_teacher(0), tiny_teacher(1)
    q, d = a.backbone.state_dict(), b.backbone.state_dict()
    mixed = interpolate_weights(q, d, 0.25)
    for k in q:
        torch.testing.assert_close(mixed[k], 0.75 * q[k] + 0.25 * d[k])
    folders = [export_pipeline(m, "ddim_trailing", tmp_path / name, steps=2)
               for m, name in ((a, "quality"), (b, "diversity"))]
    pipe = load_interpolated(*folders, 0.25)
    assert type(pipe).__name__ == "ClassConditionalPipeline"
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, mixed[k])
    other = Denoiser(UNet2DModel(**{**TINY_UNET, "block_out_channels": [8, 16], "norm_num_groups": 4}),
                     a.schedule, "v_prediction", null_class=10)
    with pytest.raises(ValueError, match="shape"):
        interpolate_weights(q, other.backbone.state_dict(), 0.5)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        interpolate_weights(q, d, 1.5)
