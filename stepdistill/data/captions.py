"""Captioned digits: scikit-learn's digits with captions built from their label and attributes measured from pixels.

Resolution: 32x32 pixels, bilinear from 8x8 (as :func:`~stepdistill.data.images.digits_tensors` does at 16). An
``AutoencoderKL`` with three down blocks downsamples 4x, so 32x32 pixels become 8x8 latents: small enough for a
CPU-sized UNet (which downsamples 8 -> 4 -> 2), large enough that a stroke (4-8 px wide at 32) survives the VAE.

Attributes (:func:`measure_attributes`) are ink-weighted sums over the ink ``p = clamp(((x + 1) / 2 - 0.3) / 0.4,
0, 1)``: paper below 0.3, full ink above 0.7, a ramp between. The ramp drops faint haze and low noise (which would
add ink everywhere) yet stays continuous (no ties at the bin edges); on the real digits blurred by a 3x3 box, the
words stay the same for 90% (thickness), 98% (slant) and 97% (width) of them (plain (x + 1) / 2: 50%, 99%, 94%).
Lengths are fractions of the side:

- thickness = 2 * sum(p) / TV(p) / H, TV = the anisotropic total variation of the zero-padded image. A binary
  bar w x L has ink w*L and TV 2(w + L), so this is w*L/(w + L) ~ w: its stroke width.
- slant = mu11 / mu02 with y pointing UP (central ink moments): the shear dx/dy, > 0 when the top leans right.
- width = sqrt(12 * mu20) / W: the width of a uniform block with the ink's horizontal variance. (Height is not
  used: the digits are scaled to fill their box; at 32x32, 99% have ink > 0.5 in their top and bottom rows.)

Words: thickness thin/regular/thick and slant left/upright/right at the digit's own tertiles, width narrow/wide at
its median, from all 1,797 digits at 32x32 (:func:`attribute_thresholds`, stored in :data:`THRESHOLDS`). Bins are
per digit because the attributes depend on the shape (two thirds of the 7s measure slant > 0.113, of the 6s
< -0.172), so a "left-leaning 7" leans left for a 7. Samples are graded with the asked digit's bins
(:func:`attribute_words`, :func:`prompt_matches`); :func:`parse_prompt` reads the asked words back from a caption.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import DataError, digits_tensors, to_uint8

RESOLUTION = 32
INK_RAMP = (0.3, 0.7)  # (x + 1) / 2 below the first is paper, above the second full ink
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = {"thickness": ("thin", "regular", "thick"), "slant": ("left", "upright", "right"), "width": ("narrow", "wide")}
#: per digit 0..9: the bin edges of each attribute (tertiles, or the median for width), from attribute_thresholds()
THRESHOLDS = {
    "thickness": ((0.116, 0.1373), (0.1786, 0.208), (0.1445, 0.1573), (0.128, 0.1514), (0.1423, 0.1572),
                  (0.1307, 0.1511), (0.131, 0.1625), (0.1423, 0.1565), (0.1389, 0.1648), (0.1257, 0.1511)),
    "slant": ((-0.054, -0.0045), (-0.0581, 0.0164), (-0.1619, -0.0805), (-0.104, -0.0382), (-0.0399, 0.0073),
              (-0.0678, 0.0144), (-0.2355, -0.1717), (0.1128, 0.1641), (-0.0426, 0.0334), (-0.1327, -0.0618)),
    "width": ((0.5675,), (0.4092,), (0.4884,), (0.4749,), (0.5206,), (0.4984,), (0.5426,), (0.4676,), (0.463,),
              (0.5281,)),
}
# How a word reads as an adjective (before the digit) and as a phrase (after it).
ADJECTIVES = {"thin": "thin", "regular": "medium", "thick": "thick", "left": "left-leaning", "upright": "upright",
              "right": "right-leaning", "narrow": "narrow", "wide": "wide"}
PHRASES = {"thin": "in thin strokes", "regular": "in medium strokes", "thick": "in bold strokes",
           "left": "leaning left", "upright": "standing upright", "right": "leaning right",
           "narrow": "drawn narrow", "wide": "drawn wide"}
# Fields: {num} numeral, {name} digit word; {t} {s} {w} adjectives, {T} {S} {W} phrases (thickness, slant, width).
TRAIN_TEMPLATES = (
    "a handwritten {num}", "the number {name}", "the digit {num}", "a {t} {name}", "a {s} {num}", "a {w} {name}",
    "a {t}, {s} {name}", "a {w}, {t} {num}", "the digit {num} written {T}", "a {name} {S}", "a {w} {num} {T}",
    "a handwritten {t} {num}, {S}", "a {w}, {s} {name} {T}", "the number {num} {S} and {W}",
    "a {name} written {T} and {S}",
)
HELD_OUT_TEMPLATES = (  # evaluation only; their words all occur in training captions (tested)
    "the handwritten digit {name}", "a {s}, {t} {num}", "the number {name} written {T}, {S}",
    "a {w} handwritten {name}", "a {num} {T}, {W} and {S}", "{name}, {t} and {s}",
)
#: (digit, thickness, slant) never named together in a training caption; asked for in evaluation
HELD_OUT_COMBINATIONS = frozenset({(0, "thin", "right"), (2, "thick", "left"), (4, "regular", "right"),
                                   (6, "regular", "upright"), (8, "thin", "left"), (9, "thick", "upright")})
_AN = re.compile(r"\ba (?=(?!one\b)[aeiou]|8\b)")  # "an upright", "an eight", "an 8"; but "a one"
_FIELDS = {"t": "thickness", "s": "slant", "w": "width", "T": "thickness", "S": "slant", "W": "width"}


def _ink(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, 1, H, W) as ink clamp(((x + 1) / 2 - 0.3) / 0.4, 0, 1), (N, H, W) float64; a clear
    error for anything else."""
    if not isinstance(images, torch.Tensor):
        raise DataError(f"images must be a torch.Tensor (N, 1, H, W) in [-1, 1], not {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 1 or min(images.shape[2:], default=0) < 2:
        raise DataError(f"images must be grayscale (N, 1, H, W) with H, W >= 2, not shape {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float64)[:, 0]
    if not torch.isfinite(x).all():
        raise DataError("images contain NaN or infinite values")
    if x.numel() and (x.min() < -1 - 1e-3 or x.max() > 1 + 1e-3):
        raise DataError(f"images must lie in [-1, 1], not [{x.min().item():.3g}, {x.max().item():.3g}]; map "
                        "[0, 1] images by x * 2 - 1")
    paper, full = INK_RAMP
    return (((x + 1) / 2 - paper) / (full - paper)).clamp(0, 1)


def measure_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: ``thickness``, ``slant`` and ``width`` (float64 tensors of shape (N,)), with the ink
    p = clamp(((x + 1) / 2 - 0.3) / 0.4, 0, 1) (:data:`INK_RAMP`):

    - thickness = 2 * sum(p) / TV(p) / H, TV(p) = sum |p[i+1, j] - p[i, j]| + |p[i, j+1] - p[i, j]| over the
      image padded by one zero pixel (a w x L bar gives w L / (w + L) ~ w, its stroke width, over H);
    - slant = mu11 / mu02, mu_ab = sum p (x - cx)^a (y - cy)^b / sum p, x to the right, y UP (> 0: leans right);
    - width = sqrt(12 * mu20) / W (the width of a uniform block of the same horizontal variance).

    A blank image (no ink) measures NaN, which no word matches.
    """
    p = _ink(images)
    _, h, w = p.shape
    mass = p.sum((1, 2))
    padded = F.pad(p, (1, 1, 1, 1))
    tv = ((padded[:, 1:] - padded[:, :-1]).abs().sum((1, 2)) + (padded[:, :, 1:] - padded[:, :, :-1]).abs().sum((1, 2)))
    ys = torch.arange(h - 1, -1, -1, dtype=torch.float64)[:, None].expand(h, w)  # row 0 is the top: y = h - 1
    xs = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    safe = mass.clamp_min(1e-12)
    dx = xs - ((p * xs).sum((1, 2)) / safe)[:, None, None]
    dy = ys - ((p * ys).sum((1, 2)) / safe)[:, None, None]
    mu11, mu02, mu20 = ((p * a * b).sum((1, 2)) / safe for a, b in ((dx, dy), (dy, dy), (dx, dx)))
    blank = mass < 1e-6
    nan = torch.full_like(mass, float("nan"))
    return {"thickness": torch.where(blank, nan, 2 * mass / tv.clamp_min(1e-12) / h),
            "slant": torch.where(blank | (mu02 <= 0), nan, mu11 / mu02.clamp_min(1e-12)),
            "width": torch.where(blank, nan, (12 * mu20).sqrt() / w)}


def attribute_thresholds(resolution: int = RESOLUTION) -> dict[str, tuple[tuple[float, ...], ...]]:
    """The bin edges of :data:`THRESHOLDS`, recomputed: per digit, the 1/3 and 2/3 quantiles of thickness and
    slant and the median of width over all 1,797 digits at ``resolution`` (rounded to 4 decimals)."""
    images, labels = digits_tensors(resolution, "all")
    measured = measure_attributes(images)
    out = {}
    for attr, words in WORDS.items():
        qs = torch.tensor([k / len(words) for k in range(1, len(words))], dtype=torch.float64)
        out[attr] = tuple(tuple(round(v, 4) for v in torch.quantile(measured[attr][labels == d], qs).tolist())
                          for d in range(10))
    return out


def attribute_words(images: torch.Tensor, digits) -> list[dict[str, str | None]]:
    """Each image's words (``{"thickness": "thin", "slant": "upright", "width": "wide"}``), binned with
    :data:`THRESHOLDS` of its digit (``digits``: one int per image, e.g. the asked digit); NaN gives None."""
    digits = [int(d) for d in digits]
    measured = measure_attributes(images)
    if len(digits) != len(images) or any(not 0 <= d <= 9 for d in digits):
        raise DataError(f"need one digit in 0..9 per image: {len(images)} images, digits {digits[:10]}")
    out = []
    for i, d in enumerate(digits):
        words = {}
        for attr, names in WORDS.items():
            v = measured[attr][i].item()
            words[attr] = None if v != v else names[sum(v > edge for edge in THRESHOLDS[attr][d])]
        out.append(words)
    return out


def prompt_matches(asked_digit: int, asked: dict, digit: int, measured: dict) -> bool:
    """Whether a sample matches its prompt: its classified ``digit`` is the ``asked_digit`` and each attribute the
    prompt names (``asked``: attribute -> word) has that word in ``measured`` (:func:`attribute_words`, binned
    with the asked digit's thresholds). Attributes the prompt does not name are not checked."""
    unknown = {a: w for a, w in asked.items() if a not in WORDS or w not in WORDS[a]}
    if unknown:
        raise DataError(f"unknown attribute words {unknown}; attributes and words are {WORDS}")
    return int(digit) == int(asked_digit) and all(measured.get(a) == w for a, w in asked.items())


def parse_prompt(prompt: str) -> tuple[int, dict[str, str]]:
    """The digit and attribute words (attribute -> word) a caption asks for, read back from its text: the one
    digit it names (numeral or word) and each attribute phrase (:data:`PHRASES`) or adjective (:data:`ADJECTIVES`)
    in it, so that any prompt in this vocabulary can be graded. Raises :class:`DataError` for no digit, two
    digits, or two words of one attribute."""
    text = f" {prompt.lower()} "
    asked: dict[str, str] = {}
    for table in (PHRASES, ADJECTIVES):  # phrases first: "in thin strokes" holds the adjective "thin"
        for word, said in table.items():
            pattern = re.compile(rf"(?<![\w-]){re.escape(said)}(?![\w-])")
            if pattern.search(text):
                attr = next(a for a, names in WORDS.items() if word in names)
                if asked.get(attr, word) != word:
                    raise DataError(f"prompt {prompt!r} asks for both {asked[attr]!r} and {word!r} {attr}")
                asked[attr] = word
                text = pattern.sub(" ", text)
    digits = {d for d in range(10) if re.search(rf"(?<![\w-])({d}|{DIGIT_NAMES[d]})(?![\w-])", text)}
    if len(digits) != 1:
        raise DataError(f"prompt {prompt!r} must name exactly one digit (0-9 or zero-nine), not {sorted(digits)}")
    return digits.pop(), dict(sorted(asked.items()))


def template_attributes(template: str) -> frozenset[str]:
    """The attributes a template names (from its fields)."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    bad = fields - set(_FIELDS) - {"num", "name"}
    if bad:
        raise DataError(f"template {template!r} has unknown fields {sorted(bad)}")
    return frozenset(_FIELDS[f] for f in fields if f in _FIELDS)


def render(template: str, digit: int, words: dict) -> tuple[str, dict[str, str]]:
    """The caption ``template`` gives digit ``digit`` with attribute ``words`` ("a" before a vowel sound becomes
    "an"), and the attributes it names (attribute -> word)."""
    named = template_attributes(template)
    values = {"num": str(digit), "name": DIGIT_NAMES[digit]}
    for f, attr in _FIELDS.items():
        if attr in named:
            values[f] = (ADJECTIVES if f.islower() else PHRASES)[words[attr]]
    text = _AN.sub("an ", template.format(**values))
    return text, {a: words[a] for a in sorted(named)}


@dataclass
class CaptionRecord:
    """One captioned digit: ``image`` (1, 32, 32) in [-1, 1]; ``words`` all its measured words; ``asked`` those
    the ``prompt`` names; ``held_out_combination`` when its (digit, thickness, slant) is held out."""

    image: torch.Tensor = field(repr=False)
    label: int
    words: dict
    asked: dict
    prompt: str
    template: str
    held_out_combination: bool = False


def captioned_digits(split: str = "train", seed: int = 0, copies: int = 1) -> list[CaptionRecord]:
    """The captioned digits of ``split``: ``train`` (the digits' 80% train split, :data:`TRAIN_TEMPLATES`) or
    ``eval`` (their 20% test split, :data:`HELD_OUT_TEMPLATES`), ``copies`` captions per image.

    Templates are drawn uniformly with ``seed``. In ``train``, a digit whose (digit, thickness, slant) is in
    :data:`HELD_OUT_COMBINATIONS` only gets templates that do not name both thickness and slant; in ``eval`` it
    only gets templates that do, so that those prompts test combinations never seen in training.
    """
    if split not in ("train", "eval"):
        raise DataError(f"captioned digits split must be 'train' or 'eval', not {split!r}")
    if copies < 1:
        raise DataError(f"copies must be at least 1, not {copies}")
    images, labels = digits_tensors(RESOLUTION, "train" if split == "train" else "test")
    all_words = attribute_words(images, labels.tolist())
    templates = TRAIN_TEMPLATES if split == "train" else HELD_OUT_TEMPLATES
    both = [t for t in templates if {"thickness", "slant"} <= template_attributes(t)]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records = []
    for _ in range(copies):
        for image, label, words in zip(images, labels.tolist(), all_words):
            held = (label, words["thickness"], words["slant"]) in HELD_OUT_COMBINATIONS
            choices = templates if not held else (both if split == "eval" else
                                                  [t for t in templates if t not in both])
            template = choices[int(rng.integers(len(choices)))]
            prompt, asked = render(template, label, words)
            records.append(CaptionRecord(image, label, words, asked, prompt, template, held))
    return records


def write_prompt_file(path: str | Path, split: str = "train", seed: int = 0, copies: int = 1) -> Path:
    """Write :func:`captioned_digits` as a ``.jsonl`` prompt file that :func:`~stepdistill.data.read_prompts` (and
    ``data.dataset=prompts``) reads, with the images as 32x32 grayscale PNGs in ``<stem>-images/`` beside it.

    Each line: ``{"prompt", "image" (relative path), "digit", "asked", "words", "held_out_combination"}``.
    """
    from PIL import Image

    path = Path(path).expanduser()
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"the prompt file must end in .jsonl (it names images), not {path.name!r}")
    records = captioned_digits(split, seed, copies)
    folder = path.parent / f"{path.stem}-images"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(torch.stack([r.image for r in records]))[:, 0].numpy()
    lines = []
    for i, (r, array) in enumerate(zip(records, pixels)):
        name = f"{i:05d}.png"
        Image.fromarray(array).save(folder / name)
        lines.append(json.dumps({"prompt": r.prompt, "image": f"{folder.name}/{name}", "digit": r.label,
                                 "asked": r.asked, "words": r.words,
                                 "held_out_combination": r.held_out_combination}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


SPEC = "digits-captions:"


def parse_spec(spec: str) -> tuple[str, int]:
    """(split, copies) of a captioned-digits spec ``digits-captions:SPLIT[:COPIES]``: ``digits-captions:eval`` the
    held-out phrasings of the test split, ``digits-captions:train`` the training phrasings of the train split,
    ``digits-captions:train:8`` each train digit captioned 8 times (phrasings drawn with seed 0)."""
    parts = spec[len(SPEC):].split(":") if str(spec).startswith(SPEC) else []
    try:
        split, copies = parts[0], int(parts[1]) if len(parts) > 1 else 1
        if len(parts) > 2 or split not in ("train", "eval") or copies < 1:
            raise ValueError
    except (IndexError, ValueError):
        raise DataError(f"{spec!r} is not a captioned-digits spec: use digits-captions:eval, digits-captions:train "
                        "or digits-captions:train:COPIES (COPIES >= 1 captions per digit)") from None
    return split, copies


def spec_prompt_file(spec: str, folder: str | Path) -> Path:
    """The prompt file (with images) a :func:`parse_spec` spec names, written once into ``folder`` by
    :func:`write_prompt_file` and reused (its content is fixed by the spec)."""
    split, copies = parse_spec(spec)
    path = Path(folder).expanduser() / f"digits-captions-{split}-{copies}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_prompt_file(path, split, seed=0, copies=copies)
    return path
