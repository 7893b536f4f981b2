"""Per-sample routing of a batch to K models by class label or by prompt keywords (multi-student models), as
pure functions, and the routed modules over Denoisers that the MSD trainer trains.

Used by the MSD trainer's routed students and by the exported :class:`~stepdistill.pipelines.MultiStudentUNet`,
so that training and the pipeline route identically. Plain torch: importing it loads no Diffusers pipeline.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import torch

from ..conditioning import Cond
from ..denoiser import Denoiser


# ------------------------------------------------------------------------------------------------ routing
def owners(labels: torch.Tensor, owner: list[int] | torch.Tensor) -> torch.Tensor:
    """``student(i) = owner[label_i]`` for each sample; a label outside the table is an error naming it."""
    table = torch.as_tensor(owner, dtype=torch.long, device=labels.device)
    labels = labels.long().reshape(-1)
    bad = (labels < 0) | (labels >= len(table))
    if bool(bad.any()):
        raise ValueError(f"class label(s) {sorted(set(labels[bad].tolist()))} have no student (the students own "
                         f"classes 0..{len(table) - 1}; a multi-student model samples without CFG's null class)")
    return table[labels]


def prompt_owner(prompt: str, keywords: list[list[str]], default: int | None = None) -> int:
    """The student of a prompt: the one whose keywords occur in it as whole words (case-insensitive; a keyword
    may be several words). No student's keywords: ``default`` (an error when None); several students': an error
    naming them (a prompt has exactly one student)."""
    text = " " + " ".join(re.findall(r"[a-z0-9]+", prompt.lower())) + " "
    hits = [k for k, words in enumerate(keywords)
            if any(f" {' '.join(re.findall(r'[a-z0-9]+', w.lower()))} " in text for w in words)]
    if len(hits) > 1:
        raise ValueError(f"prompt {prompt!r} matches the keywords of students {hits}; each prompt needs exactly one "
                         "student (make the keyword groups disjoint for it)")
    if hits:
        return hits[0]
    if default is None:
        raise ValueError(f"prompt {prompt!r} matches no student's keywords; add a keyword for it or set a default "
                         "student")
    return default


def prompt_owners(prompts: list[str], keywords: list[list[str]], default: int | None = None,
                  device=None) -> torch.Tensor:
    """:func:`prompt_owner` of every prompt, as a tensor of student indices."""
    return torch.tensor([prompt_owner(p, keywords, default) for p in prompts], dtype=torch.long, device=device)


def route(student_of: torch.Tensor, num_students: int) -> list[torch.Tensor]:
    """The sample indices each student gets: ``idx_k = {i : student_of[i] = k}`` (ascending; may be empty)."""
    return [torch.nonzero(student_of == k, as_tuple=False).flatten() for k in range(num_students)]


def merge(pieces: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """Put each student's outputs back at its samples' places: ``out[idx_k] = y_k``.

    Computed as ``cat(y)[argsort(cat(idx))]`` (a permutation, so gradients flow to every ``y_k``)."""
    index = torch.cat([idx for idx, _ in pieces])
    if index.numel() != n:
        raise ValueError(f"routing covered {index.numel()} of {n} samples")
    return torch.cat([y for _, y in pieces])[torch.argsort(index)]


def route_call(student_of: torch.Tensor, num_students: int, call: Callable[[int, torch.Tensor], object]):
    """Run ``call(k, idx_k)`` for every student with samples and merge the results in batch order.

    ``call`` returns a tensor, or a tuple of tensors (e.g. a prediction and bottleneck features), each with the
    routed samples as its first dimension; the result has the same structure for the whole batch."""
    n = student_of.shape[0]
    results = [(idx, call(k, idx)) for k, idx in enumerate(route(student_of, num_students)) if idx.numel()]
    if isinstance(results[0][1], tuple):
        width = len(results[0][1])
        return tuple(merge([(idx, out[j]) for idx, out in results], n) for j in range(width))
    return merge(results, n)


# ------------------------------------------------------------------------------------------------ routed modules
def student_of(cond: Cond | None, owner: list[int] | None) -> torch.Tensor:
    """Each sample's student: ``owner[label]`` for class-routed students (``owner`` given), else the indices the
    objective put in ``cond.extra["student"]`` from the prompts (:func:`prompt_owner`)."""
    if owner is not None:
        if cond is None or cond.class_labels is None:
            raise ValueError("multi-student models route by class label: the condition has no class_labels")
        return owners(cond.class_labels, owner)
    if cond is None or "student" not in cond.extra:
        raise ValueError("text multi-student models route by prompt: the condition has no extra['student']")
    return cond.extra["student"].long()


class RoutedDenoiser(torch.nn.Module):
    """K Denoisers behind one Denoiser call: sample i goes to ``members[student_of(cond)[i]]`` (see
    :func:`route_call`); predictions and features come back in batch order."""

    def __init__(self, members: list[Denoiser], owner: list[int] | None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.owner = None if owner is None else [int(o) for o in owner]
        self.schedule = members[0].schedule
        self.prediction_type = members[0].prediction_type
        self.null_class = members[0].null_class

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None, *, output: str = "sample",
                guidance_scale=None, return_features: bool = False):
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        s = guidance_scale

        def call(k, idx):
            sk = s[idx] if torch.is_tensor(s) and s.ndim > 0 else s
            return self.members[k](x_t[idx], t[idx], cond[idx], output=output, guidance_scale=sk,
                                   return_features=return_features)

        return route_call(student_of(cond, self.owner), len(self.members), call)


class RoutedFeatures(NamedTuple):
    """Bottleneck features in batch order and the student each sample belongs to (for :class:`RoutedHeads`)."""

    features: torch.Tensor
    student: torch.Tensor


class RoutedHeads(torch.nn.Module):
    """One discriminator head per student; each sample's logit comes from its own student's head."""

    def __init__(self, heads: list[torch.nn.Module]):
        super().__init__()
        self.heads = torch.nn.ModuleList(heads)

    def forward(self, routed: RoutedFeatures) -> torch.Tensor:
        return route_call(routed.student, len(self.heads), lambda k, idx: self.heads[k](routed.features[idx]))
