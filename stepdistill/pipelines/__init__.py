"""Pipelines for exported students (stock Diffusers where possible) and the export itself.

Names are imported lazily, so that ``stepdistill --help`` and modules that only need a recipe do not pay for
importing Diffusers' pipelines.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ClassConditionalPipeline": "class_conditional",
    "GuidedUNet2DModel": "class_conditional",
    "load_guidance_adapters": "class_conditional",
    "save_guidance_adapters": "class_conditional",
    "interpolate_weights": "weights",
    "load_interpolated": "weights",
    "ImageConditionedPipeline": "image_conditioned",
    "MultiStudentPipeline": "multi_student",
    "MultiStudentUNet": "multi_student",
    "MultiStudentSpec": "multi_student",
    "MultiStudentTextPipeline": "multi_student_text",
    "MultiStudentUNet2DConditionModel": "multi_student_text",
    "StudentLCMScheduler": "schedulers",
    "FlowMatchEulerUniformScheduler": "schedulers",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "ExportError": "recipes",
    "get_recipe": "recipes",
    "ExportSpec": "spec",
    "export_pipeline": "export",
    "pipeline_for": "spec",
    "export_timesteps": "spec",
    "export_scheduler": "spec",
    "student_timesteps": "sampling",
    "sample_student": "sampling",
    "NASAAttnProcessor": "nasa",
    "apply_nasa": "nasa",
    "set_nasa": "nasa",
    "remove_nasa": "nasa",
    "cross_attention_layers": "nasa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
