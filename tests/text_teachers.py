"""Tiny text-to-image teachers in the layouts of SD 1.5, SDXL and SD3, built offline (CLIP / T5 text stacks, VAE),
and the prompts they are tried with: shared by the recipe tests (the ``assets`` fixture in conftest.py builds them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from stepdistill.trainers import load_config
from tiny import clip_model, clip_tokenizer, t5_model, t5_tokenizer, tiny_vae

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


PROMPTS = ["a cat", "zebra", "a big dog", "the sun"]


LATENT = 8  # latent resolution of the tiny models (16 px through the tiny VAE's factor 2)


SCALED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


UNET = dict(sample_size=LATENT, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
            in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def sd_folder(path):
    """SD 1.5's layout: CLIP text encoder, cross-attention UNet, PNDMScheduler with SD 1.5's config."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=32, **UNET)
    sched = PNDMScheduler(**SCALED, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_model(), tokenizer=clip_tokenizer(), unet=unet,
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def sdxl_folder(path):
    """SDXL's layout: two CLIPs (the second with projection), a text_time UNet, EulerDiscreteScheduler as SDXL."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(cross_attention_dim=32 + 48, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=48 + 6 * 4, **UNET)
    sched = EulerDiscreteScheduler(**SCALED, steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=clip_model(), text_encoder_2=clip_model(1, 48, True),
                              tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=sched,
                              add_watermarker=False).save_pretrained(path)
    return path


def sd3_folder(path):
    """SD3's layout: CLIP-L + CLIP-G (with projections) + T5, an MMDiT, FlowMatchEulerDiscreteScheduler(shift=3)."""
    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=4, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=8, pooled_projection_dim=64, pos_embed_max_size=8)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=tiny_vae(shift_factor=0.1), text_encoder=clip_model(2, projection=True),
                             tokenizer=clip_tokenizer(), text_encoder_2=clip_model(3, projection=True),
                             tokenizer_2=clip_tokenizer(), text_encoder_3=t5_model(),
                             tokenizer_3=t5_tokenizer()).save_pretrained(path)
    return path


def build_assets(root: Path):
    """The three tiny teachers under ``root`` and their prompt files (.txt, and .jsonl with a 16 px image each):
    ``(root, {"sd": folder, "sdxl": folder, "sd3": folder})``."""
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = {"sd": sd_folder(root / "sd"), "sdxl": sdxl_folder(root / "sdxl"), "sd3": sd3_folder(root / "sd3")}
    finally:
        torch.set_num_threads(threads)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for i, prompt in enumerate(PROMPTS):  # real images for the GAN: 16 px = the latent 8 x the VAE's factor 2
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"img{i}.png"}))
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root, folders


def consistency_run(name, assets, out, *extra):
    """The consistency recipe ``configs/<name>.yaml`` on its tiny teacher: 2 steps of batch 2, on the CPU."""
    root, folders = assets
    teacher = {"lcm_sd15": "sd", "lcm_lora_sdxl": "sdxl"}[name]
    overrides = [f"model.source={folders[teacher]}", f"data.path={root / 'prompts.jsonl'}",
                 f"data.resolution={LATENT}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                 "train.mixed_precision='no'", "train.log_every=1", "train.progress=false", "train.threads=1",
                 "optim.student.lr=1e-3", "optim.student.warmup_steps=0", *extra]
    return load_config(CONFIGS / f"{name}.yaml", overrides)
