"""HiPA (method ``hipa``): the high-frequency terms against known patterns (the Fourier high-pass on a constant, a
low-frequency cosine and a checkerboard; Sobel on a step edge) and against their formulas on random inputs, the
bad-setting errors, and the digits recipe end to end (a one-step LoRA on the frozen teacher, exported as LoRA
weights, reloaded, one UNet call, improving over the initial student)."""
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
from stepdistill.trainers.hipa import (edge_loss, fourier_highpass_loss, highpass_magnitude, highpass_mask,
                                       sobel_magnitude)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_fourier_high_pass_keeps_only_the_high_frequencies_of_known_patterns():
    n = 16
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    constant = torch.full((1, 1, n, n), 0.7)
    low = torch.cos(2 * math.pi * 2 * j / n).float()[None, None]  # 2 cycles per 16 px: 0.125 cycles/pixel
    checker = ((-1.0) ** (i + j)).float()[None, None]  # the Nyquist corner: radius 0.707
    assert highpass_magnitude(constant).abs().max() < 1e-6  # DC only
    assert highpass_magnitude(low, 0.25).abs().max() < 1e-5  # below the radius
    assert highpass_magnitude(low, 0.1).sum() == pytest.approx(2 * n / 2, rel=1e-5)  # two bins of n/2 (orthonormal)
    mag = highpass_magnitude(checker, 0.25)
    assert mag[0, 0, 0, 0] == pytest.approx(n, rel=1e-5)  # all of it at the corner
    assert mag.sum() == pytest.approx(n, rel=1e-5)
    kept = int(highpass_mask(n, n, 0.25).sum())
    assert fourier_highpass_loss(checker, 0.5 * checker, 0.25) == pytest.approx(0.5 * n / kept, rel=1e-5)
    assert float(fourier_highpass_loss(low, 3 * low, 0.25)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 8, 12, generator=g), torch.randn(2, 3, 8, 12, generator=g)
    fy, fx = torch.fft.fftfreq(8), torch.fft.fftfreq(12)  # the same from the uncentred spectrum and its own mask
    mask = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > 0.3
    diff = (torch.fft.fft2(x, norm="ortho").abs() - torch.fft.fft2(y, norm="ortho").abs()).abs() * mask
    torch.testing.assert_close(fourier_highpass_loss(x, y, 0.3), diff.sum() / (mask.sum() * 6))


def test_sobel_finds_a_step_edge_and_the_edge_loss_is_its_l1():
    step = torch.zeros(1, 1, 6, 8)
    step[..., 4:] = 1.0  # a vertical edge between columns 3 and 4
    mag = sobel_magnitude(step)[0, 0]
    assert torch.allclose(mag[:, 3:5], torch.full((6, 2), 4.0))  # (1 + 2 + 1) on both sides of the edge
    assert mag[:, :3].max() < 1e-5 and mag[:, 5:].max() < 1e-5  # flat elsewhere (replicate padding)
    torch.testing.assert_close(sobel_magnitude(step.transpose(2, 3))[0, 0], mag.t())  # and horizontally
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 2, 5, 5, generator=g)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = sum(kx[a, b] * padded[..., a:a + 5, b:b + 5] for a in range(3) for b in range(3))
    gy = sum(kx[b, a] * padded[..., a:a + 5, b:b + 5] for a in range(3) for b in range(3))
    torch.testing.assert_close(sobel_magnitude(x), (gx ** 2 + gy ** 2 + 1e-12).sqrt())
    torch.testing.assert_close(edge_loss(x, y), (sobel_magnitude(x) - sobel_magnitude(y)).abs().mean())


def hipa_run(tmp_path, pairs, teacher_folder, *extra):
    return load_config(CONFIGS / "hipa_digits.yaml", [
        f"model.source={teacher_folder}", f"data.path={pairs}", "data.resolution=8", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=30", "train.batch_size=16", "train.progress=false", "train.log_every=1",
        "train.checkpoint_every=0", "train.ema_decay=0", "objective.generator_lora_rank=4", "optim.generator.lr=3e-3",
        *extra])


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="generator_lora_rank must be >= 1"):
        load_config(CONFIGS / "hipa_digits.yaml", ["objective.generator_lora_rank=0"])
    with pytest.raises(ConfigError, match="student_steps must be 1"):
        load_config(CONFIGS / "hipa_digits.yaml", ["objective.student_steps=2"])
    with pytest.raises(ConfigError, match="freq_radius"):
        load_config(CONFIGS / "hipa_digits.yaml", ["objective.freq_radius=0.9"])
    run = load_config(CONFIGS / "hipa_digits.yaml", ["objective.lpips_weights=vgg.pth"])
    assert run.objective.regression_distance == "lpips"  # LPIPS when weights are given; pseudo-Huber otherwise
    assert load_config(CONFIGS / "hipa_digits.yaml").objective.regression_distance == "pseudo_huber"


def test_the_digits_recipe_trains_a_one_step_lora_and_exports_it(tmp_path, teacher_folder):
    from stepdistill.pairs import make_pairs

    make_pairs(str(teacher_folder), tmp_path / "pairs", 32, nfe=4, shard_size=32, batch_size=32, progress=False)
    trainer = build_trainer(hipa_run(tmp_path, tmp_path / "pairs", teacher_folder))
    o = trainer.objective
    assert o.generator.lora_layers() and all("lora_" in n for n, p in o.generator.named_parameters() if p.requires_grad)
    batch = {k: torch.stack([trainer.data[i][k] for i in range(32)]) for k in ("noise", "image")}
    batch.update(class_label=torch.stack([trainer.data[i]["class_label"] for i in range(32)]), batch_size=32)

    def fixed_loss():
        with torch.no_grad():
            return o.loss("generator", batch, 0)

    before, terms = fixed_loss()
    assert set(terms) == {"spatial", "freq", "edge"}
    torch.testing.assert_close(before, terms["spatial"] + 0.1 * terms["freq"] + 0.1 * terms["edge"])
    trainer.train(resume=None)
    assert float(fixed_loss()[0]) < 0.9 * float(before)
    folder = export_run(tmp_path / "run", tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["num_inference_steps"] == 1 and info["lora"]["format"] == "diffusers"
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    images = pipe(class_labels=[0, 1], output_type="pt", generator=torch.Generator().manual_seed(0),
                  **info["call"]["kwargs"]).images
    assert calls == [2]
    with torch.no_grad():
        samples = o.sample({"batch_size": 2}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (samples / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=2e-5)
