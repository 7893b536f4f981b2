"""Assemble the shipped text-to-image digits teacher, ``stepdistill/assets/digits-t2i``: a stock
``StableDiffusionPipeline`` folder.

    python scripts/ship_digits_t2i.py --base              # model_index.json for training (vae, text encoder, tokenizer)
    stepdistill train configs/teacher_digits_t2i.yaml       # trains the UNet against that folder
    python scripts/ship_digits_t2i.py --run runs/teacher_digits_t2i   # its export's unet/ + scheduler/ into the folder

The order of the whole stack: ``scripts/train_digits_vae.py``, ``scripts/train_digits_text_encoder.py``, ``--base``,
the teacher run, ``--run``. The folder then loads with ``StableDiffusionPipeline.from_pretrained(folder)`` in a plain
Diffusers install (``safety_checker`` and ``feature_extractor`` are None, as ``requires_safety_checker`` is False).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "stepdistill" / "assets" / "digits-t2i"
INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_base(folder: Path) -> None:
    missing = [name for name in ("vae", "text_encoder", "tokenizer") if not (folder / name).is_dir()]
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)}: run scripts/train_digits_vae.py and "
                         "scripts/train_digits_text_encoder.py first")
    index = dict(INDEX)
    if (folder / "model_index.json").is_file():  # keep the versions a finished export wrote
        index = {**json.loads((folder / "model_index.json").read_text()), **{k: v for k, v in INDEX.items()
                                                                           if k.startswith("_class")}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def ship_run(run: Path, folder: Path) -> None:
    from stepdistill.runs import export_run

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_run(run, Path(tmp) / "pipeline", overwrite=True)
        for name in ("unet", "scheduler"):
            shutil.rmtree(folder / name, ignore_errors=True)
            shutil.copytree(exported / name, folder / name)
        index = json.loads((exported / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in ("stepdistill.json",):
            if (exported / name).is_file():
                shutil.copy2(exported / name, folder / name)
    print(f"shipped {run} into {folder}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", action="store_true", help="write model_index.json around vae/, text_encoder/, tokenizer/")
    p.add_argument("--run", default=None, help="a finished teacher run of configs/teacher_digits_t2i.yaml")
    p.add_argument("--folder", default=str(ASSET))
    args = p.parse_args()
    folder = Path(args.folder)
    if args.base:
        write_base(folder)
    if args.run:
        ship_run(Path(args.run), folder)
    if not (args.base or args.run):
        p.error("give --base and/or --run RUN")


if __name__ == "__main__":
    main()
