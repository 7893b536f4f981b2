"""Diversity: how different the samples of one prompt (or one class) are from each other, beside the same statistic
on real digits, so that mode collapse shows as a number well below the real one.

Samples ``i = 0..N-1`` of one model at one NFE have features ``f_i`` (the shipped digits CNN's ``fc`` layer times its
``feature_scale``: the FID/KID features of ``--features digits``, RMS 1 on the digits) and a group ``g(i)``: the
prompt index ``i % P`` (text-to-image), the class ``i % C`` (class-conditional), the source image ``i % S``
(image-conditioned), or one group (unconditional) — the samples that were asked for the same thing. For a group
``G`` with ``m = |G| >= 2`` samples, the mean pairwise distance is::

    D(G) = 2 / (m (m - 1)) * sum_{i < j in G} ||f_i - f_j||_2

and ``diversity = (1 / |Gs|) * sum_{G in Gs} D(G)``, the unweighted mean over the groups ``Gs`` with at least two
samples (groups of one are skipped; with N = 2000 and the 359 ``digits-captions:eval`` prompts every group has 5-6).
A model that draws the same image for every sample of a prompt scores 0.

Reference (``diversity_real``): the same statistic on real images of the group's class ``c(G)`` (the class, or the
digit the prompt asks for), ``R(c) = mean over all pairs a != b of real images of class c of ||f_a - f_b||_2``. This
is exactly the expected ``D`` of ``m`` real images of class ``c`` drawn without replacement, for every ``m >= 2``
(each pair is equally likely to be drawn), so it is the real value at the model's group sizes without sampling
noise: ``diversity_real = (1 / |Gs|) * sum_{G in Gs} R(c(G))``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

CHUNK = 1024  # rows of the distance matrix at a time (memory: CHUNK x m floats)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """``2 / (m (m - 1)) * sum_{i < j} ||f_i - f_j||_2`` of an (m, D) tensor (m >= 2), in float64."""
    f = features.double()
    m = len(f)
    if m < 2:
        raise ValueError("the mean pairwise distance needs at least 2 samples")
    total = 0.0
    for s in range(0, m, CHUNK):
        total += float(torch.cdist(f[s:s + CHUNK], f).sum())  # each unordered pair twice (float64: exact enough)
    return total / (m * (m - 1))


def groups_of(keys) -> dict:
    """key -> list of sample positions having that key."""
    out = defaultdict(list)
    for pos, key in enumerate(keys):
        out[key].append(pos)
    return dict(out)


def group_diversity(features: torch.Tensor, keys) -> dict:
    """``diversity`` (see the module docstring) of samples with ``features`` (N, D) and group ``keys`` (N,):
    ``{"diversity": float | None, "groups": number of groups with >= 2 samples, "group_sizes": [min, max]}``."""
    groups = [idx for idx in groups_of(keys).values() if len(idx) >= 2]
    if not groups:
        return {"diversity": None, "groups": 0, "group_sizes": None}
    values = [mean_pairwise_distance(features[idx]) for idx in groups]
    sizes = [len(idx) for idx in groups]
    return {"diversity": sum(values) / len(values), "groups": len(groups), "group_sizes": [min(sizes), max(sizes)]}


def class_distances(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """``R(c)``: the mean pairwise distance among the real images of each class ``c`` with at least 2 images."""
    out = {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) >= 2:
            out[int(c)] = mean_pairwise_distance(features[idx])
    return out


def reference_diversity(keys, group_class, real: dict[int, float]) -> float | None:
    """``diversity_real``: the mean of ``R(c(G))`` over the groups with >= 2 samples, with ``group_class``: key ->
    class (``None`` or a class without real images makes the reference None)."""
    groups = [key for key, idx in groups_of(keys).items() if len(idx) >= 2]
    classes = [group_class(key) for key in groups]
    if not groups or any(c is None or c not in real for c in classes):
        return None
    return sum(real[c] for c in classes) / len(classes)


def protocol(judge_protocol: dict, reference: str | None) -> dict:
    return {"definition": "mean over groups G with |G| >= 2 of D(G) = 2/(m(m-1)) sum_{i<j in G} ||f_i - f_j||_2 "
                          "(m = |G|); groups: samples with the same prompt (i % P), class (i % C) or source image; "
                          "one group when unconditional",
            "features": "digits CNN fc layer x feature_scale (the FID features of --features digits)",
            "extractor": judge_protocol,
            "reference": (f"diversity_real: mean over the same groups of R(c(G)), the mean pairwise distance among "
                          f"all real images of the group's class (or asked digit) in {reference}: the expected D of "
                          "m real images of that class, for any m" if reference else None)}
