"""Evaluation: FID/KID/IS/precision-recall (torch-fidelity, in memory), CLIP score (open_clip), prompt accuracy,
diversity, NFE benchmark.

- :mod:`.features` — feature extractors (the shipped digits CNN, the FID Inception from a local file).
- :mod:`.fid` — streaming features, reference-statistics cache, metrics, real-vs-real floor.
- :mod:`.clip_score` — CLIP score with local open_clip weights.
- :mod:`.text_alignment` — evaluation prompts, prompt-length checks, prompt accuracy (digit and attributes).
- :mod:`.diversity` — mean pairwise feature distance among samples of one prompt or class, and the real one.
- :mod:`.sample_metrics` — those figures (and CLIP score) per model and NFE, with their protocol.
- :mod:`.samplers` — teachers and exported students, sampled with the same labels (or prompts) and noise.
- :mod:`.nfe` — ``stepdistill eval`` / ``bench``: results.json, nfe_vs_fid.png, sample grids.

Names are imported lazily so that ``stepdistill --help`` does not import torch-fidelity or open_clip.
"""
from importlib import import_module

_EXPORTS = {
    "FeatureSpec": "features", "resolve_features": "features", "FeatureError": "features",
    "FidelityEvaluator": "fid", "fidelity_metrics": "fid", "reference_images": "fid", "real_vs_real": "fid",
    "load_clip": "clip_score", "clip_score": "clip_score", "clip_scores": "clip_score",
    "load_eval_model": "samplers", "EvalModel": "samplers",
    "load_eval_prompts": "text_alignment", "resolve_clip": "text_alignment", "group_diversity": "diversity",
    "BenchSettings": "nfe", "run_benchmark": "nfe", "plot_nfe_vs_fid": "nfe", "DEFAULT_TEACHER_NFE": "nfe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
