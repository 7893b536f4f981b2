"""The CFG- and LoRA-distillation recipes of published models and of the shipped text-to-image digits teacher load and
train 2 steps on tiny models of the same architectures (SD 1.5, SDXL and DiT layouts built offline, see
text_teachers.py), and export as their stock pipelines: the guidance student and the AGD adapters make one UNet call
per step at the pipeline's guidance_scale (the CFG the teacher would double), HiPA's adaptors load as LoRA weights."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from stepdistill.pipelines import load_guidance_adapters
from stepdistill.runs import export_run
from stepdistill.trainers import build_trainer, load_config
from text_teachers import CONFIGS, LATENT, PROMPTS

TINY = ["train.max_steps=2", "train.batch_size=2", "train.mixed_precision='no'", "train.log_every=1",
        "train.progress=false", "train.threads=1", "train.checkpoint_every=0", "train.ema_decay=0"]
AGD_TINY = ["objective.hidden_dim=8", "objective.embed_dim=8", "objective.num_trajectories=2",
            "objective.trajectory_steps=2", "objective.trajectory_batch_size=2", "objective.sample_steps=3"]


def counted(pipe):
    """The batch of each denoiser call of ``pipe``."""
    calls = []
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    denoiser.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0] if args else
                                                                             kwargs["hidden_states"]).shape[0]),
                                       with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    return calls


def train_and_export(name, tmp_path, overrides):
    run = load_config(CONFIGS / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}", *TINY, *overrides])
    trainer = build_trainer(run)
    trainer.train(resume=None)
    folder = export_run(tmp_path / "run", tmp_path / "export")
    return trainer, folder, json.loads((folder / "stepdistill.json").read_text())["export"]


@pytest.mark.parametrize("name,teacher", [("guidance_sd15", "sd"), ("agd_sd15", "sd"), ("agd_sdxl", "sdxl")])
def test_sd_recipes_export_stock_pipelines_that_guide_in_one_call_per_step(name, teacher, assets, tmp_path):
    root, folders = assets
    overrides = [f"model.source={folders[teacher]}", f"data.path={root / 'prompts.jsonl'}",
                 f"data.resolution={LATENT}"]
    overrides += ["objective.guidance_embedding_dim=8", "objective.sample_steps=3"] if name.startswith("guidance") \
        else AGD_TINY
    trainer, folder, info = train_and_export(name, tmp_path, overrides)
    expected = "StableDiffusionXLPipeline" if teacher == "sdxl" else "StableDiffusionPipeline"
    assert info["pipeline"] == expected and info["scheduler"] == "DDIMScheduler" and not info["needs_stepdistill"]
    assert info["guidance"]["mode"] == "embedded" and info["nfe_per_image"] == 3
    pipe = DiffusionPipeline.from_pretrained(folder)  # plain Diffusers
    assert type(pipe).__name__ == expected
    if info.get("guidance_adapters"):
        load_guidance_adapters(pipe, folder)  # the documented call
    calls = counted(pipe)
    out = pipe(prompt=PROMPTS[:2], output_type="latent", generator=torch.Generator().manual_seed(0),
               **info["call"]["kwargs"]).images
    assert calls == [2, 2, 2] and out.shape == (2, 4, LATENT, LATENT)  # one call per step: no CFG batch of 4
    assert info["call"]["kwargs"]["guidance_scale"] > 1


def test_hipa_sd15_trains_low_rank_adaptors_on_attention_and_exports_a_one_step_lora(assets, tmp_path):
    from stepdistill.pairs import make_pairs

    root, folders = assets
    make_pairs(str(folders["sd"]), tmp_path / "pairs", 4, nfe=2, prompts=PROMPTS, guidance_scale=7.5, shard_size=4,
               batch_size=4, progress=False)
    trainer, folder, info = train_and_export("hipa_sd15", tmp_path, [
        f"model.source={folders['sd']}", f"data.path={tmp_path / 'pairs'}", f"data.resolution={LATENT}",
        "objective.generator_lora_rank=2"])
    trained = [n for n, p in trainer.objective.generator.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and any(k in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in trained)
    assert info["pipeline"] == "StableDiffusionPipeline" and info["num_inference_steps"] == 1
    assert info["lora"]["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(folder)
    calls = counted(pipe)
    pipe(prompt=PROMPTS[:2], output_type="latent", **info["call"]["kwargs"])
    assert calls == [2]


def dit_folder(path):
    """DiT's layout: a class-conditional DiTTransformer2DModel (learned sigma), a VAE and DDIMScheduler."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from tiny import tiny_vae

    torch.manual_seed(3)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=LATENT, patch_size=2, num_embeds_ada_norm=10)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_agd_dit_runs_the_adapters_at_the_exported_scale_under_ditpipeline(tmp_path):
    folder = dit_folder(tmp_path / "dit")
    trainer, export, info = train_and_export("agd_dit", tmp_path, [f"model.source={folder}",
                                                                   f"data.resolution={LATENT}", *AGD_TINY])
    assert len(trainer.objective.student.backbone.guidance_adapter_config["targets"]) == 2  # attn1 of each block
    assert info["pipeline"] == "DiTPipeline" and info["call"]["kwargs"]["guidance_scale"] == 1.0
    pipe = DiffusionPipeline.from_pretrained(export)
    load_guidance_adapters(pipe, export)
    assert pipe.transformer.guidance_adapter_config["default_guidance_scale"] == 4.0  # the recorded scale
    calls = counted(pipe)
    out = pipe(class_labels=[1, 2], output_type="pt", generator=torch.Generator().manual_seed(0),
               **info["call"]["kwargs"]).images
    assert calls == [2, 2, 2] and torch.isfinite(torch.as_tensor(out)).all()


@pytest.mark.parametrize("name", ["guidance_digits_t2i", "agd_digits_t2i"])
def test_the_digits_t2i_recipes_train_from_the_shipped_teacher(name, tmp_path):
    extra = AGD_TINY if name.startswith("agd") else ["objective.guidance_embedding_dim=8", "objective.sample_steps=3"]
    trainer, folder, info = train_and_export(name, tmp_path, ["data.path=digits-captions:train:1", *extra])
    assert info["pipeline"] == "StableDiffusionPipeline" and info["guidance"]["mode"] == "embedded"
    pipe = DiffusionPipeline.from_pretrained(folder)
    if info.get("guidance_adapters"):
        load_guidance_adapters(pipe, folder)
    calls = counted(pipe)
    images = pipe(["a thick 7"], output_type="pt", generator=torch.Generator().manual_seed(0),
                  **info["call"]["kwargs"]).images
    assert calls == [1, 1, 1] and images.shape == (1, 1, 32, 32)
