"""Text-to-image evaluation: the prompts (:class:`EvalPrompts`), their checks against the pipeline's and CLIP's
tokenizers, prompt accuracy on the captioned digits' vocabulary (:class:`DigitsJudge`), and the CLIP model.

Prompts: ``--prompts`` is a ``.txt`` file (one prompt per line, blank lines skipped), a ``.jsonl`` file (a
``prompt`` per line; an empty prompt is an error) or a named set, ``digits-captions:eval`` (the default for text
pipelines: the held-out phrasings of the digits' test split, one prompt per test digit, 359 prompts). Sample ``i``
gets prompt ``i % P`` (:mod:`.samplers`).

Prompt accuracy (only when every prompt parses, :func:`~stepdistill.data.captions.parse_prompt`). Sample ``i`` with
prompt ``p_i`` asks for digit ``d_i`` and words ``A_i`` (attribute -> word); ``c_i`` is the digit the shipped
digits CNN (``stepdistill/assets/digits-features``, the FID extractor) classifies it as (argmax of its logits on the
image averaged to gray, quantised to uint8 and resized to 16x16, as for FID), and ``w_i`` its measured words
(:func:`~stepdistill.data.captions.attribute_words` of the gray image resized to 32x32, the captions' resolution,
binned with the ASKED digit ``d_i``'s thresholds)::

    digit_accuracy        = mean_i [c_i = d_i]
    prompt_accuracy       = mean_i [c_i = d_i  and  w_i[a] = A_i[a] for every a in A_i]     (prompt_matches)
    attribute_accuracy[a] = mean over the i whose prompt names a of [w_i[a] = A_i[a]]       (digit not checked)
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import file_sha256
from ..data import DataError, attribute_words, parse_prompt, read_prompts
from ..data.captions import RESOLUTION as CAPTION_RESOLUTION, WORDS
from ..data.prompts import is_prompt_set
from .clip_score import load_clip
from .features import (DIGITS_CONFIG, DIGITS_FEATURES_DIR, DIGITS_WEIGHTS, FeatureError, load_digits_cnn,
                       uint8_to_unit)

DEFAULT_PROMPTS = "digits-captions:eval"
DEFAULT_CLIP = "digits-clip"  # the shipped open_clip (stepdistill.metrics.clip_score)
ASSIGNMENT = "sample i gets prompt i % P"


# --------------------------------------------------------------------------------------------------------------
# Prompts and their tokenizer checks
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalPrompts:
    """The prompts of an evaluation, with where each came from (for error messages) and what identifies them."""

    spec: str  # what the user gave: a file path or a named set
    prompts: tuple[str, ...]
    lines: tuple[int, ...]  # a file's line numbers; a named set's 1-based indices
    path: str | None = None  # the resolved file (None for a named set)
    file_sha256: str | None = None

    def where(self, i: int) -> str:
        if self.path is None:
            return f"{self.spec}, prompt {self.lines[i]}"
        return f"{self.path}, line {self.lines[i]}"

    @property
    def sha256(self) -> str:
        """sha256 of the prompts joined by newlines (UTF-8): the same prompts give the same hash from any file."""
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()

    def identity(self) -> dict:
        """What names these prompts in a protocol (``path`` differs between machines and is not compared)."""
        named = self.path is None
        return {"spec": self.spec if named else None, "path": self.path, "file_sha256": self.file_sha256,
                "count": len(self.prompts), "prompts_sha256": self.sha256}


def load_eval_prompts(spec: str) -> EvalPrompts:
    """Read ``spec`` (a ``.txt``/``.jsonl`` file or a named set, see the module docstring): empty ``.jsonl`` prompts
    are errors naming their line."""
    records = read_prompts(spec, allow_empty=False)
    path = None if is_prompt_set(spec) else Path(spec).expanduser().resolve()
    return EvalPrompts(str(spec), tuple(r.prompt for r in records), tuple(r.line for r in records),
                       None if path is None else str(path), None if path is None else file_sha256(path))


def as_eval_prompts(prompts) -> EvalPrompts:
    """An :class:`EvalPrompts` from itself or from a list of strings (an API caller's prompts)."""
    if isinstance(prompts, EvalPrompts):
        return prompts
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if not prompts or bad:
        raise DataError(f"prompts must be non-empty strings; prompt {bad[0] + 1 if bad else 1} is "
                        f"{prompts[bad[0]] if bad else None!r}")
    return EvalPrompts("<list>", tuple(prompts), tuple(range(1, len(prompts) + 1)))


def _limit(pipe, name: str, tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit <= 0 or limit > 100_000:  # "no limit" is 1e30 in transformers
        return None
    if name == "tokenizer_3":  # T5 in SD3: the call cuts at max_sequence_length (256), not model_max_length
        param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
        if param is not None and isinstance(param.default, int):
            limit = min(limit, param.default)
    return limit


def check_prompt_lengths(pipe, prompts: EvalPrompts, pipeline_name: str = "the pipeline") -> None:
    """Raise :class:`DataError` for a prompt longer than one of the pipeline's tokenizers takes
    (``model_max_length`` tokens, start and end tokens included), which the pipeline would silently truncate."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        limit = _limit(pipe, name, tokenizer) if tokenizer is not None else None
        if limit is None:
            continue
        ids = tokenizer(list(prompts.prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        long = [(i, len(t)) for i, t in enumerate(ids) if len(t) > limit]
        if long:
            shown = "; ".join(f"{prompts.where(i)}: {prompts.prompts[i]!r} is {n} tokens" for i, n in long[:3])
            more = f" (and {len(long) - 3} more)" if len(long) > 3 else ""
            raise DataError(f"{len(long)} prompt(s) are longer than {pipeline_name}'s {name} takes ({limit} tokens, "
                            f"its model_max_length, start and end tokens included), so they would be silently cut: "
                            f"{shown}{more}. Shorten them or remove them from the prompts")


def check_clip_prompts(clip, prompts: EvalPrompts) -> None:
    """Raise :class:`DataError` for a prompt longer than the CLIP text tower's context (open_clip would cut it)."""
    tokenizer = clip.tokenizer
    context = getattr(tokenizer, "context_length", None)
    if not context or not hasattr(tokenizer, "encode"):
        return
    long = [(i, len(tokenizer.encode(p)) + 2) for i, p in enumerate(prompts.prompts)]
    long = [(i, n) for i, n in long if n > context]
    if long:
        shown = "; ".join(f"{prompts.where(i)}: {prompts.prompts[i]!r} is {n} tokens" for i, n in long[:3])
        raise DataError(f"{len(long)} prompt(s) are longer than the CLIP model {clip.name} reads ({context} tokens, "
                        f"start and end included), so their CLIP score would score a cut prompt: {shown}. Shorten "
                        "them, or pass --clip none")


# --------------------------------------------------------------------------------------------------------------
# Grading samples against their prompts with the digits CNN and the captions' attributes
# --------------------------------------------------------------------------------------------------------------

def parse_all(prompts: EvalPrompts) -> tuple[list | None, str | None]:
    """``([(digit, asked words), ...], None)`` when every prompt parses, else ``(None, note)``."""
    parsed = []
    for i, prompt in enumerate(prompts.prompts):
        try:
            parsed.append(parse_prompt(prompt))
        except DataError as exc:
            return None, (f"not computed: prompt accuracy needs every prompt in the captioned digits' vocabulary "
                          f"(stepdistill.data.captions.parse_prompt); {prompts.where(i)}: {exc}")
    return parsed, None


class DigitsJudge:
    """The shipped digits CNN as a judge: its class prediction and its ``fc`` features (times the config's
    ``feature_scale``, exactly the FID/KID features of ``--features digits``) of images in [0, 1]."""

    def __init__(self, folder: str | Path | None = None):
        folder = Path(folder) if folder is not None else DIGITS_FEATURES_DIR
        self.net, self.config = load_digits_cnn(folder)
        self.net.requires_grad_(False)
        self.fc_scale = float(self.config.get("feature_scale", {}).get("fc", 1.0))
        self.weights_sha256 = file_sha256(folder / DIGITS_WEIGHTS)
        self.config_sha256 = file_sha256(folder / DIGITS_CONFIG)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc features (B, 128) float32, predicted digits (B,)) of float images in [0, 1], (B, C, H, W)."""
        x = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)  # as FID quantises
        x = uint8_to_unit(x, self.config["channels"], self.config["resolution"])
        with torch.no_grad():
            out = self.net.features(x)
        return out["fc"].float() * self.fc_scale, out["logits"].argmax(1)

    def protocol(self) -> dict:
        return {"network": "stepdistill/assets/digits-features (DigitsCNN, the --features digits extractor)",
                "weights_sha256": self.weights_sha256, "config_sha256": self.config_sha256,
                "input": f"gray (mean of RGB), uint8-quantised, bilinear to {self.config['resolution']}x"
                         f"{self.config['resolution']}"}


def caption_images(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (B, C, H, W) -> gray (B, 1, 32, 32) in [-1, 1], the captions' resolution
    (bilinear, antialiased when shrinking)."""
    x = images.detach().float().cpu().clamp(0, 1).mean(1, keepdim=True)
    if x.shape[-2:] != (CAPTION_RESOLUTION, CAPTION_RESOLUTION):
        x = F.interpolate(x, size=(CAPTION_RESOLUTION, CAPTION_RESOLUTION), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > CAPTION_RESOLUTION).clamp(0, 1)
    return x * 2 - 1


def grade(images: torch.Tensor, asked: list[tuple[int, dict]], predicted: torch.Tensor) -> list[dict]:
    """Per sample: ``{"digit": bool, "prompt": bool, attribute: bool for each attribute its prompt names}`` (see
    the module docstring); ``asked`` is each sample's ``parse_prompt`` result, ``predicted`` its classified digit."""
    measured = attribute_words(caption_images(images), [d for d, _ in asked])
    out = []
    for (digit, words), got, pred in zip(asked, measured, predicted.tolist()):
        attrs = {a: got.get(a) == w for a, w in words.items()}
        out.append({"digit": pred == digit, "prompt": pred == digit and all(attrs.values()), **attrs})
    return out


def summarize_grades(grades: list[dict]) -> dict:
    """``prompt_accuracy``, ``digit_accuracy`` and ``attribute_accuracy`` (attribute -> accuracy, over the
    samples whose prompt names it) of :func:`grade`'s results."""
    n = len(grades)
    per_attr = {a: [g[a] for g in grades if a in g] for a in WORDS}
    return {"prompt_accuracy": sum(g["prompt"] for g in grades) / n,
            "digit_accuracy": sum(g["digit"] for g in grades) / n,
            "attribute_accuracy": {a: sum(v) / len(v) for a, v in per_attr.items() if v}}


def prompt_accuracy_protocol(judge: DigitsJudge) -> dict:
    return {"computed": True,
            "definition": "prompt_accuracy = mean_i [c_i = d_i and w_i[a] = A_i[a] for every attribute a the prompt "
                          "names]; digit_accuracy = mean_i [c_i = d_i]; attribute_accuracy[a] = mean over samples "
                          "whose prompt names a of [w_i[a] = A_i[a]] (digit not checked)",
            "asked": "(d_i, A_i) = stepdistill.data.captions.parse_prompt(prompt_i)",
            "classifier": judge.protocol(),
            "attributes": f"stepdistill.data.captions.attribute_words of the gray sample bilinear to "
                          f"{CAPTION_RESOLUTION}x{CAPTION_RESOLUTION} in [-1, 1], binned with the ASKED digit's "
                          "THRESHOLDS"}


# --------------------------------------------------------------------------------------------------------------
# The CLIP model
# --------------------------------------------------------------------------------------------------------------

def resolve_clip(spec: str | None, weights: str | None = None, device: str = "cpu"):
    """The :class:`~stepdistill.metrics.clip_score.ClipModel` of ``--clip SPEC [--clip-weights FILE]``, or None
    for ``none``: ``digits-clip`` (shipped), ``local-dir:DIR``, or an open_clip architecture (name or config .json)
    with a weights file."""
    if spec is None or spec.lower() == "none":
        if weights:
            raise DataError("--clip-weights FILE needs --clip ARCH (the open_clip architecture of those weights)")
        return None
    if spec.startswith("local-dir:") and weights:
        raise DataError("--clip local-dir:DIR reads the weights in DIR: drop --clip-weights")
    try:
        return load_clip(spec, weights, device)
    except FeatureError as exc:
        if spec != DEFAULT_CLIP:
            raise
        raise DataError(f"the shipped CLIP model {DEFAULT_CLIP!r} cannot be loaded ({exc}); pass another one "
                        "(--clip local-dir:DIR, or --clip ARCH --clip-weights FILE) or skip CLIP score with "
                        "--clip none") from exc


def clip_protocol(clip, scale: float) -> dict:
    """``ClipModel.protocol`` with its file paths under keys that the reuse comparison ignores (the weights are
    named by their sha256, an open_clip folder by its config's sha256)."""
    p = dict(clip.protocol(scale))
    if p.get("weights_sha256"):
        p["weights_path"] = p.pop("weights")
    if str(p.get("backbone", "")).startswith("local-dir:"):
        folder = Path(p["backbone"][len("local-dir:"):])
        p["backbone"], p["folder"] = "local-dir", str(folder)
        config = folder / "open_clip_config.json"
        p["config_sha256"] = file_sha256(config) if config.is_file() else None
    return json.loads(json.dumps(p))
