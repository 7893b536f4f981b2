"""The CUDA paths: the shipped digits recipes train under bf16 autocast on the GPU, export, and their exported
pipelines sample on the GPU; the SD 1.5 LCM recipe (on a tiny model of its layout) encodes its latents on the GPU
and sets the configured attention in every UNet; resuming restores the CUDA generator; xformers attention computes
SDPA's function; gradient checkpointing lowers CUDA memory without changing the gradients.

The rest of the suite runs on the CPU (conftest); these run only where a GPU is shown to them:
``STEPDISTILL_TEST_CUDA=1 pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill.trainers import load_config
from stepdistill.trainers import Callback, build_trainer
from text_teachers import consistency_run as tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: STEPDISTILL_TEST_CUDA=1 pytest tests/test_cuda.py")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def xformers_problem() -> str | None:
    """Why xformers attention cannot run here (not installed, or a build without kernels for this torch)."""
    from stepdistill.models import ModelLoadError, set_attention

    try:
        set_attention(cross_attention_unet(), "xformers")
    except ModelLoadError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", ["ict_digits", "lcm_lora_digits_1step", "dmd2_digits_1step"])
def test_digits_recipe_trains_in_bf16_on_cuda_and_exports(name, tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.runs import export_run

    run = load_config(CONFIGS / f"{name}.yaml", [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.batch_size=16", "train.mixed_precision=bf16",
        "train.checkpoint_every=0", "train.sample_every=0", "train.progress=false", "train.log_every=1"])
    trainer = build_trainer(run)
    trainer.train(resume=None)
    assert all(p.device.type == "cuda" for p in trainer.objective.parameters())
    logs = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(v)) for log in logs for k, v in log.items()
                                  if k.endswith("loss"))
    summary = json.loads((trainer.output_dir / "train_summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_cuda_allocated_mb"] > 0
    folder = export_run(trainer.output_dir, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    pipe = DiffusionPipeline.from_pretrained(folder, **({"trust_remote_code": True} if info["needs_stepdistill"]
                                                        else {})).to("cuda")
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(info["call"]["kwargs"])
    if info["call"]["input"] == "class_labels":
        kwargs["class_labels"] = [0, 1]
    if "batch_size" in inspect.signature(pipe.__call__).parameters:
        kwargs["batch_size"] = 2
    images = pipe(generator=torch.Generator("cuda").manual_seed(0), output_type="np", **kwargs).images
    assert images.shape[0] == 2 and np.isfinite(images).all()


def test_lcm_sd15_recipe_encodes_latents_on_the_gpu_and_sets_the_attention_of_every_unet(assets, tmp_path,
                                                                                        monkeypatch):
    import stepdistill.data.prompts as data

    xformers = xformers_problem() is None
    vae_devices, cache_latents = [], data.cache_latents

    def recording(images, vae, *args, **kwargs):
        vae_devices.append(next(vae.parameters()).device.type)
        return cache_latents(images, vae, *args, **kwargs)

    monkeypatch.setattr(data, "cache_latents", recording)
    run = tiny("lcm_sd15", assets, tmp_path / "run", "objective.guidance_embedding_dim=16",
               "train.mixed_precision=bf16", f"model.attention={'xformers' if xformers else 'sdpa'}")
    trainer = build_trainer(run)
    trainer.train(resume=None)
    assert vae_devices == ["cuda"]
    if xformers:
        from diffusers import ModelMixin
        from diffusers.models.attention_processor import XFormersAttnProcessor

        unets = [m for m in trainer.objective.modules() if isinstance(m, ModelMixin) and m.attn_processors]
        assert len(unets) >= 3  # teacher, student, target
        assert all(isinstance(p, XFormersAttnProcessor) for m in unets for p in m.attn_processors.values())


class RecordCudaRng(Callback):
    def __init__(self, step, stop=False):
        self.step, self.stop, self.state = step, stop, None

    def on_step_end(self, trainer, step):
        if step == self.step:
            self.state = torch.cuda.get_rng_state()
            if self.stop:
                os.kill(os.getpid(), signal.SIGTERM)


def test_resume_restores_the_cuda_generator(tiny_teacher_config, tmp_path):
    straight = tiny_teacher_config(max_steps=6)
    straight.output_dir = str(tmp_path / "straight")
    at3 = RecordCudaRng(3)
    build_trainer(straight, [at3]).train(resume=None)

    run = tiny_teacher_config(max_steps=6, checkpoint_every=3)
    run.output_dir = str(tmp_path / "interrupted")
    build_trainer(run, [RecordCudaRng(3, stop=True)]).train(resume=None)
    resumed = build_trainer(run)
    torch.cuda.manual_seed(12345)  # a fresh process would start from another state
    assert resumed.load_checkpoint("latest") and resumed.step == 3
    assert torch.equal(torch.cuda.get_rng_state(), at3.state)
    resumed.train(resume="latest")
    assert resumed.step == 6


def cross_attention_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                attention_head_dim=8, cross_attention_dim=64, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).cuda()


def test_xformers_attention_computes_what_sdpa_computes():
    problem = xformers_problem()
    if problem:
        pytest.skip(problem)
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from stepdistill.models import set_attention

    sdpa, xformers = cross_attention_unet(), cross_attention_unet()
    set_attention(xformers, "xformers")
    assert all(isinstance(p, XFormersAttnProcessor) for p in xformers.attn_processors.values())
    x, text = torch.randn(4, 4, 16, 16, device="cuda"), torch.randn(4, 7, 64, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    with torch.no_grad():
        ref, out = sdpa(x, t, text).sample, xformers(x, t, text).sample
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_gradient_checkpointing_lowers_cuda_memory_and_keeps_the_gradients():
    from diffusers import UNet2DModel

    def peak_and_grads(checkpointing):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=64, block_out_channels=(64, 128, 256), layers_per_block=2,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).cuda()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        x = torch.randn(16, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        unet(x, torch.full((16,), 500, device="cuda")).sample.square().mean().backward()
        peak = torch.cuda.max_memory_allocated() - base
        return peak, torch.cat([p.grad.flatten() for p in unet.parameters()])

    full, grads = peak_and_grads(False)
    checkpointed, grads_checkpointed = peak_and_grads(True)
    assert checkpointed < 0.7 * full
    assert ((grads_checkpointed - grads).norm() / grads.norm()).item() < 1e-3
