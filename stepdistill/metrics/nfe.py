"""The NFE-versus-FID benchmark: a teacher at several NFE and students at theirs, the same labels, noise and N,
written as ``results.json``, ``nfe_vs_fid.png`` and a sample grid per model and NFE.

``results.json`` (the same shape for ``eval`` and ``bench``)::

    {"protocol": {...},
     "models": [{"name", "kind": "teacher" | "student",
                 "results": [{"nfe", "fid", "kid_mean", "kid_std", "seconds_per_image", "n",
                              "diversity", "diversity_real",                      # every model (sample_metrics)
                              "clip_score", "clip_score_std",                     # text-to-image, with --clip
                              "prompt_accuracy", "digit_accuracy", "attribute_accuracy",
                                                                                  # text, prompts that parse
                              "straightness"}, ...]}, ...]}                       # flow models, NFE >= 2

Precision/recall, IS and the KID subset size of each point go to ``details.json`` (same shape, more keys). The
protocol has a section per extra metric (``diversity``; ``prompts``, ``prompt_accuracy``, ``clip_score``), see
:mod:`.sample_metrics`.
Latency: every (model, NFE) is generated in batches of ``batch_size``; the first batch is the warm-up (untimed)
and ``seconds_per_image`` is the wall time of the pipeline calls of the remaining full batches per image (with a
single batch, that batch is run once more, timed). Generation and feature extraction stream batch by batch.
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..data import grid_columns, save_grid
from .fid import FidelityEvaluator, METRICS
from .sample_metrics import ROW_KEYS, SECTIONS, ExtraMetrics, ModelMetrics
from .samplers import EvalModel, to_uint8_unit
from .straightness import PROTOCOL as STRAIGHTNESS_PROTOCOL, STRAIGHTNESS_N, model_straightness


DEFAULT_TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
RESULT_KEYS = ("nfe", "fid", "kid_mean", "kid_std", "psnr", "ssim", "seconds_per_image", "n", *ROW_KEYS, "straightness",
               "reused")
LOGGED = ("fid", "kid_mean", "kid_std", "psnr", "ssim", "clip_score", "prompt_accuracy", "digit_accuracy", "diversity",
          "diversity_real", "straightness", "precision", "recall", "seconds_per_image")
GRID_COUNT = 100
NOISE_RULE = ("sample i draws all its noise from torch.Generator().manual_seed((seed * 0x9E3779B1 + i) mod 2**32), the "
              "same for every model and NFE")


@dataclass
class BenchSettings:
    n: int = 2000
    seed: int = 0
    batch_size: int = 250
    features: str = "digits"
    reference: str = "digits"
    metrics: tuple = METRICS
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    floor_splits: int = 10
    cache_dir: str | None = None
    device: str = "cpu"
    progress: bool = True
    grid_count: int = GRID_COUNT
    clip_scale: float = 100.0  # CLIP score = clip_scale * max(cos, 0)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


def _output_shape(model: EvalModel, settings: BenchSettings) -> tuple[int, int]:
    """(channels, resolution) of the model's images, from one tiny 1-step sample."""
    x = model.sample([0], 1 if not model.timesteps else len(model.timesteps), settings.seed)
    return int(x.shape[1]), int(x.shape[-1])


def evaluate_point(model: EvalModel, nfe: int, evaluator: FidelityEvaluator, settings: BenchSettings,
                   grid_path: Path | None = None, extra: ModelMetrics | None = None) -> dict:
    """Generate ``settings.n`` samples at ``nfe``, scoring them as they come; returns the full result dict
    (with ``extra``, also its CLIP score, prompt accuracy and diversity)."""
    from tqdm.auto import tqdm

    acc = evaluator.accumulator()
    point = extra.accumulator() if extra is not None else None
    fidelity = ReconstructionScores() if model.targets is not None else None
    n, bs = settings.n, settings.batch_size
    starts = list(range(0, n, bs))
    timed_seconds, timed_images, grid = 0.0, 0, []
    bar = tqdm(starts, desc=f"{model.name} nfe={nfe}", unit="batch", disable=not settings.progress, leave=False)
    for k, s in enumerate(bar):
        idx = range(s, min(s + bs, n))
        t0 = time.perf_counter()
        images = model.sample(idx, nfe, settings.seed)
        dt = time.perf_counter() - t0
        if k > 0 and len(idx) == bs:
            timed_seconds, timed_images = timed_seconds + dt, timed_images + len(idx)
        if fidelity is not None:
            fidelity.add(images, model.targets_of(idx))
        if point is not None:
            point.add(images, idx)
        images = _resize(images, evaluator.resolution)
        have = sum(len(g) for g in grid)
        if have < settings.grid_count:
            grid.append(images[: settings.grid_count - have])
        acc.add(to_uint8_unit(images))
    if timed_images == 0:  # one batch only: time it again, warm
        idx = range(0, min(bs, n))
        t0 = time.perf_counter()
        model.sample(idx, nfe, settings.seed)
        timed_seconds, timed_images = time.perf_counter() - t0, len(idx)
    features = acc.result()
    scores = evaluator.score(features)
    straight = model_straightness(model, nfe, settings.seed, min(n, STRAIGHTNESS_N), bs)  # flow models only
    if grid_path is not None and grid:
        save_grid(torch.cat(grid) * 2 - 1, grid_path, nrow=grid_columns(model.num_classes),
                  scale=max(1, 64 // evaluator.resolution))
    return {"nfe": int(nfe), **scores, **(fidelity.result() if fidelity is not None else {}),
            **(point.result() if point is not None else {}), "seconds_per_image": timed_seconds / timed_images,
            **({"straightness": straight} if straight is not None else {}),
            "n": features.n, "timed_images": timed_images}


class ReconstructionScores:
    """Mean per-image PSNR (dB) and SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5) of images against
    their targets, both in [0, 1] (data range 1), via torchmetrics."""

    def __init__(self):
        self.psnr, self.ssim, self.n = 0.0, 0.0, 0

    def add(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        images, targets = images.float().clamp(0, 1), targets.float().to(images.device)
        psnr = peak_signal_noise_ratio(images, targets, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(images, targets, data_range=1.0, reduction="none")
        self.psnr += float(psnr.sum())
        self.ssim += float(ssim.sum())
        self.n += len(images)

    def result(self) -> dict:
        return {"psnr": self.psnr / self.n, "ssim": self.ssim / self.n}


def _comparable(protocol_or_model: dict) -> dict:
    """What must match for two measurements to be the same measurement (paths, versions and times may differ)."""
    drop = {"library", "wall_seconds", "created", "folder", "weights_path", "latency", "models", "real_vs_real",
            "stepdistill", "nfe", "source", "path", "cfg_scale"}
    return {k: _comparable(v) if isinstance(v, dict) else v for k, v in protocol_or_model.items() if k not in drop}


def reusable_rows(previous: dict | None, model: EvalModel, protocol: dict) -> dict[int, dict]:
    """The rows of ``model`` in an earlier ``results.json`` measured under the same protocol (feature extractor
    weights, reference, N, seed, KID settings) with the same weights and sampler: ``{nfe: row}``."""
    if not previous or _comparable({k: previous["protocol"].get(k) for k in protocol}) != _comparable(protocol):
        return {}
    old = previous["protocol"].get("models", {}).get(model.name)
    if old is None or _comparable(old) != _comparable(model.describe()):
        return {}
    entry = next(m for m in previous["models"] if m["name"] == model.name)
    return {r["nfe"]: {**r, "reused": True} for r in entry["results"]}


def _reused(row: dict, previous: dict, sections: dict) -> dict:
    """A reused row without the extra metrics whose protocol section differs from today's (or is gone)."""
    drop = [k for name, keys in SECTIONS.items()
            if sections.get(name) is None or _comparable(previous["protocol"].get(name) or {})
            != _comparable(sections[name]) for k in keys]
    return {k: v for k, v in row.items() if k not in drop}


def run_benchmark(models: list[tuple[EvalModel, list[int]]], settings: BenchSettings,
                  results_path: str | Path = "bench/results.json", log=print, reuse: dict | None = None,
                  clip=None) -> dict:
    """Evaluate each (model, NFE list); write ``results_path`` and, next to it, ``details.json``,
    ``nfe_vs_fid.png`` and ``samples/<model>_nfe<K>.png``.

    Beside FID/KID every point gets its diversity, and a text-to-image model's its prompt accuracy and, with
    ``clip`` (a loaded ``ClipModel``, scale ``settings.clip_scale``), its CLIP score (:mod:`.sample_metrics`).

    ``reuse``: an earlier results.json; a (model, NFE) measured there under the same protocol with the same weights
    (and prompts, and CLIP model for a text model) is taken from it (marked ``"reused": true``; no sample grid)
    instead of being generated again; it keeps those extra metrics that were measured the same way."""
    results_path = Path(results_path)
    out_dir = results_path.parent
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    channels, resolution = _output_shape(models[0][0], settings)
    evaluator = FidelityEvaluator(settings.features, settings.reference, resolution, channels, settings.metrics,
                                  settings.cache_dir, settings.device, settings.batch_size, settings.kid_subsets,
                                  settings.kid_subset_size, progress=settings.progress)
    started = time.time()
    classes = {m.num_classes for m, _ in models}
    balanced = len(classes) == 1 and None not in classes and evaluator.ref_labels is not None \
        and len(torch.unique(evaluator.ref_labels)) == next(iter(classes))
    floor = (evaluator.floor(settings.n, settings.floor_splits, stratified=balanced)
             if "fid" in settings.metrics and settings.floor_splits > 0 else None)
    entries, details = [], []
    extra = ExtraMetrics(settings.reference, resolution, channels, clip, settings.clip_scale, settings.n, log)
    sections = extra.protocol([m for m, _ in models])
    same_protocol = evaluator.protocol(settings.n) | {"seed": settings.seed, "noise": NOISE_RULE}
    for model, nfes in models:
        rows = []
        text_clip = {"clip_score": sections["clip_score"]} if model.prompts and clip is not None else {}
        previous = reusable_rows(reuse, model, same_protocol | text_clip)
        for nfe in nfes:
            if nfe in previous:
                rows.append(_reused(previous[nfe], reuse, sections))
                log(f"{model.name} ({model.kind}) nfe={nfe}: fid={previous[nfe]['fid']:.4g} (reused)")
                continue
            grid = out_dir / "samples" / f"{slug(model.name)}_nfe{nfe}.png"
            row = evaluate_point(model, nfe, evaluator, settings, grid, extra.for_model(model))
            rows.append(row)
            log(f"{model.name} ({model.kind}) nfe={nfe}: " + "  ".join(
                f"{k}={row[k]:.4g}" for k in LOGGED if row.get(k) is not None))
        entries.append({"name": model.name, "kind": model.kind,
                        "results": [{k: r[k] for k in RESULT_KEYS if k in r} for r in rows]})
        details.append({"name": model.name, "kind": model.kind, "results": rows})
    protocol = build_protocol(evaluator, settings, models, floor, time.time() - started) | sections
    results = {"protocol": protocol, "models": entries}
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "details.json").write_text(json.dumps({"protocol": protocol, "models": details}, indent=1) + "\n")
    if "fid" in settings.metrics and "kid" in settings.metrics:
        plot_nfe_vs_fid(results, out_dir / "nfe_vs_fid.png")
    return results


def build_protocol(evaluator: FidelityEvaluator, settings: BenchSettings, models, floor, seconds: float) -> dict:
    num_classes = {m.num_classes for m, _ in models}
    labels = (f"sample i has class i % {num_classes.pop()} (balanced; the same for every model)"
              if len(num_classes) == 1 and None not in num_classes else "per model, see models")
    main = next((m for m, _ in models if m.kind == "teacher"), models[0][0])  # per model: protocol["models"]
    return {
        **evaluator.protocol(settings.n),
        "seed": settings.seed,
        "noise": NOISE_RULE,
        "class_labels": labels,
        "nfe": "sampler steps; each is one network call per sample at guidance 1 (two, batched, with CFG)",
        "guidance": main.guidance,
        "real_vs_real": floor,
        "latency": {"batch_size": settings.batch_size, "warmup": "first batch of each (model, nfe), untimed",
                    "device": str(settings.device), "torch_threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "models": {m.name: {**m.describe(), "nfe": list(nfes)} for m, nfes in models},
        "straightness": STRAIGHTNESS_PROTOCOL,
        "wall_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stepdistill": __version__,
    }


#: the plot's panels: (row key, title, error-bar key, a companion key drawn dashed in the same colour, its meaning)
PANELS = (("fid", "FID", None, None, None),
          ("kid_mean", "KID (mean ± std)", "kid_std", None, None),
          ("clip_score", "CLIP score", None, None, None),
          ("prompt_accuracy", "prompt accuracy", None, "digit_accuracy", "dashed: digit only"),
          ("diversity", "diversity (within a prompt / class)", None, "diversity_real", "dashed: real digits"))


def plot_nfe_vs_fid(results: dict, path: str | Path) -> Path:
    """FID and KID against NFE (log x): the teacher as a line, students as marked points, the floor dashed; and,
    where the rows have them, CLIP score, prompt accuracy (digit accuracy dashed) and diversity (the real digits'
    dashed), one panel each on the same NFE axis (a row of up to 3 panels, then a second row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows_of = {m["name"]: sorted(m["results"], key=lambda r: r["nfe"]) for m in results["models"]}
    panels = [p for p in PANELS if any(r.get(p[0]) is not None for rows in rows_of.values() for r in rows)]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    markers = iter("s^Dv*PXh<>" * 3)
    all_nfe = set()
    for color, model in enumerate(results["models"]):
        marker, teacher = next(markers), model["kind"] == "teacher"
        label = f"{model['name']} ({model['kind']})"
        for ax, (key, _, err_key, companion, _) in zip(axes, panels):
            rows = [r for r in rows_of[model["name"]] if r.get(key) is not None]
            if not rows:
                continue
            x = [r["nfe"] for r in rows]
            all_nfe.update(x)
            err = [r[err_key] for r in rows] if err_key else None
            style = dict(marker="o", lw=1.8) if teacher else dict(marker=marker, ms=9, ls="none")
            ax.errorbar(x, [r[key] for r in rows], yerr=err, capsize=3, color=f"C{color}", label=label, **style)
            pairs = [(r["nfe"], r[companion]) for r in rows if companion and r.get(companion) is not None]
            if pairs:
                ax.plot(*zip(*pairs), color=f"C{color}", ls="--", lw=1, marker="" if teacher else marker,
                        mfc="none", ms=7)
    protocol = results["protocol"]
    floor = protocol.get("real_vs_real")
    if floor:
        axes[0].axhline(floor["fid_floor"], color="gray", ls="--", lw=1, label="real vs real (floor at this N)")
    axes[1].axhline(floor["kid_floor"] if floor else 0.0, color="gray", ls="--", lw=1)
    extractor = protocol["feature_extractor"]["name"]
    clip = protocol.get("clip_score") or {}
    clip_name = Path(clip["folder"]).name if clip.get("backbone") == "local-dir" else clip.get("backbone", "CLIP")
    ylabels = {"fid": f"FID ({extractor} features)", "kid_mean": f"KID ({extractor} features)",
               "clip_score": f"CLIP score ({clip_name})",
               "prompt_accuracy": "fraction of samples", "diversity": "mean pairwise distance (digits CNN fc)"}
    ticks = sorted(all_nfe)
    for ax, (key, title, _, _, note) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabels[key])
        ax.set_title(title + (f" ({note})" if note else ""), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    if all(r["fid"] is not None and r["fid"] > 0 for m in results["models"] for r in m["results"]):
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    ref = protocol["reference"]
    fig.suptitle(f"N = {protocol['n_generated']} generated vs {ref['name']} ({ref['size']} images, "
                 f"{ref['resolution']}px)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
