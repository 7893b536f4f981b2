"""Per-sample routing of a batch to K models by class label or by prompt keywords (multi-student models), as
pure functions.

Used by the MSD trainer's routed students and by the exported :class:`~stepdistill.pipelines.MultiStudentUNet`,
so that training and the pipeline route identically. Plain torch: importing it loads no Diffusers pipeline.
"""
from __future__ import annotations

from typing import Callable

import torch


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
    import re

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
