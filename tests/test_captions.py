"""Captioned digits: the attribute formulas on constructed images, the per-digit bins on the real digits, the
train / held-out templates and combinations, and the prompt file the ``prompts`` data set reads."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from stepdistill.data import DataError, load_image, read_prompts
from stepdistill.data.captions import (DIGIT_NAMES, HELD_OUT_COMBINATIONS, HELD_OUT_TEMPLATES, THRESHOLDS,
                                       TRAIN_TEMPLATES, WORDS, attribute_thresholds, attribute_words,
                                       captioned_digits, measure_attributes, parse_prompt, prompt_matches,
                                       render, template_attributes, write_prompt_file)

H = 32


def canvas(*boxes) -> torch.Tensor:
    """A (1, 1, H, H) image in [-1, 1]: background -1, ink 1 in each (row0, row1, col0, col1) box."""
    x = -torch.ones(1, 1, H, H)
    for r0, r1, c0, c1 in boxes:
        x[..., r0:r1, c0:c1] = 1
    return x


def sheared_bar(step: int) -> torch.Tensor:
    """A 3-px bar from row 4 to 27 that moves one column right every ``step`` rows going UP (step < 0: left)."""
    x = -torch.ones(1, 1, H, H)
    for r in range(4, 28):
        c = 14 + (27 - r) // abs(step) * (1 if step > 0 else -1)
        x[0, 0, r, c:c + 3] = 1
    return x


@pytest.fixture(scope="module")
def train():
    return captioned_digits("train")


@pytest.fixture(scope="module")
def evaluation():
    return captioned_digits("eval")


def test_thickness_is_the_stroke_width():
    thin, thick = canvas((6, 26, 14, 16)), canvas((6, 26, 12, 18))
    t = measure_attributes(torch.cat([thin, thick]))["thickness"]
    assert t[1] > 2 * t[0]
    # a w x L bar: ink w L, total variation 2 (w + L), thickness w L / (w + L) / H
    assert t[0].item() == pytest.approx(2 * 20 / (2 + 20) / H, rel=1e-6)
    assert t[1].item() == pytest.approx(6 * 20 / (6 + 20) / H, rel=1e-6)
    # blur keeps the ink mass and (for monotone edges) the total variation, so the thickness barely moves
    blurred = F.avg_pool2d(thick, 3, stride=1, padding=1, count_include_pad=False)
    assert measure_attributes(blurred)["thickness"].item() == pytest.approx(t[1].item(), rel=0.05)


def test_slant_sign_follows_the_shear():
    s = measure_attributes(torch.cat([sheared_bar(3), sheared_bar(-3), canvas((4, 28, 14, 17))]))["slant"]
    assert s[0] > 0.2 and s[1] < -0.2  # top leaning right is positive (y points up)
    assert s[0].item() == pytest.approx(-s[1].item(), rel=1e-6)
    assert s[2].item() == pytest.approx(0.0, abs=1e-9)
    assert s[0].item() == pytest.approx(1 / 3, rel=0.15)  # one column per three rows


def test_width_of_small_and_large_blobs():
    w = measure_attributes(torch.cat([canvas((10, 20, 12, 18)), canvas((4, 28, 6, 26))]))["width"]
    assert w[1] > 2 * w[0]
    assert w[1].item() == pytest.approx(math.sqrt(20 ** 2 - 1) / H, rel=1e-6)  # discrete uniform: var (n^2-1)/12


def test_measurements_are_deterministic_and_blank_images_match_nothing():
    x = torch.rand(5, 1, H, H) * 2 - 1
    a, b = measure_attributes(x), measure_attributes(x.clone())
    assert all(torch.equal(a[k], b[k]) for k in a)
    blank = -torch.ones(1, 1, H, H)
    assert all(math.isnan(v.item()) for v in measure_attributes(blank).values())
    words = attribute_words(blank, [3])[0]
    assert words == {"thickness": None, "slant": None, "width": None}
    assert not prompt_matches(3, {"slant": "left"}, 3, words)
    assert prompt_matches(3, {}, 3, words)  # nothing asked but the digit


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, H, H), "shape"), (torch.zeros(2, 3, H, H), "shape"), (torch.full((1, 1, H, H), 255.0), "[-1, 1]"),
    (torch.full((1, 1, H, H), float("nan")), "NaN"), ([[0.0]], "torch.Tensor")])
def test_bad_images_say_what_is_wrong(bad, message):
    with pytest.raises(DataError, match=re.escape(message)):
        measure_attributes(bad)


def test_thresholds_are_the_real_digits_quantiles_and_split_each_digit_evenly(train, evaluation):
    assert attribute_thresholds() == THRESHOLDS
    records = train + evaluation
    for digit in range(10):
        mine = [r.words for r in records if r.label == digit]
        for attr, names in WORDS.items():
            for name in names:
                share = sum(w[attr] == name for w in mine) / len(mine)
                assert abs(share - 1 / len(names)) < 0.03, (digit, attr, name, share)


def test_words_survive_blur_and_low_noise_on_the_real_digits(train):
    images, labels = torch.stack([r.image for r in train]), [r.label for r in train]
    torch.manual_seed(0)
    for changed, floor in [(F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False), (0.85, 0.95, 0.95)),
                           ((images + 0.05 * torch.randn_like(images)).clamp(-1, 1), (0.75, 0.95, 0.95))]:
        words = attribute_words(changed, labels)
        for attr, least in zip(WORDS, floor):
            assert sum(w[attr] == r.words[attr] for w, r in zip(words, train)) >= least * len(train), attr


def test_templates_and_their_renders_are_disjoint_and_held_out_words_are_known():
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    assert len(set(TRAIN_TEMPLATES)) == len(TRAIN_TEMPLATES)

    def renders(templates):
        out = set()
        for t, d, (th, sl, wi) in itertools.product(templates, range(10), itertools.product(*WORDS.values())):
            out.add(render(t, d, {"thickness": th, "slant": sl, "width": wi})[0])
        return out

    seen, held = renders(TRAIN_TEMPLATES), renders(HELD_OUT_TEMPLATES)
    assert not seen & held
    vocabulary = {w for p in seen for w in re.findall(r"[\w-]+", p)}
    assert {w for p in held for w in re.findall(r"[\w-]+", p)} <= vocabulary
    assert set(DIGIT_NAMES) <= vocabulary and set("0123456789") <= vocabulary
    # both splits can name each attribute and the thickness + slant pair the combinations need
    for templates in (TRAIN_TEMPLATES, HELD_OUT_TEMPLATES):
        named = [template_attributes(t) for t in templates]
        assert any(not n for n in named) and any({"thickness", "slant"} <= n for n in named)
        assert set().union(*named) == set(WORDS)
    assert render("a {s} {num}", 8, {"slant": "upright"})[0] == "an upright 8"
    assert render("a {t} {name}", 1, {"thickness": "thick"})[0] == "a thick one"


def test_held_out_combinations_are_never_captioned_in_training(train, evaluation):
    assert len(train) == 1438 and len(evaluation) == 359
    assert {t for r in train for t in [r.template]} <= set(TRAIN_TEMPLATES)
    assert {r.template for r in evaluation} <= set(HELD_OUT_TEMPLATES)
    for r in train:
        assert (r.label, r.asked.get("thickness"), r.asked.get("slant")) not in HELD_OUT_COMBINATIONS, r.prompt
        assert r.asked == {a: r.words[a] for a in r.asked}  # captions say what was measured
    asked = [(r.label, r.asked.get("thickness"), r.asked.get("slant")) for r in evaluation]
    for combo in HELD_OUT_COMBINATIONS:
        assert asked.count(combo) >= 4, combo  # each is asked of several real test digits
    # the images still train the teacher: each held-out combination occurs among the training digits
    assert {(r.label, r.words["thickness"], r.words["slant"]) for r in train} >= HELD_OUT_COMBINATIONS


def test_captions_are_deterministic_per_seed(train):
    again = captioned_digits("train", seed=0)
    assert [r.prompt for r in again] == [r.prompt for r in train]
    assert [r.prompt for r in captioned_digits("train", seed=1)] != [r.prompt for r in train]
    assert len(captioned_digits("eval", copies=2)) == 2 * 359
    with pytest.raises(DataError, match="'train' or 'eval'"):
        captioned_digits("test")


def test_prompt_matches_checks_the_digit_and_only_the_named_attributes():
    measured = {"thickness": "thick", "slant": "left", "width": "wide"}
    assert prompt_matches(7, {"thickness": "thick"}, 7, measured)
    assert prompt_matches(7, {"thickness": "thick", "slant": "left", "width": "wide"}, 7, measured)
    assert not prompt_matches(7, {"thickness": "thick"}, 1, measured)
    assert not prompt_matches(7, {"slant": "right"}, 7, measured)
    with pytest.raises(DataError, match="unknown attribute words"):
        prompt_matches(7, {"colour": "red"}, 7, measured)


def test_prompt_file_is_read_by_the_prompts_reader(tmp_path, evaluation):
    path = write_prompt_file(tmp_path / "eval.jsonl", "eval")
    records = read_prompts(path)
    assert [r.prompt for r in records] == [r.prompt for r in evaluation]
    assert all(r.image is not None and r.image.is_file() for r in records)
    images = torch.stack([load_image(r.image, 32, 1) for r in records])  # as the prompts data set reads them
    assert (images - torch.stack([r.image for r in evaluation])).abs().max() <= 1 / 127.5 + 1e-6
    # the PNGs measure as their captions say (up to 8-bit rounding at a bin edge)
    words = attribute_words(images, [r.label for r in evaluation])
    assert sum(w == r.words for w, r in zip(words, evaluation)) >= 0.97 * len(evaluation)
    with pytest.raises(DataError, match=".jsonl"):
        write_prompt_file(tmp_path / "eval.txt", "eval")


def test_every_caption_parses_back_to_its_digit_and_words():
    for t, d, (th, sl, wi) in itertools.product(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES, range(10),
                                                itertools.product(*WORDS.values())):
        prompt, asked = render(t, d, {"thickness": th, "slant": sl, "width": wi})
        assert parse_prompt(prompt) == (d, asked), prompt
    assert parse_prompt("A Thick, left-leaning SEVEN") == (7, {"slant": "left", "thickness": "thick"})
    for bad, message in [("a thin and thick 7", "both"), ("a cat", "exactly one digit"),
                         ("a 7 next to an 8", "exactly one digit")]:
        with pytest.raises(DataError, match=message):
            parse_prompt(bad)


def test_a_captions_spec_names_a_prompt_file_with_images_written_once(tmp_path):
    from stepdistill.data.captions import parse_spec, spec_prompt_file

    assert parse_spec("digits-captions:train:3") == ("train", 3) and parse_spec("digits-captions:eval") == ("eval", 1)
    for bad in ("digits-captions:test", "digits-captions:train:0", "digits-captions:train:x", "digits-captions:"):
        with pytest.raises(DataError, match="digits-captions:train:COPIES"):
            parse_spec(bad)
    path = spec_prompt_file("digits-captions:eval", tmp_path)
    records = read_prompts(path)
    assert len(records) == 359 and all(r.image is not None and r.image.is_file() for r in records)
    written = path.stat().st_mtime_ns
    assert spec_prompt_file("digits-captions:eval", tmp_path) == path and path.stat().st_mtime_ns == written
