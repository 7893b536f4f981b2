"""The DMD2 paper recipes in configs/ (SD 1.5, SDXL 4-step and 1-step at t=399, SD3-style flow transformer) each
load with ``load_config`` and train 2 steps on a tiny model of the same architecture: a Diffusers pipeline folder
built here offline (tiny UNet2DConditionModel SD-style and SDXL-style, tiny SD3Transformer2DModel, tiny CLIP / T5
text stacks and VAE), with prompts encoded by the folder's own text encoders. Only what cannot run on a tiny
CPU model is overridden (teacher folder, prompt file, resolution, batch, steps, precision).

Also: CFG on the text teacher uses the encoded empty prompt; the students export as stock pipelines that run the
trained timesteps and give the generator's own samples (SD: LCMScheduler; SDXL 1-step: DDIMScheduler at t=399;
SD3: FlowMatchLCMScheduler with DMD2's fresh-noise re-noising).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from stepdistill.trainers import build_trainer, load_config
from text_teachers import CONFIGS, LATENT, PROMPTS

RECIPES = {  # config -> (tiny teacher, prompt file)
    "dmd2_sd15": ("sd", "prompts.txt"),
    "dmd2_sdxl_4step": ("sdxl", "prompts.jsonl"),
    "dmd2_sdxl_1step": ("sdxl", "prompts.jsonl"),
    "dmd2_sd3": ("sd3", "prompts.txt"),
}


def tiny_run(name, assets, out):
    root, folders = assets
    teacher, prompts = RECIPES[name]
    overrides = [f"model.source={folders[teacher]}", f"data.path={root / prompts}", f"data.resolution={LATENT}",
                 f"output_dir={out}", "train.max_steps=2", "train.batch_size=2", "train.mixed_precision='no'",
                 "train.log_every=1", "train.progress=false", "train.threads=1"]
    return load_config(CONFIGS / f"{name}.yaml", overrides)


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """Train each recipe (2 steps) once, on demand: name -> (run config, trainer, the teacher's uncond batches)."""
    done = {}

    def get(name):
        if name not in done:
            run = tiny_run(name, assets, tmp_path_factory.mktemp(name))
            trainer = build_trainer(run)
            teacher = trainer.objective.teacher.backbone
            seen = []  # the text condition of each CFG call of the teacher (batch [cond; uncond])

            def record(module, args, kwargs):
                states = kwargs.get("encoder_hidden_states")
                if states is not None and states.shape[0] == 2 * run.train.batch_size:
                    seen.append(states.detach().clone())

            handle = teacher.register_forward_pre_hook(record, with_kwargs=True)
            trainer.train(resume=None)
            handle.remove()
            done[name] = (run, trainer, seen)
        return done[name]

    return get


def logged(trainer):
    return [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_two_steps_on_a_tiny_model_of_its_architecture(trained, name):
    run, trainer, cfg_calls = trained(name)
    o = trainer.objective
    config = load_config(CONFIGS / f"{name}.yaml")  # the recipe as shipped: its source and data are text
    assert config.data.dataset == "prompts" and "/" in config.model.source and config.method == "dmd2"
    rows = logged(trainer)
    assert [r["step"] for r in rows] == [1, 2] and "generator/dm" in rows[0]  # the generator's turn is step 1
    gan = config.objective.gan_weight_disc > 0
    keys = {"generator/dm", "critic/fake_score"} | ({"generator/gan", "critic/disc"} if gan else set())
    values = {k: r[k] for r in rows for k in keys if k in r}
    assert set(values) == keys and all(math.isfinite(v) for v in values.values()), values
    # latent samples: the backbone's in_channels at the latent resolution (DMD2 never decodes)
    assert (o.channels, o.resolution) == (4, LATENT)
    if gan:  # real images from the .jsonl arrive as VAE latents
        assert trainer.data[0]["image"].shape == (4, LATENT, LATENT)
    assert cfg_calls, "the teacher ran no CFG call"  # real guidance > 1 in every recipe
    expected = {"dmd2_sd15": [999], "dmd2_sdxl_4step": [999, 749, 499, 249], "dmd2_sdxl_1step": [399],
                "dmd2_sd3": [1000, 892.3077, 698.9247, 250]}[name]
    assert o.timesteps == pytest.approx(expected)


@pytest.mark.parametrize("name", ["dmd2_sd15", "dmd2_sdxl_4step"])
def test_cfg_on_the_text_teacher_uses_the_null_prompt(trained, name):
    from stepdistill.prompts import PromptEncoder

    run, trainer, cfg_calls = trained(name)
    folder = Path(run.model.source)
    null = PromptEncoder.from_pretrained(folder, size=16 if "sdxl" in name else None).null()
    teacher = trainer.objective.teacher
    torch.testing.assert_close(teacher.null_cond.encoder_hidden_states, null.encoder_hidden_states)
    n = run.train.batch_size
    for states in cfg_calls:
        uncond = states[n:]
        torch.testing.assert_close(uncond, null.encoder_hidden_states.expand_as(uncond))
        assert not torch.equal(states[:n], uncond)  # the conditional half carries the prompts
    if "sdxl" in name:  # SDXL's force_zeros_for_empty_prompt: the null prompt is zeros, pooled too
        assert not teacher.null_cond.encoder_hidden_states.any() and not teacher.null_cond.pooled.any()
    # the null prompt is cached under the run folder
    assert list((Path(run.output_dir) / "cache").glob("null-*.safetensors"))


def _prompt_cond(run, prompts):
    from stepdistill.models import prompt_encoder_for

    return prompt_encoder_for(run.model, run.data.resolution).encode(prompts)


@pytest.mark.parametrize("name, pipeline_cls, scheduler", [
    ("dmd2_sd15", StableDiffusionPipeline, "LCMScheduler"),
    ("dmd2_sdxl_1step", StableDiffusionXLPipeline, "DDIMScheduler"),
])
def test_export_runs_the_trained_timesteps_in_the_stock_pipeline(trained, tmp_path, name, pipeline_cls, scheduler):
    from stepdistill.pipelines import export_pipeline

    run, trainer, _ = trained(name)
    o = trainer.objective
    folder = export_pipeline(o.export_spec(), None, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert not info["needs_stepdistill"] and info["scheduler"] == scheduler
    pipe = pipeline_cls.from_pretrained(folder)  # stock Diffusers; VAE and text encoders linked from the teacher
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == scheduler
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(float(torch.as_tensor(args[1]).flatten()[0])))
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt=PROMPTS[:2], latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    assert calls == o.timesteps and pipe.scheduler.timesteps.tolist() == o.timesteps
    with torch.no_grad():
        direct = o._generate(noise, _prompt_cond(run, PROMPTS[:2]), grad=False)
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-4)


def test_flow_student_exports_with_flow_match_lcm_and_samples_like_its_backward_simulation(trained, tmp_path):
    """SD3-style DMD2: the generator's x0 comes from the Denoiser (x - sigma u); the exported
    FlowMatchLCMScheduler re-noises with fresh noise as the backward simulation does, so the stock pipeline,
    sample_student and the objective's own rollout agree (StableDiffusion3Pipeline draws the step noise from
    torch's global generator)."""
    from stepdistill.pipelines import export_pipeline, sample_student

    run, trainer, _ = trained("dmd2_sd3")
    o = trainer.objective
    assert o.sampler == "flow_lcm" and type(o.student_scheduler).__name__ == "FlowMatchLCMScheduler"
    folder = export_pipeline(o.export_spec(), None, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert not info["needs_stepdistill"] and info["scheduler"] == "FlowMatchLCMScheduler"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    cond = _prompt_cond(run, PROMPTS[:2])
    torch.manual_seed(7)
    out = pipe(prompt=PROMPTS[:2], latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(o.timesteps)
    ref = sample_student(o.generator, pipe.scheduler, noise, 4, cond, generator=torch.Generator().manual_seed(7),
                         pipeline="StableDiffusion3Pipeline")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.manual_seed(8)  # the re-noising is really stochastic: other step noise, other samples
    other = pipe(prompt=PROMPTS[:2], latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    assert (other - out).abs().max() > 1e-3
    torch.manual_seed(7)
    with torch.no_grad():
        torch.testing.assert_close(o._generate(noise, cond, grad=False), ref, rtol=1e-4, atol=1e-4)


def test_flow_euler_recipe_rolls_out_with_the_deterministic_euler_update(assets, tmp_path):
    """recipe: flow_euler (the alternative to flow_lcm): backward simulation carries the predicted noise to the next
    sigma, which is the exported FlowMatchEulerDiscreteScheduler's Euler step."""
    from stepdistill.pipelines import sample_student

    run = tiny_run("dmd2_sd3", assets, tmp_path / "run")
    run.objective.recipe = "flow_euler"
    o = build_trainer(run).objective
    assert o.sampler == "flow_euler" and type(o.student_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    cond = _prompt_cond(run, PROMPTS[:2])
    with torch.no_grad():
        ours = o._generate(noise, cond, grad=False)
    ref = sample_student(o.generator, o.student_scheduler, noise, 4, cond, pipeline="StableDiffusion3Pipeline")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_run_resolves_its_teacher_once_and_loads_its_text_encoders_once(assets, tmp_path, monkeypatch):
    """The data (prompts) and the objective (the null prompt for CFG) share the teacher's one prompt encoder."""
    import diffusers

    import stepdistill.models as models

    resolved, loads = [], []
    resolve_folder, from_pretrained = models._resolve_folder, diffusers.DiffusionPipeline.from_pretrained
    monkeypatch.setattr(models, "_resolve_folder", lambda *a: resolved.append(a) or resolve_folder(*a))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: loads.append(a) or from_pretrained(*a, **k))
    models._RESOLVED.clear()
    models._ENCODERS.clear()
    trainer = build_trainer(tiny_run("dmd2_sd15", assets, tmp_path / "run"))
    assert trainer.objective.null_cond is not None and len(trainer.data) == len(PROMPTS)
    assert len(resolved) == 1 and len(loads) == 1  # one folder resolution, one load of the text encoders


# ---------------------------------------------------------------------------------------------- bad input
def test_text_teacher_without_prompts_and_bad_conditioning_timestep_are_clear_errors(assets, tmp_path):
    from stepdistill.config import ConfigError
    from stepdistill.data import DataError

    run = tiny_run("dmd2_sd15", assets, tmp_path / "a")
    run.data.dataset = "none"
    with pytest.raises(ConfigError, match="text-conditioned: set data.dataset=prompts"):
        build_trainer(run)
    run = tiny_run("dmd2_sd15", assets, tmp_path / "b")
    run.model.source = "digits-teacher"
    with pytest.raises(DataError, match="teacher's text encoders"):
        build_trainer(run)
    with pytest.raises(ConfigError, match="conditioning_timestep is for 1-step"):
        load_config(CONFIGS / "dmd2_sdxl_1step.yaml", ["objective.student_steps=4"])
    with pytest.raises(ConfigError, match="conditioning_timestep is for VP"):
        load_config(CONFIGS / "dmd2_sd3.yaml", ["objective.student_steps=1", "objective.conditioning_timestep=399"])
    sd3 = tiny_run("dmd2_sd3", assets, tmp_path / "c")
    sd3.objective.recipe = "lcm_uniform"
    with pytest.raises(ConfigError, match="flow_euler or flow_lcm"):
        build_trainer(sd3)
