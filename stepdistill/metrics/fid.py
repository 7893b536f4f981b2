"""FID, KID, Inception Score and precision/recall through torch-fidelity, in memory and streaming.

Generated images are never written to disk: each uint8 batch goes through the torch-fidelity feature extractor
as it is generated and only its features are kept (the FID moments are merged batch by batch, so the FID layer
needs O(D^2) memory whatever the sample count; KID, precision/recall and IS keep the features themselves,
N x D floats, never the images). The metric formulas are torch-fidelity's own functions
(``fid_statistics_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``, ``isc_features_to_metric``),
so numbers equal ``torch_fidelity.calculate_metrics`` on the same images (pinned by a test).

Reference features are computed once per (data set, resolution, extractor, weights hash, image content) and
cached as safetensors (no pickles) under ``$STEPDISTILL_CACHE/fid`` (default ``~/.cache/stepdistill/fid``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..cache import load_tensor_cache, save_tensor_cache, tensor_digest
from ..data import DataError, ImageFolder, digits_tensors, to_uint8
from .features import FeatureSpec, create_extractor, extract, resolve_features


METRICS = ("fid", "kid", "prc", "isc")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE", "~/.cache/stepdistill")).expanduser() / "fid"


# --------------------------------------------------------------------------------------------------------------
# Streaming feature accumulation
# --------------------------------------------------------------------------------------------------------------

class Moments:
    """Mean and covariance of a stream of feature batches, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, x: torch.Tensor) -> None:
        x = x.double().numpy()
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        delta = mb - self.mean
        n = self.n + nb
        self.m2 += xc.T @ xc + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise DataError("FID needs at least 2 images on each side")
        return self.m2 / (self.n - 1)  # as np.cov (ddof=1), which torch-fidelity uses


@dataclass
class FeatureSet:
    """What the metrics need from one set of images: FID moments and the features KID/PR/IS use."""

    n: int
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def subset(self, index: torch.Tensor, fid_layer: str) -> "FeatureSet":
        """The features of some of the images (needs the FID layer's features kept)."""
        feats = {k: v[index] for k, v in self.features.items()}
        x = feats[fid_layer].double().numpy()
        return FeatureSet(len(index), x.mean(0), np.cov(x, rowvar=False), feats)


class FeatureAccumulator:
    """Feed uint8 batches with :meth:`add`; :meth:`result` gives the :class:`FeatureSet`."""

    def __init__(self, extractor, spec: FeatureSpec, metrics: Iterable[str] = METRICS, keep_fid_features=False):
        self.extractor, self.spec = extractor, spec
        metrics = set(metrics)
        self.fid_layer = spec.layers["fid"] if "fid" in metrics else None
        self.keep = {spec.layers[m] for m in metrics - {"fid"}}
        if keep_fid_features and self.fid_layer:
            self.keep.add(self.fid_layer)
        self.moments: Moments | None = None
        self.kept: dict[str, list[torch.Tensor]] = {k: [] for k in self.keep}
        self.n = 0

    def add(self, images_uint8: torch.Tensor) -> None:
        if images_uint8.dtype != torch.uint8:
            raise DataError(f"feature extraction takes uint8 images, not {images_uint8.dtype}")
        feats = extract(self.extractor, images_uint8, self.spec.channels)
        if self.fid_layer:
            x = feats[self.fid_layer]
            if self.moments is None:
                self.moments = Moments(x.shape[1])
            self.moments.update(x)
        for k in self.keep:
            self.kept[k].append(feats[k])
        self.n += len(images_uint8)

    def result(self) -> FeatureSet:
        fs = FeatureSet(self.n, features={k: torch.cat(v) for k, v in self.kept.items() if v})
        if self.moments is not None:
            fs.mu, fs.sigma = self.moments.mean, self.moments.covariance()
        return fs


def features_of(images_uint8: torch.Tensor, extractor, spec: FeatureSpec, metrics=METRICS, batch_size: int = 250,
                progress: bool | str = False, keep_fid_features=False) -> FeatureSet:
    """Features of an in-memory uint8 image tensor, batch by batch."""
    from tqdm.auto import tqdm

    acc = FeatureAccumulator(extractor, spec, metrics, keep_fid_features)
    starts = range(0, len(images_uint8), batch_size)
    desc = progress if isinstance(progress, str) else "features"
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=False):
        acc.add(images_uint8[s:s + batch_size])
    return acc.result()


# --------------------------------------------------------------------------------------------------------------
# Metrics (torch-fidelity's formulas)
# --------------------------------------------------------------------------------------------------------------

def kid_subset_size_for(n1: int, n2: int, wanted: int = 1000) -> int:
    return max(2, min(wanted, n1, n2))


def fidelity_metrics(gen: FeatureSet, ref: FeatureSet, spec: FeatureSpec, metrics: Iterable[str] = METRICS,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, rng_seed: int = 2020,
                     blas_threads: int | None = 1) -> dict:
    """FID, KID (unbiased MMD^2, mean and std over subsets), precision/recall (k=3) and IS of ``gen`` vs ``ref``.

    ``kid_subset_size`` is capped at the smaller set's size (it is reported in the result). NumPy's BLAS runs
    with ``blas_threads`` threads (1 by default: on a shared 2-core CPU, OpenBLAS's 2 spinning threads made the
    eigenvalues of a 128x128 matrix take 1.2 s instead of 3 ms, and of a 2048x2048 one 30 s instead of 4 s).
    """
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return _fidelity_metrics(gen, ref, spec, metrics, kid_subsets, kid_subset_size, rng_seed)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _fidelity_metrics(gen, ref, spec, metrics, kid_subsets, kid_subset_size, rng_seed)


def _fidelity_metrics(gen, ref, spec, metrics, kid_subsets, kid_subset_size, rng_seed) -> dict:
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    metrics = set(metrics)
    out = {}
    if "fid" in metrics:
        fid = fid_statistics_to_metric({"mu": gen.mu, "sigma": gen.sigma}, {"mu": ref.mu, "sigma": ref.sigma},
                                       verbose=False)
        out["fid"] = float(fid["frechet_inception_distance"])
    if "kid" in metrics:
        layer = spec.layers["kid"]
        size = kid_subset_size_for(gen.n, ref.n, kid_subset_size)
        kid = kid_features_to_metric(gen.features[layer], ref.features[layer], kid_subsets=kid_subsets,
                                     kid_subset_size=size, rng_seed=rng_seed, verbose=False)
        out.update(kid_mean=float(kid["kernel_inception_distance_mean"]),
                   kid_std=float(kid["kernel_inception_distance_std"]), kid_subset_size=size)
    if "prc" in metrics:
        layer = spec.layers["prc"]
        prc = prc_features_to_metric(gen.features[layer], ref.features[layer], save_cpu_ram=True, verbose=False)
        out.update(precision=float(prc["precision"]), recall=float(prc["recall"]), f_score=float(prc["f_score"]))
    if "isc" in metrics:
        isc = isc_features_to_metric(gen.features[spec.layers["isc"]], splits=10, shuffle=True, rng_seed=rng_seed)
        out.update(isc_mean=float(isc["inception_score_mean"]), isc_std=float(isc["inception_score_std"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Reference sets and their cached features
# --------------------------------------------------------------------------------------------------------------

def reference_images(reference: str = "digits", resolution: int = 16, channels: int | None = None
                     ) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """(description, uint8 images, class labels or None) of ``digits`` (all 1,797), ``digits:train``,
    ``digits:test`` or ``folder:PATH`` (labels from class sub-folders, if any)."""
    name, _, arg = reference.partition(":")
    if name == "digits":
        split = arg or "all"
        images, labels = digits_tensors(resolution, split)
        desc = {"name": "digits" if split == "all" else f"digits:{split}",
                "source": "sklearn.datasets.load_digits (1,797 8x8 images), bilinear to the resolution",
                "split": split}
    elif name == "folder":
        if not arg:
            raise DataError("reference folder:PATH needs a path")
        folder = ImageFolder(arg, resolution, channels or 3)
        images, labels = folder.images, folder.labels
        desc = {"name": f"folder:{Path(arg).expanduser().resolve()}", "source": "image folder, shorter side "
                "resized (bicubic) and center-cropped", "split": "all"}
    else:
        raise DataError(f"unknown reference set {reference!r}: use digits, digits:train, digits:test or folder:PATH")
    images = to_uint8(images)
    desc.update(size=len(images), resolution=resolution, channels=int(images.shape[1]))
    return desc, images, labels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text)[-60:].strip("_")


def reference_features(desc: dict, images_uint8: torch.Tensor, extractor, spec: FeatureSpec,
                       cache_dir: str | Path | None = None, batch_size: int = 250, progress: bool = False
                       ) -> FeatureSet:
    """Features of a reference set (all layers kept, for KID/PR and the real-vs-real floor), cached on disk.

    The cache key holds the data set, resolution, extractor, its weights sha256, the layers and a digest of the
    images themselves, so any change recomputes. ``cache_dir=False`` disables the cache.
    """
    layers = sorted(set(spec.layers.values()))
    key_fields = {"version": CACHE_VERSION, "dataset": desc["name"], "resolution": desc["resolution"],
                  "extractor": spec.extractor, "weights_sha256": spec.weights_sha256,
                  "config_sha256": spec.config_sha256, "layers": layers,
                  "images_sha256": tensor_digest(images_uint8)}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    path = None
    if cache_dir is not False:
        cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        path = cache_dir / (f"ref-{_slug(desc['name'])}-{desc['resolution']}px-{spec.extractor}-"
                            f"{key[:16]}.safetensors")
        cached = load_tensor_cache(path, key)
        if cached is not None:
            return FeatureSet(int(cached["n"]), cached["mu"].numpy(), cached["sigma"].numpy(),
                              {k[len("features."):]: v for k, v in cached.items() if k.startswith("features.")})
    fs = features_of(images_uint8, extractor, spec, METRICS, batch_size,
                     progress="reference features" if progress else False, keep_fid_features=True)
    if path is not None:
        tensors = {"n": torch.tensor(fs.n), "mu": torch.from_numpy(fs.mu), "sigma": torch.from_numpy(fs.sigma),
                   **{f"features.{k}": v for k, v in fs.features.items()}}
        save_tensor_cache(path, tensors, key, {"fields": json.dumps(key_fields)})
    return fs


def _halves(n: int, labels: torch.Tensor | None, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random split into two disjoint halves; per class (stratified) when ``labels`` are given."""
    if labels is None:
        perm = torch.randperm(n, generator=g)
        return perm[:n // 2], perm[n // 2:]
    a, b = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[:len(idx) // 2])
        b.append(idx[len(idx) // 2:])
    return torch.cat(a), torch.cat(b)


def real_vs_real(ref: FeatureSet, spec: FeatureSpec, n_generated: int, splits: int = 10, seed: int = 0,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, labels: torch.Tensor | None = None) -> dict:
    """The floor: FID/KID between disjoint random halves of the reference set, and the FID floor at the
    protocol's sample sizes.

    FID is biased upwards at finite N, roughly ``c * (1/n1 + 1/n2)`` (the mean term is exactly
    ``tr(Sigma) * (1/n1 + 1/n2)`` in expectation; Chong & Forsyth 2020 model the whole bias as linear in 1/N).
    The halves measure ``c`` with the data we have; the floor at (``n_generated`` vs the full reference) is that
    ``c`` times ``1/n_generated + 1/n_ref``: what a generator that samples the reference distribution exactly
    would score under this protocol. Halves are used rather than train vs test (which are unequal and the
    digits extractor was trained on the train split) or a bootstrap (its duplicates share images with the
    reference, which underestimates the floor). KID is unbiased for i.i.d. sets, so its floor is 0 and the
    halves show its noise.

    With ``labels`` the halves are split per class, matching class-balanced generation (labels ``i % 10``): with
    class-feature extractors most of the finite-sample FID comes from random class proportions, so unstratified
    halves would give a floor about twice too high for balanced samples (digits: c ~ 250 vs ~ 130, measured by
    ``benchmarks/fid_floor_check.py``). Balanced sets are not i.i.d., which biases KID slightly negative: the
    stratified ``kid_floor`` is the halves' measured mean.
    """
    fid_layer = spec.layers["fid"]
    if fid_layer not in ref.features:
        raise ValueError("the reference features must keep the FID layer (reference_features does)")
    g = torch.Generator().manual_seed(seed)
    fids, kids = [], []
    for _ in range(splits):
        ia, ib = _halves(ref.n, labels, g)
        n1, n2 = len(ia), len(ib)
        a, b = ref.subset(ia, fid_layer), ref.subset(ib, fid_layer)
        m = fidelity_metrics(a, b, spec, ("fid", "kid"), max(10, kid_subsets // splits), kid_subset_size)
        fids.append(m["fid"])
        kids.append(m["kid_mean"])
    c = float(np.mean(fids)) / (1 / n1 + 1 / n2)
    kind = "class-stratified random" if labels is not None else "random"
    return {
        "method": f"{splits} {kind} disjoint halves of the reference set ({n1} vs {n2}); fid_floor extrapolates "
                  "the halves' FID to n_generated vs the full reference assuming bias = c*(1/n1 + 1/n2)",
        "stratified": labels is not None, "c": c,
        "halves": [n1, n2],
        "fid_halves_mean": float(np.mean(fids)), "fid_halves_std": float(np.std(fids)),
        "kid_halves_mean": float(np.mean(kids)), "kid_halves_std": float(np.std(kids)),
        "fid_floor": c * (1 / n_generated + 1 / ref.n),
        # KID is unbiased for i.i.d. sets (floor 0); class-balanced sets are not i.i.d. and bias it slightly
        # negative, so the stratified floor is the halves' measured mean
        "kid_floor": float(np.mean(kids)) if labels is not None else 0.0,
        "at": {"n_generated": n_generated, "n_reference": ref.n},
    }


# --------------------------------------------------------------------------------------------------------------
# One object for a protocol: extractor + reference + metric settings
# --------------------------------------------------------------------------------------------------------------

class FidelityEvaluator:
    """Scores streams of generated uint8 batches against a cached reference set.

    >>> ev = FidelityEvaluator(features="digits", reference="digits", resolution=16)
    >>> acc = ev.accumulator()
    >>> for batch in batches: acc.add(batch)        # uint8 B x C x H x W
    >>> ev.score(acc.result())                      # {"fid": ..., "kid_mean": ..., ...}
    """

    def __init__(self, features: str | FeatureSpec = "digits", reference: str = "digits", resolution: int = 16,
                 channels: int | None = None, metrics: Iterable[str] = METRICS, cache_dir=None,
                 device: str = "cpu", batch_size: int = 250, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 rng_seed: int = 2020, progress: bool = False):
        self.spec = features if isinstance(features, FeatureSpec) else resolve_features(features)
        self.metrics = tuple(m for m in METRICS if m in set(metrics))
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise DataError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
        self.batch_size, self.kid_subsets, self.kid_subset_size = batch_size, kid_subsets, kid_subset_size
        self.rng_seed, self.resolution = rng_seed, resolution
        self.extractor = create_extractor(self.spec, device=device)
        self.reference_desc, ref_images, self.ref_labels = reference_images(reference, resolution, channels)
        self.ref = reference_features(self.reference_desc, ref_images, self.extractor, self.spec, cache_dir,
                                      max(batch_size, 500), progress)

    def accumulator(self) -> FeatureAccumulator:
        return FeatureAccumulator(self.extractor, self.spec, self.metrics)

    def score(self, gen: FeatureSet) -> dict:
        return fidelity_metrics(gen, self.ref, self.spec, self.metrics, self.kid_subsets, self.kid_subset_size,
                                self.rng_seed)

    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict:
        acc = self.accumulator()
        for batch in batches:
            acc.add(batch)
        return {**self.score(acc.result()), "n": acc.n}

    def floor(self, n_generated: int, splits: int = 10, stratified: bool = False) -> dict:
        """Real vs real (see :func:`real_vs_real`); ``stratified`` for class-balanced generation."""
        labels = self.ref_labels if stratified else None
        return real_vs_real(self.ref, self.spec, n_generated, splits, kid_subsets=self.kid_subsets,
                            kid_subset_size=self.kid_subset_size, labels=labels)

    def protocol(self, n_generated: int | None = None) -> dict:
        """Everything needed to reproduce or compare a number from this evaluator."""
        return {
            "metrics": {"fid": "Frechet distance of feature means/covariances (torch-fidelity)",
                        "kid": "unbiased MMD^2, cubic polynomial kernel, mean and std over subsets",
                        "prc": "precision/recall, k=3 nearest neighbours (Kynkaanniemi et al. 2019)",
                        "isc": "Inception Score on the extractor's logits, 10 splits"},
            "computed": list(self.metrics),
            "feature_extractor": self.spec.protocol(),
            "n_generated": n_generated,
            "reference": dict(self.reference_desc),
            "resolution": self.resolution,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": kid_subset_size_for(n_generated or self.ref.n, self.ref.n, self.kid_subset_size),
            "metric_rng_seed": self.rng_seed,
            "quantisation": "generated images in [0,1] -> uint8 by round(x*255), as a PNG would store them",
            "library": {"torch_fidelity": _version("torch-fidelity"), "torch": torch.__version__},
        }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
