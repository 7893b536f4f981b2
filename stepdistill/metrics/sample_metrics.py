"""The per-sample metrics of a benchmark beside FID: CLIP score and prompt accuracy (text-to-image models,
:mod:`.text_alignment`) and diversity (every model, :mod:`.diversity`), streamed batch by batch with the samples.

Row keys (``results.json``): ``clip_score``, ``clip_score_std`` (the per-image CLIP score's mean and std);
``prompt_accuracy``, ``digit_accuracy``, ``attribute_accuracy`` ({attribute: accuracy}); ``diversity`` and
``diversity_real``. Each group has its protocol section of the same name (``clip_score``, ``prompt_accuracy``,
``diversity``), and ``prompts`` says which prompts were used.
"""
from __future__ import annotations

import torch

from . import diversity as div
from .clip_score import clip_scores
from .fid import reference_images
from .text_alignment import (ASSIGNMENT, DigitsJudge, clip_protocol, grade, parse_all, prompt_accuracy_protocol,
                             summarize_grades)

CLIP_KEYS = ("clip_score", "clip_score_std")
ACCURACY_KEYS = ("prompt_accuracy", "digit_accuracy", "attribute_accuracy")
DIVERSITY_KEYS = ("diversity", "diversity_real")
#: protocol section -> the row keys it describes
SECTIONS = {"clip_score": CLIP_KEYS, "prompt_accuracy": ACCURACY_KEYS, "diversity": DIVERSITY_KEYS}
ROW_KEYS = CLIP_KEYS + ACCURACY_KEYS + DIVERSITY_KEYS


def group_key(model, i: int):
    """The group of sample ``i`` (:mod:`.diversity`): its prompt, source image or class; 0 when unconditional."""
    if model.prompts:
        return i % len(model.prompts)
    if model.sources is not None:
        return i % len(model.sources)
    if model.num_classes:
        return i % model.num_classes
    return 0


class ExtraMetrics:
    """CLIP score, prompt accuracy and diversity for the models of one benchmark.

    ``clip``: a loaded :class:`~stepdistill.metrics.clip_score.ClipModel` (or None: no CLIP score), used for the
    models with prompts. ``reference``, ``resolution`` and ``channels``: the FID reference set, read the same way
    (:func:`~stepdistill.metrics.fid.reference_images`) for the real diversity."""

    def __init__(self, reference: str = "digits", resolution: int = 16, channels: int | None = None, clip=None,
                 clip_scale: float = 100.0, n: int = 2000, log=print):
        self.judge = DigitsJudge()
        self.clip, self.clip_scale = clip, clip_scale
        self.reference, self.resolution, self.channels, self.n, self.log = reference, resolution, channels, n, log
        self._real: dict | None = None
        self._models: dict[str, ModelMetrics] = {}

    def real_distances(self, pooled: bool = False) -> dict:
        """``R(c)`` per class of the reference set (features computed once), and with ``pooled`` also ``R("all")``
        over all of it (the reference of an unconditional model)."""
        if self._real is None:
            _, images, labels = reference_images(self.reference, self.resolution, self.channels)
            self._feats = torch.cat([self.judge(images[s:s + 500].float() / 255)[0]
                                     for s in range(0, len(images), 500)])
            self._real = div.class_distances(self._feats, labels) if labels is not None else {}
        if pooled and "all" not in self._real:
            self._real["all"] = div.mean_pairwise_distance(self._feats)
        return self._real

    def for_model(self, model) -> "ModelMetrics":
        if model.name not in self._models:
            self._models[model.name] = ModelMetrics(self, model)
        return self._models[model.name]

    def protocol(self, models) -> dict:
        """The protocol sections: ``diversity`` always; ``prompts``, ``prompt_accuracy`` and ``clip_score`` when a
        model has prompts."""
        out = {"diversity": div.protocol(self.judge.protocol(), self.reference)}
        text = [mm for mm in (self.for_model(m) for m in models) if mm.model.prompts]  # all set up (and logged) now
        if not text:
            return out
        first = text[0]
        counts = [len(v) for v in div.groups_of(group_key(first.model, i) for i in range(self.n)).values()]
        out["prompts"] = {**first.model.prompt_set.identity(), "assignment": ASSIGNMENT,
                          "samples_per_prompt": [min(counts), max(counts)],
                          "per_model": len({m.model.prompt_set.sha256 for m in text}) > 1}
        out["prompt_accuracy"] = (prompt_accuracy_protocol(self.judge) if first.parsed is not None
                                  else {"computed": False, "note": first.note})
        if self.clip is not None:
            out["clip_score"] = self.clip_section(models)
        return out

    def clip_section(self, models=()) -> dict | None:
        if self.clip is None:
            return None
        section = {**clip_protocol(self.clip, self.clip_scale), "prompts": "protocol.prompts (sample i: prompt i % P)",
                   "nfe": "each row's nfe"}
        guidance = {m.name: m.call_guidance for m in models if m.prompts}
        if guidance:
            section["cfg_scale"] = guidance
        return section


class ModelMetrics:
    """What one model's points are scored with: its groups, its parsed prompts, its real diversity."""

    def __init__(self, extra: ExtraMetrics, model):
        self.extra, self.model = extra, model
        self.parsed, self.note = parse_all(model.prompt_set) if model.prompts else (None, None)
        if model.prompts and self.parsed is None:
            extra.log(f"{model.name}: prompt accuracy {self.note}")
        keys = [group_key(model, i) for i in range(extra.n)]
        sizes = [len(v) for v in div.groups_of(keys).values()]
        if max(sizes) < 2:
            extra.log(f"{model.name}: no prompt, class or source gets 2 samples at N={extra.n}, so diversity is not "
                      f"measured; give --n >= {2 * len(sizes)}")
        elif min(sizes) < 2:
            extra.log(f"{model.name}: at N={extra.n}, {sum(s >= 2 for s in sizes)} of {len(sizes)} groups have 2+ "
                      f"samples; diversity uses those (--n {2 * len(sizes)} gives every group 2)")
        classes = {self.group_class(k) for k in set(keys)}
        self.real = (None if None in classes else
                     div.reference_diversity(keys, self.group_class, extra.real_distances("all" in classes)))

    def group_class(self, key):
        """The class of the real images a group is compared with (None: no reference)."""
        m = self.model
        if m.prompts:
            digits_reference = self.extra.reference.partition(":")[0] == "digits"
            return self.parsed[key][0] if self.parsed is not None and digits_reference else None
        if m.sources is not None:
            return None
        return key if m.num_classes else "all"

    def accumulator(self) -> "PointMetrics":
        return PointMetrics(self)


class PointMetrics:
    """Feed each generated batch (float [0, 1], before any resize) with :meth:`add`; :meth:`result` gives the row
    keys of :data:`ROW_KEYS` that apply to the model."""

    def __init__(self, mm: ModelMetrics):
        self.mm = mm
        self.features, self.keys, self.grades, self.clip = [], [], [], []

    def add(self, images: torch.Tensor, indices) -> None:
        indices = list(indices)
        mm, extra = self.mm, self.mm.extra
        feats, predicted = extra.judge(images)
        self.features.append(feats)
        self.keys.extend(group_key(mm.model, i) for i in indices)
        prompts = mm.model.prompts
        if mm.parsed is not None:
            self.grades.extend(grade(images, [mm.parsed[i % len(prompts)] for i in indices], predicted))
        if prompts and extra.clip is not None:
            batch = [prompts[i % len(prompts)] for i in indices]
            self.clip.append(clip_scores(extra.clip, images.float().clamp(0, 1), batch, extra.clip_scale))

    def result(self) -> dict:
        out = {}
        if self.clip:
            scores = torch.cat(self.clip)
            out.update(clip_score=float(scores.mean()),
                       clip_score_std=float(scores.std()) if len(scores) > 1 else 0.0)
        if self.grades:
            out.update(summarize_grades(self.grades))
        d = div.group_diversity(torch.cat(self.features), self.keys)
        if d["diversity"] is not None:
            out["diversity"] = d["diversity"]
            if self.mm.real is not None:
                out["diversity_real"] = self.mm.real
        out["diversity_groups"], out["diversity_group_sizes"] = d["groups"], d["group_sizes"]
        return out
