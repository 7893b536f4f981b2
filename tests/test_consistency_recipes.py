"""The consistency recipes in configs/ (LCM SD 1.5, LCM-LoRA SDXL, LCM on an SD3-style flow transformer) load and train 2 steps on tiny models of the
same architecture (built offline, see test_dmd_recipes), and export: the LCM student as a stock
LatentConsistencyModelPipeline (LCMScheduler, guidance embedding), the LCM-LoRA student as LoRA weights that the *base* pipeline loads
with load_lora_weights and runs in 4 steps."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline

from stepdistill.config import ConfigError

from stepdistill.trainers import load_config
from stepdistill.trainers import build_trainer
from text_teachers import CONFIGS, LATENT, PROMPTS, consistency_run as tiny


def test_lcm_sd15_trains_with_a_guidance_embedding_and_exports_for_lcm_scheduler(assets, tmp_path):
    from stepdistill.runs import export_run

    run = tiny("lcm_sd15", assets, tmp_path / "run", "objective.guidance_embedding_dim=16")
    assert run.objective.guidance_range == [6.0, 16.0] and run.objective.target_ema == 0.95
    trainer = build_trainer(run)
    assert trainer.objective.student.backbone.config.time_cond_proj_dim == 16
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["pipeline"] == "LatentConsistencyModelPipeline" and info["scheduler"] == "LCMScheduler"
    assert info["guidance"]["mode"] == "embedded" and not info["needs_stepdistill"]
    pipe = DiffusionPipeline.from_pretrained(folder)  # stock LatentConsistencyModelPipeline
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPTS[:2], output_type="latent", generator=torch.Generator().manual_seed(0),
               **info["call"]["kwargs"]).images
    assert out.shape == (2, 4, LATENT, LATENT) and torch.isfinite(out).all()


def test_lcm_lora_sdxl_loads_on_the_base_pipeline_and_runs_4_steps(assets, tmp_path):
    from stepdistill.runs import export_run

    root, folders = assets
    run = tiny("lcm_lora_sdxl", assets, tmp_path / "run", "objective.lora_rank=4")
    assert run.objective.embed_guidance is False and run.objective.guidance_range == [4.0, 16.0]
    trainer = build_trainer(run)
    o = trainer.objective
    assert o.target is None and not o.embeds_guidance
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    base = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])  # the teacher, as users have it
    base.set_progress_bar_config(disable=True)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    plain = base(latents=noise, generator=torch.Generator().manual_seed(1), **kwargs).images
    base.load_lora_weights(folder)
    calls = []
    base.unet.register_forward_pre_hook(lambda m, args: calls.append(float(torch.as_tensor(args[1]).flatten()[0])))
    lora = base(latents=noise, generator=torch.Generator().manual_seed(1), **kwargs).images
    assert len(calls) == 4 and not torch.allclose(lora, plain)
    exported = StableDiffusionXLPipeline.from_pretrained(folder)  # the export's own folder: base + the same LoRA
    exported.load_lora_weights(folder)
    exported.set_progress_bar_config(disable=True)
    torch.testing.assert_close(exported(latents=noise, generator=torch.Generator().manual_seed(1), **kwargs).images,
                               lora, rtol=1e-4, atol=1e-4)


def test_lcm_on_a_flow_transformer_exports_with_flow_match_lcm(assets, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from stepdistill.runs import export_run

    root, folders = assets
    overrides = [f"model.source={folders['sd3']}", f"data.path={root / 'prompts.jsonl'}", f"data.resolution={LATENT}",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                 "train.mixed_precision='no'", "train.log_every=1", "train.progress=false", "train.threads=1",
                 "optim.student.lr=1e-3", "optim.student.warmup_steps=0"]
    with pytest.raises(ConfigError, match="sampler: tcd are for VP"):
        build_trainer(load_config(CONFIGS / "lcm_sd3.yaml", overrides + ["objective.sampler=tcd"]))
    run = load_config(CONFIGS / "lcm_sd3.yaml", overrides)
    trainer = build_trainer(run)
    o = trainer.objective
    assert o.grid[-1] == pytest.approx(1000.0) and o.grid_prev[0] == 0.0
    assert o.grid[0] == pytest.approx(1000 * 3 * 0.02 / (1 + 2 * 0.02))  # shift 3 applied to sigma = 1/50
    x = torch.randn(2, 4, LATENT, LATENT)
    x0 = torch.randn(2, 4, LATENT, LATENT)
    torch.testing.assert_close(o.f(x, x0, torch.tensor([500.0, 20.0])), x0)  # flow: f is the x0 prediction
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["scheduler"] == "FlowMatchLCMScheduler" and info["pipeline"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(float(torch.as_tensor(kwargs["timestep"]).flatten()[0])), with_kwargs=True)
    out = pipe(prompt=PROMPTS[:2], output_type="latent", generator=torch.Generator().manual_seed(0),
               **info["call"]["kwargs"]).images
    assert torch.isfinite(out).all() and len(calls) == 4 and calls == pytest.approx(o.sample_timesteps())
