"""CLIP score through open_clip with a tiny random model built from tests/assets/tiny_clip.json (no download)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stepdistill.data import digits_tensors
from stepdistill.metrics.clip_score import clip_score, clip_scores, load_clip, preprocess
from stepdistill.metrics.features import FeatureError

TINY_CLIP = Path(__file__).parent / "assets" / "tiny_clip.json"
NAMES = ("zero", "one")


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return load_clip(str(TINY_CLIP), allow_random=True)


def zeros_and_ones():
    x, y = digits_tensors(16, "train")
    keep = y < 2
    return (x[keep] + 1) / 2, y[keep]


def test_random_tiny_clip_is_deterministic_and_in_range():
    images, labels = zeros_and_ones()
    prompts = [f"a digit {NAMES[int(c)]}" for c in labels[:24]]
    first = clip_scores(tiny_clip(), images[:24], prompts)
    second = clip_scores(tiny_clip(), images[:24], prompts, batch_size=5)  # a fresh model, other batches
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)
    assert ((first >= 0) & (first <= 100)).all()
    result = clip_score(tiny_clip(), images[:24], prompts, scale=1.0)
    assert 0 <= result["clip_score"] <= 1 and result["n"] == 24
    assert result["protocol"]["backbone"] == str(TINY_CLIP) and result["protocol"]["scale"] == 1.0


def test_clip_score_ranks_the_matching_prompt_first_after_a_few_steps(tmp_path):
    """Train the tiny model's image tower for a few steps against frozen prompt embeddings, then save it as an
    open_clip folder and load it back with local-dir: the matching prompt must score higher."""
    from safetensors.torch import save_file

    clip = tiny_clip()
    images, labels = zeros_and_ones()
    model = clip.model
    with torch.no_grad():
        text = F.normalize(model.encode_text(clip.tokenizer([f"a digit {n}" for n in NAMES])), dim=-1)
    model.visual.requires_grad_(True)
    opt = torch.optim.Adam(model.visual.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    train = torch.arange(200)
    for _ in range(25):
        idx = train[torch.randperm(len(train), generator=g)[:32]]
        img = F.normalize(model.encode_image(preprocess(images[idx], clip.image_size, clip.mean, clip.std)), dim=-1)
        loss = F.cross_entropy(10 * img @ text.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False).eval()

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": json.loads(TINY_CLIP.read_text()),
        "preprocess_cfg": {"mean": list(clip.mean), "std": list(clip.std)}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    loaded = load_clip(f"local-dir:{folder}")
    assert loaded.weights_sha256 and loaded.weights.endswith("open_clip_model.safetensors")

    held_out, truth = images[200:280], labels[200:280]
    match = clip_scores(loaded, held_out, [f"a digit {NAMES[int(c)]}" for c in truth])
    mismatch = clip_scores(loaded, held_out, [f"a digit {NAMES[1 - int(c)]}" for c in truth])
    assert match.mean() > mismatch.mean() + 1
    assert (match > mismatch).float().mean() > 0.8
    torch.testing.assert_close(match, clip_scores(clip, held_out, [f"a digit {NAMES[int(c)]}" for c in truth]))


def test_clip_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureError, match="needs trained weights"):
        load_clip(str(TINY_CLIP))
    with pytest.raises(FeatureError, match="does not exist"):
        load_clip(str(TINY_CLIP), weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(TINY_CLIP.read_text())}))
    with pytest.raises(FeatureError, match="no CLIP weights"):
        load_clip(f"local-dir:{tmp_path}")
    with pytest.raises(FeatureError, match="one prompt per image"):
        clip_scores(tiny_clip(), torch.rand(3, 1, 16, 16), ["a"])
