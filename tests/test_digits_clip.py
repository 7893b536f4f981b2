"""The shipped ``digits-clip`` (``scripts/train_digits_clip.py``): a tiny open_clip folder that ``load_clip`` reads
offline, whose CLIP score separates matching from shuffled captions on the held-out captioned digits, and whose
figures are those its ``training.json`` records (re-measured here on the eval split through the public API)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from stepdistill.data.captions import DIGIT_NAMES, captioned_digits, render
from stepdistill.metrics import clip_score as clip_module
from stepdistill.metrics.clip_score import DIGITS_CLIP, clip_score, clip_scores, load_clip, preprocess
from stepdistill.metrics.features import FeatureError

RECORD = json.loads((DIGITS_CLIP / "training.json").read_text())
FIGURES = RECORD["figures"]
TOLERANCE = 2 / 359  # two images of the eval split: other CPUs and torch builds may round a near tie differently


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(1)
    return load_clip("digits-clip")


@pytest.fixture(scope="module")
def eval_split():
    """The eval split's images in [0, 1], labels and (held-out phrasing) captions, as the training script reads
    them."""
    records = captioned_digits("eval", seed=0)
    images = (torch.stack([r.image for r in records]) + 1) / 2
    return records, images, torch.tensor([r.label for r in records]), [r.prompt for r in records]


def cosines(clip, images, prompts) -> torch.Tensor:
    """(images, prompts) cosine similarities through the model, preprocessed as CLIP score does."""
    with torch.no_grad():
        img = clip.model.encode_image(preprocess(images, clip.image_size, clip.mean, clip.std))
        txt = clip.model.encode_text(clip.tokenizer(prompts))
    return F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


def test_digits_clip_names_the_shipped_local_dir_folder(clip):
    assert (DIGITS_CLIP / "open_clip_config.json").is_file() and (DIGITS_CLIP / "README.md").is_file()
    weights = DIGITS_CLIP / "open_clip_model.safetensors"
    assert clip.weights == str(weights) and clip.weights_sha256 == RECORD["weights_sha256"]
    assert round(weights.stat().st_size / 1e6, 2) == RECORD["weights_megabytes"] < 10
    assert clip.protocol(100.0)["backbone"] == "digits-clip"  # not a machine-specific path
    assert (clip.image_size, clip.mean, clip.std) == (32, (0.305,) * 3, (0.323,) * 3)
    assert next(clip.model.parameters()).dtype == torch.float32  # float16 file, float32 model
    assert sum(p.numel() for p in clip.model.parameters()) == RECORD["parameters"]["total"]
    same = load_clip(f"local-dir:{DIGITS_CLIP}")
    assert same.weights_sha256 == clip.weights_sha256
    x, prompts = torch.rand(2, 1, 32, 32), ["a 3", "a thin seven"]
    torch.testing.assert_close(clip_scores(same, x, prompts), clip_scores(clip, x, prompts))


def test_matching_captions_score_well_above_shuffled_ones(clip, eval_split):
    _, images, _, prompts = eval_split
    match = clip_scores(clip, images, prompts)
    shuffled = clip_scores(clip, images, prompts[1:] + prompts[:1])  # each image with the next one's caption
    assert match.mean() > shuffled.mean() + 30 and (match > shuffled).float().mean() > 0.9
    assert abs(match.mean().item() - FIGURES["clip_score_matching"]) < 0.05
    assert abs(shuffled.mean().item() - FIGURES["clip_score_shuffled"]) < 0.05
    assert abs((match > shuffled).float().mean().item() - FIGURES["matching_above_shuffled"]) <= TOLERANCE
    result = clip_score(clip, images[:8], prompts[:8])
    assert result["protocol"]["weights_sha256"] == RECORD["weights_sha256"] and result["n"] == 8


def test_zero_shot_digit_accuracy_is_well_above_chance(clip, eval_split):
    _, images, labels, _ = eval_split
    for key, template in (("digit_accuracy", "a handwritten {num}"),
                          ("digit_accuracy_held_out_phrasing", "the handwritten digit {name}")):
        prompts = [template.format(num=d, name=DIGIT_NAMES[d]) for d in range(10)]
        accuracy = (cosines(clip, images, prompts).argmax(1) == labels).float().mean().item()
        assert accuracy > 0.9  # chance: 0.1
        assert abs(accuracy - FIGURES[key]) <= TOLERANCE


def test_thickness_zero_shot_is_a_clear_signal(clip, eval_split):
    """Among "a thin / medium / thick {name}" with the image's own digit, the highest CLIP score names the
    thickness measured from the image's pixels far more often than chance (1/3)."""
    records, images, labels, _ = eval_split
    names = ("thin", "regular", "thick")
    prompts = [render("a {t} {name}", d, {"thickness": w})[0] for d in range(10) for w in names]
    assert prompts[:3] == ["a thin zero", "a medium zero", "a thick zero"]
    sims = cosines(clip, images, prompts).view(len(images), 10, 3)[torch.arange(len(images)), labels]
    truth = torch.tensor([names.index(r.words["thickness"]) for r in records])
    accuracy = (sims.argmax(1) == truth).float().mean().item()
    assert accuracy > 0.6
    assert abs(accuracy - FIGURES["attribute_accuracy"]["thickness"]) <= TOLERANCE


def test_a_clip_folder_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "digits-clip"
    shutil.copytree(DIGITS_CLIP, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FeatureError, match=r"has no CLIP weights: it needs one of open_clip_model\.safetensors"):
        load_clip(f"local-dir:{folder}")
    monkeypatch.setattr(clip_module, "DIGITS_CLIP", folder)  # as if the package had been installed without them
    with pytest.raises(FeatureError, match=r"shipped digits-clip folder .* has no CLIP weights.*train_digits_clip"):
        load_clip("digits-clip")
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(FeatureError, match="is not an open_clip folder.*train_digits_clip"):
        load_clip("digits-clip")
    with pytest.raises(FeatureError, match="digits-clip"):
        load_clip("digits-clap")  # an unknown name lists the choices
