"""NASA-I on the shipped text-to-image digits teacher: does a negative prompt, applied through the cross-attention
layers (stepdistill.pipelines.apply_nasa), move the attribute it names away?

The stock digits-t2i pipeline samples "the digit 0" ... "the digit 9" (N images, 16 DDIM steps, CFG 3, the same
noise) without NASA and with each negative, and the decoded digits' stroke thickness, slant and width are measured as
the captions measure them (stepdistill.data.captions.measure_attributes). A sanity check of the mechanism on the
teacher (NASA is meant for one-step students, where CFG with a negative prompt fails); about 30 s on one CPU thread.

    python benchmarks/nasa_attributes.py [--n 96] [--alpha 0.5]
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from stepdistill.data.captions import measure_attributes
from stepdistill.models import NAMED_MODELS
from stepdistill.pipelines import apply_nasa, remove_nasa

NEGATIVES = ("in thin strokes", "in bold strokes", "leaning right")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(NAMED_MODELS["digits-t2i"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"the digit {i % 10}" for i in range(args.n)]

    def measure():
        images = pipe(prompts, num_inference_steps=16, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                      output_type="pt", height=32, width=32).images
        return measure_attributes(images.mean(1, keepdim=True) * 2 - 1)

    base = measure()
    print("| negative prompt (alpha) | thickness | slant | width |\n|---|---|---|---|")
    print(f"| none | {base['thickness'].nanmean():.4f} | {base['slant'].nanmean():+.4f} | "
          f"{base['width'].nanmean():.4f} |")
    for negative in NEGATIVES:
        apply_nasa(pipe, negative, alpha=args.alpha)
        m = measure()
        remove_nasa(pipe)
        print(f"| {negative} ({args.alpha:g}) | {m['thickness'].nanmean():.4f} | {m['slant'].nanmean():+.4f} | "
              f"{m['width'].nanmean():.4f} |")


if __name__ == "__main__":
    main()
