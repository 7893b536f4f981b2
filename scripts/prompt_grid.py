"""A grid of prompts and their samples from a text-to-image pipeline folder: one row per prompt (its text on the
left), one column per seed. The README's grids of the digits-t2i teacher and its quickstart student.

    python scripts/prompt_grid.py FOLDER OUT.png [--steps 32] [--guidance 3] [--seeds 8]

Prompts: the first held-out caption of each digit (``digits-captions:eval``), so every row asks for another digit
in phrasings and, for some, attribute combinations the teacher never saw in training.
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from stepdistill.data import captioned_digits


def held_out_prompts() -> list[str]:
    first = {}
    for record in captioned_digits("eval"):
        if len(record.asked) >= 2:  # prompts that ask for attributes too
            first.setdefault(record.label, record.prompt)
    return [first[d] for d in sorted(first)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--scale", type=int, default=3, help="pixels per sample pixel")
    args = p.parse_args()
    pipe = DiffusionPipeline.from_pretrained(args.folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts()
    rows = []
    for prompt in prompts:
        images = pipe([prompt] * args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=[torch.Generator().manual_seed(s) for s in range(args.seeds)], output_type="pt").images
        rows.append(images.mean(1))  # gray
    size = rows[0].shape[-1] * args.scale
    label_width = 7 * max(len(p) for p in prompts) + 8
    sheet = Image.new("L", (label_width + size * args.seeds, size * len(prompts)), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        draw.text((4, r * size + size // 2 - 6), prompt, fill=0)
        for c, image in enumerate(images):
            tile = Image.fromarray((image.clamp(0, 1) * 255).round().byte().numpy(), "L")
            sheet.paste(tile.resize((size, size), Image.NEAREST), (label_width + c * size, r * size))
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
