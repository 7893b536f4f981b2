"""Train the text-to-image digits teacher's VAE: a tiny ``AutoencoderKL`` (32x32x1 pixels <-> 8x8x4 latents).

Trained on the 80% train split of the digits at 32x32 (``stepdistill.data.captions.RESOLUTION``) with an L1 + MSE
reconstruction loss and a small KL term (SD's VAE keeps KL small too, 1e-6 of it); its ``scaling_factor`` is set
to 1 / std of the train split's latent means, as SD's was, so that scaled latents have unit variance. Reports the
reconstruction PSNR (of the posterior mean) on the 20% test split and writes the Diffusers folder with a README.

    python scripts/train_digits_vae.py [--steps 1500] [--out stepdistill/assets/digits-t2i/vae]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

from stepdistill.data import digits_tensors
from stepdistill.data.captions import RESOLUTION

CONFIG = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
KL_WEIGHT = 1e-6


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole set."""
    mse = F.mse_loss(a.clamp(-1, 1), b).item()
    return 10 * math.log10(4 / mse)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(images[i:i + batch]).latent_dist.mean).sample
                      for i in range(0, len(images), batch)])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="stepdistill/assets/digits-t2i/vae")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, _ = digits_tensors(RESOLUTION, "train")
    test, _ = digits_tensors(RESOLUTION, "test")
    vae = AutoencoderKL(**CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", opt, num_warmup_steps=min(100, args.steps // 10), num_training_steps=args.steps)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        x = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        out = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(out, x) + F.mse_loss(out, x) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train[i:i + 256]).latent_dist.mean for i in range(0, len(train), 256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    scores = {"psnr_test_db": round(psnr(reconstruct(vae, test), test), 2),
              "psnr_train_db": round(psnr(reconstruct(vae, train), train), 2)}
    out = Path(args.out)
    vae.save_pretrained(out, safe_serialization=True)
    record = {**scores, "scaling_factor": vae.config.scaling_factor, "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "kl_weight": KL_WEIGHT, "parameters": sum(p.numel() for p in vae.parameters()),
              "train_seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
              "script": "scripts/train_digits_vae.py"}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
