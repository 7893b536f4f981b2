"""AGD (method ``agd``): the guidance adapters (zero-initialised = the base exactly; the scale changes the output; agd's
attention formula), the guided trajectory cache (make-pairs style: its points are the teacher's CFG, resumable, other
settings refused), the adapter file on the base, on a fine-tune of it and on another architecture (a clear error), and
the digits recipe end to end (the documented load, one UNet call per step, the trainable fraction, improving)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from stepdistill.backbones import guidance_scale_embedding
from stepdistill.conditioning import Cond
from stepdistill.data import DataError
from stepdistill.denoiser import Denoiser
from stepdistill.guided import (GuidanceAdapter, adapter_fraction, install_guidance_adapters, load_guidance_adapters,
                                save_guidance_adapters)
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runs import export_run
from stepdistill.schedule import NoiseSchedule
from stepdistill.trainers import build_trainer, load_config
from stepdistill.trajectories import TrajectorySet, make_trajectories
from tiny import TINY_SCHEDULER, TINY_UNET

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = dict(hidden_dim=8, embed_dim=8, mlp_ratio=2.0)


def tiny(seed=0, **changes) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(UNet2DModel(**{**TINY_UNET, **changes}),
                    NoiseSchedule.from_scheduler(DDPMScheduler(**TINY_SCHEDULER)), "v_prediction", null_class=10)


def adapted(base: Denoiser) -> Denoiser:
    student = base.clone(trainable=False, share_weights=True)
    install_guidance_adapters(student.backbone, **SETTINGS, guidance_range=[1.0, 4.0])
    return student


def perturb(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, GuidanceAdapter):
                m.out_proj.weight.copy_(torch.randn(m.out_proj.weight.shape, generator=g) * 0.5)


def test_zero_initialised_adapters_are_the_base_exactly_and_the_scale_then_drives_them():
    base = tiny().freeze()
    student = adapted(base)
    backbone = student.backbone
    assert list(backbone.guidance_adapter_config["targets"]) == ["mid_block.attentions.0"]  # the only attention
    assert backbone.config.time_cond_proj_dim == 8  # pipelines now pass the guidance embedding (and skip CFG)
    frac = adapter_fraction(backbone)
    assert frac["adapter_parameters"] == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert frac["base_parameters"] == sum(p.numel() for p in base.parameters())
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([900.0, 30.0]), torch.tensor([2, 5])
    with torch.no_grad():
        for s in (1.0, 3.0):
            cond = Cond(class_labels=labels, guidance=torch.full((2,), s))
            assert torch.equal(student(x, t, cond), base(x, t, Cond(class_labels=labels)))
    perturb(backbone)
    with torch.no_grad():
        one = student(x, t, Cond(class_labels=labels, guidance=torch.tensor([1.5, 1.5])))
        two = student(x, t, Cond(class_labels=labels, guidance=torch.tensor([3.5, 3.5])))
    assert not torch.allclose(one, two)
    assert not torch.allclose(one, base(x, t, Cond(class_labels=labels)))


def test_the_adapter_is_agds_attention_over_the_guidance_token():
    g = torch.Generator().manual_seed(0)
    adapter = GuidanceAdapter(6, hidden_dim=4, embed_dim=8, num_heads=2, mlp_ratio=2.0, use_timestep=True)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 5, 6, generator=g)
    e_s = guidance_scale_embedding(torch.tensor([0.5, 2.0]), 8)
    e_t = guidance_scale_embedding(torch.tensor([0.9, 0.1]), 8)
    out = adapter(x, e_s, e_t)
    tokens = torch.stack([adapter.guidance_encoder(e_s), adapter.timestep_encoder(e_t)], 1)
    pos = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]])  # sin | cos
    tokens = tokens + pos
    q, k, v = adapter.q_proj(x), adapter.k_proj(tokens), adapter.v_proj(tokens)
    heads = []
    for h in range(2):  # per head, scale 1/sqrt(hidden_dim) as agd
        sl = slice(2 * h, 2 * h + 2)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    torch.testing.assert_close(out, adapter.out_proj(torch.cat(heads, -1)), rtol=1e-5, atol=1e-5)


def test_adapters_load_onto_a_fine_tune_of_the_base_and_refuse_another_architecture(tmp_path):
    student = adapted(tiny(0).freeze())
    perturb(student.backbone)
    path = save_guidance_adapters(student.backbone, tmp_path, guidance_range=[1.0, 4.0])
    fine_tune = tiny(1)  # the same architecture, other weights
    load_guidance_adapters(fine_tune.backbone, tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 100.0])
    cond = Cond(class_labels=torch.tensor([1, 2]), guidance=torch.tensor([2.0, 2.0]))
    for name, tensor in student.backbone.state_dict().items():
        if ".guidance_adapter." in name:
            assert torch.equal(fine_tune.backbone.state_dict()[name], tensor)
    with torch.no_grad():
        assert not torch.allclose(fine_tune(x, t, cond), tiny(1)(x, t, Cond(class_labels=torch.tensor([1, 2]))))
    wider = tiny(0, block_out_channels=[16, 48])
    with pytest.raises(ValueError, match="do not fit this UNet2DModel: .*'mid_block.attentions.0' with 32 channels, "
                                         "which it has with 48"):
        load_guidance_adapters(wider.backbone, path)
    from text_teachers import UNET
    from diffusers import UNet2DConditionModel

    with pytest.raises(ValueError, match="trained on a UNet2DModel; this pipeline's denoiser is a UNet2DCondition"):
        load_guidance_adapters(UNet2DConditionModel(cross_attention_dim=8, **UNET), path)
    with pytest.raises(ValueError, match="already has guidance adapters"):
        load_guidance_adapters(fine_tune.backbone, path)


def test_the_trajectory_cache_holds_the_teachers_cfg_and_resumes(tmp_path):
    teacher = tiny().freeze()
    scheduler = DDPMScheduler(**TINY_SCHEDULER)
    kwargs = dict(steps=3, guidance_range=[1.0, 4.0], resolution=8, channels=1, fingerprint="f", num_classes=10,
                  shard_size=2, batch_size=2)
    manifest = make_trajectories(teacher, scheduler, tmp_path / "traj", 5, **kwargs)
    data = TrajectorySet(tmp_path / "traj")
    assert len(data) == 5 * 3 and json.loads(manifest.read_text())["num_shards"] == 3
    assert data.tensors["scale"].min() >= 1.0 and data.tensors["scale"].max() <= 4.0
    rows, cond = data.rows(torch.tensor([4, 7]))
    with torch.no_grad():  # the guided eps at the recorded point: CFG u + s (c - u) in eps, the teacher's own
        c, u = teacher.cond_uncond(rows["x"], rows["t"], cond, output="epsilon")
        s = rows["scale"].view(-1, 1, 1, 1)
    torch.testing.assert_close(rows["eps"], u + s * (c - u), rtol=1e-4, atol=1e-5)
    from stepdistill.pairs import pair_timesteps

    assert data.tensors["t"][:2 * 3:2].tolist() == pair_timesteps(scheduler, 3)  # the teacher's DDIM timesteps
    before = (tmp_path / "traj" / "trajectories-00000.safetensors").stat().st_mtime_ns
    make_trajectories(teacher, scheduler, tmp_path / "traj", 5, **kwargs)  # complete: nothing is made again
    assert (tmp_path / "traj" / "trajectories-00000.safetensors").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="other settings \\(guidance_range"):
        make_trajectories(teacher, scheduler, tmp_path / "traj", 5, **{**kwargs, "guidance_range": [1.0, 8.0]})


def test_the_digits_recipe_trains_exports_and_loads_with_one_documented_call(tmp_path, teacher_folder):
    run = load_config(CONFIGS / "agd_digits.yaml", [
        f"model.source={teacher_folder}", "data.resolution=8", f"output_dir={tmp_path / 'run'}", "train.max_steps=30",
        "train.batch_size=16", "train.progress=false", "train.log_every=1", "train.checkpoint_every=0",
        "objective.hidden_dim=8", "objective.embed_dim=8", "objective.num_trajectories=8",
        "objective.trajectory_steps=4", "objective.sample_steps=3", "optim.student.lr=3e-3"])
    trainer = build_trainer(run)
    o = trainer.objective
    assert (tmp_path / "run" / "cache" / "agd-trajectories" / "trajectories.json").is_file()
    idx = torch.arange(0, len(o.trajectories), 2)

    def fixed_loss():
        rows, cond = o.trajectories.rows(idx)
        with torch.no_grad():
            eps = o.student(rows["x"], rows["t"], Cond(**{**cond.__dict__, "guidance": rows["scale"]}),
                            output="epsilon")
        return float(((eps - rows["eps"]) ** 2).mean())

    before = fixed_loss()
    trainer.train(resume=None)
    assert fixed_loss() < 0.95 * before
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["student/trainable_fraction"] == pytest.approx(o.fraction["fraction"])
    folder = export_run(tmp_path / "run", tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["guidance_adapters"]["fraction"] == pytest.approx(o.fraction["fraction"])
    assert "load_guidance_adapters(pipe" in (folder / "README.md").read_text()
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DModel" and "time_cond_proj_dim" not in unet_config  # the plain base
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base_images = pipe(class_labels=[0, 1], output_type="pt", generator=torch.Generator().manual_seed(0),
                       **info["call"]["kwargs"]).images  # without the adapters: the teacher with CFG
    load_guidance_adapters(pipe, folder)  # the documented call
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    images = pipe(class_labels=[0, 1, 2], output_type="pt", generator=torch.Generator().manual_seed(0),
                  **info["call"]["kwargs"]).images
    assert calls == [3, 3, 3]  # one UNet call per step
    with torch.no_grad():
        samples = o.sample({"batch_size": 3}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (samples / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(images[:2], base_images)
    final = tmp_path / "run" / "final"  # the run's own model: base + adapters, loaded together as a teacher
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model

    assert hasattr(load_model(ModelConfig(source=str(final))).denoiser.backbone, "guidance_adapter_config")
