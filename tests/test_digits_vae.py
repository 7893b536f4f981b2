"""The shipped VAE of the text-to-image digits teacher (``scripts/train_digits_vae.py``): a stock ``AutoencoderKL``
folder that plain Diffusers loads, 32x32x1 pixels to 8x8x4 latents of about unit variance once scaled, and the
reconstruction PSNR its training record states."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from stepdistill.data import digits_tensors
from stepdistill.data.captions import RESOLUTION

VAE = Path(__file__).resolve().parents[1] / "stepdistill" / "assets" / "digits-t2i" / "vae"


def test_loads_with_plain_diffusers_in_a_fresh_process():
    code = ("import sys\nsys.modules['stepdistill'] = None  # importing stepdistill would fail\n"
            "from diffusers import AutoencoderKL\n"
            f"vae = AutoencoderKL.from_pretrained({str(VAE)!r})\n"
            "print(vae.config.latent_channels, vae.config.in_channels)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["4", "1"]


def test_reconstructs_the_held_out_digits_at_the_recorded_psnr():
    from diffusers import AutoencoderKL

    record = json.loads((VAE / "training.json").read_text())
    vae = AutoencoderKL.from_pretrained(VAE).eval()
    images, _ = digits_tensors(RESOLUTION, "test")
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
    assert posterior.mean.shape[1:] == (4, RESOLUTION // 4, RESOLUTION // 4)  # 8x8x4 latents
    psnr = 10 * math.log10(4 / F.mse_loss(recon, images).item())
    assert abs(psnr - record["psnr_test_db"]) < 0.05 and psnr > 25
    scaled = posterior.mean * vae.config.scaling_factor
    assert 0.8 < float(scaled.std()) < 1.25  # the latents a teacher trains on have about unit variance
