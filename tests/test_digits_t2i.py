"""The shipped text-to-image digits teacher (``stepdistill/assets/digits-t2i``): a stock ``StableDiffusionPipeline``
folder that plain Diffusers loads without stepdistill, whose tokenizer holds every caption word as one token, and
whose samples draw the digit the prompt asks for (by the shipped digits classifier)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.data import captioned_digits
from stepdistill.metrics.features import load_digits_cnn, uint8_to_unit
from stepdistill.models import NAMED_MODELS

FOLDER = NAMED_MODELS["digits-t2i"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = [f"a handwritten {d}" for d in range(10)] + [f"the number {n}" for n in
                                                        ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                         "eight", "nine")]


def test_generates_the_asked_digits_with_plain_diffusers_in_a_fresh_process(tmp_path):
    out = tmp_path / "samples.safetensors"
    code = ("import sys\nsys.modules['stepdistill'] = None  # importing stepdistill would fail\n"
            "import torch\nfrom diffusers import StableDiffusionPipeline\nfrom safetensors.torch import save_file\n"
            "torch.set_num_threads(1)\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({str(FOLDER)!r})\n"
            "pipe.set_progress_bar_config(disable=True)\n"
            f"images = pipe({PROMPTS!r}, num_inference_steps=16, guidance_scale=3.0, output_type='pt',\n"
            "             generator=torch.Generator().manual_seed(0)).images\n"
            f"save_file({{'images': images.contiguous()}}, {str(out)!r})\n"
            "print(type(pipe).__name__, type(pipe.scheduler).__name__, tuple(images.shape))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[:2] == ["StableDiffusionPipeline", "DDIMScheduler"]
    images = load_file(str(out))["images"]
    assert images.shape == (len(PROMPTS), 1, 32, 32)
    classifier, _ = load_digits_cnn()
    with torch.no_grad():
        x = uint8_to_unit((images * 255).round().to(torch.uint8), 1, 16)
        predicted = classifier(x).argmax(1)
    asked = torch.arange(len(PROMPTS)) % 10
    accuracy = predicted.eq(asked).float().mean().item()
    assert accuracy >= 0.6, (accuracy, predicted.tolist())  # chance is 0.1


def test_the_tokenizer_keeps_every_caption_word_whole_and_fits_every_caption():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(FOLDER / "tokenizer")
    prompts = {r.prompt for r in captioned_digits("train")} | {r.prompt for r in captioned_digits("eval")}
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert len(ids) <= tokenizer.model_max_length, prompt
        assert tokenizer.unk_token_id not in ids[1:-1], prompt  # unk is the end-of-text token
        assert all(token.endswith("</w>") for token in tokenizer.tokenize(prompt)), prompt  # whole words only


def test_the_text_encoder_record_states_held_out_zero_shot_accuracies_above_chance():
    record = json.loads((FOLDER / "text_encoder" / "training.json").read_text())
    accuracy, chance = record["held_out_zero_shot_accuracy"], record["chance"]
    assert accuracy["digit"] >= 0.9
    assert all(accuracy[a] > chance[a] + 0.1 for a in ("thickness", "slant"))


@pytest.mark.parametrize("recipe", ["lcm_digits_t2i", "dmd2_digits_t2i"])
def test_the_digits_t2i_recipes_train_from_the_shipped_teacher_and_export_stock_pipelines(recipe, tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.runs import export_run
    from stepdistill.trainers import build_trainer, load_config

    run = load_config(CONFIGS / f"{recipe}.yaml", [f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                                   "train.batch_size=4", "train.progress=false", "train.log_every=1"])
    build_trainer(run).train()
    folder = export_run(tmp_path / "run", tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    assert not list(folder.glob("*.py"))  # a stock pipeline: no code in the folder
    pipe = DiffusionPipeline.from_pretrained(folder)
    expected = {"lcm_digits_t2i": "LatentConsistencyModelPipeline", "dmd2_digits_t2i": "StableDiffusionPipeline"}
    assert type(pipe).__name__ == index["_class_name"] == expected[recipe]
    pipe.set_progress_bar_config(disable=True)
    steps = run.objective.student_steps
    images = pipe(["a thick 7"], num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
