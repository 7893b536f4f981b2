"""A student's weights as an export writes them: plain (LoRA merged or stripped) state dicts, safetensors files with
fp16/bf16 variants, and the Diffusers LoRA payload."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .recipes import ExportError

VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def adapter_name(model) -> str:
    names = list(getattr(model, "peft_config", {}) or {})
    if len(names) != 1:
        raise ExportError(f"export supports one LoRA adapter per student; this one has {names or 'none named'}")
    return names[0]


def plain_state_dict(model: torch.nn.Module, merge: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's weights without LoRA wrappers: the base weights, or (``merge``) base + LoRA delta."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    out = {}
    for key, value in model.state_dict().items():
        if ".base_layer." in key:
            prefix, rest = key.split(".base_layer.", 1)
            if prefix in tuners:
                if merge and rest == "weight":
                    layer = tuners[prefix]
                    with torch.no_grad():
                        for adapter in layer.active_adapters:
                            if adapter in getattr(layer, "lora_A", {}) or \
                                    adapter in getattr(layer, "lora_embedding_A", {}):
                                value = value + layer.get_delta_weight(adapter).to(value.dtype)
                out[f"{prefix}.{rest}"] = value
                continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in tuners for i in range(1, len(parts))):
            continue  # an adapter parameter (lora_A / lora_B / ...)
        out[key] = value
    return out


def plain_denoiser(student):
    """``student`` (a :class:`~stepdistill.Denoiser`) as a plain backbone of its class, LoRA merged into the weights
    (the student itself when it has no LoRA): what a run's ``final/`` holds, so that the next stage loads it as a
    teacher."""
    from ..backbones import unwrap
    from ..denoiser import Denoiser

    if not student.lora_layers():
        return student
    backbone = unwrap(student.backbone)
    plain = type(backbone).from_config(backbone.config)
    plain.load_state_dict(plain_state_dict(backbone, merge=True))
    dtype = next(backbone.parameters()).dtype
    return Denoiser(plain if dtype == torch.float32 else plain.to(dtype), student.schedule, student.prediction_type,
                    null_cond=student.null_cond, null_class=student.null_class)


def check_keys(model, state: dict, config: dict | None = None) -> None:
    """The state dict to export has exactly the keys of a plain model of ``model``'s class (with ``config``, default
    its own)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = type(model).from_config(config if config is not None else model.config)
    except Exception:  # pragma: no cover - a model that cannot be built on the meta device: skip the check
        return
    expected = set(reference.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"the weights to export do not match a plain {type(model).__name__}: missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except RuntimeError:  # tensors sharing storage
        save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_model(model, state: dict, folder: Path, variants=(), config: dict | None = None) -> None:
    """A Diffusers model folder (config.json + diffusion_pytorch_model[.variant].safetensors) from a state dict;
    ``config``: the config to record instead of the model's own (e.g. a base without the keys its adapters add)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    if config is not None:
        saved = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**{k: v for k, v in saved.items() if k.startswith("_")},
                                                        **config}, indent=2, sort_keys=True) + "\n")
    save_tensors(state, folder / "diffusion_pytorch_model.safetensors")
    for variant in variants:
        dtype = VARIANT_DTYPES[variant]
        save_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                      folder / f"diffusion_pytorch_model.{variant}.safetensors")


def lora_payload(model, pipeline: str) -> tuple[dict, dict]:
    from peft.utils import get_peft_model_state_dict

    name = adapter_name(model)
    state = get_peft_model_state_dict(model, adapter_name=name)
    config = model.peft_config[name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    # peft key names, as ``save_lora_adapter`` writes them. (convert_state_dict_to_diffusers renames attention
    # LoRA layers to the old ``lora.down/up`` names, and load_lora_weights then silently skips them when the file
    # also holds peft-named layers such as resnet convs.)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


# ---------------------------------------------------------------------------------------------- interpolation
def interpolate_weights(quality: dict, diversity: dict, weight: float) -> dict[str, torch.Tensor]:
    """``(1 - weight) * theta_quality + weight * theta_diversity``, tensor by tensor: the weight interpolation of
    diversity-rewarded CFG distillation (a quality-focused and a diversity-rewarded student of the same teacher;
    ``weight`` 0 is the quality student, 1 the diversity student). Non-float tensors are taken from ``quality``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight} must be in [0, 1] (0: the quality student, 1: the diversity student)")
    if quality.keys() != diversity.keys():
        diff = sorted(set(quality) ^ set(diversity))
        raise ValueError(f"the two students have different weights ({diff[:4]}): interpolate students of one "
                         "architecture (the same teacher and student settings)")
    out = {}
    for key, q in quality.items():
        d = diversity[key]
        if q.shape != d.shape:
            raise ValueError(f"{key} has shape {tuple(q.shape)} in one student and {tuple(d.shape)} in the other")
        out[key] = torch.lerp(q.float(), d.float(), float(weight)).to(q.dtype) if q.is_floating_point() else q
    return out


def load_interpolated(quality_folder, diversity_folder, weight: float, **from_pretrained_kwargs):
    """The quality student's pipeline with its denoiser's weights interpolated toward the diversity student's
    (:func:`interpolate_weights`): ``pipe = load_interpolated(QUALITY_EXPORT, DIVERSITY_EXPORT, 0.5)``. Both must be
    exports of the same architecture (e.g. two ``diversity_guidance`` runs, one with ``diversity_weight: 0``)."""
    from diffusers import DiffusionPipeline

    from ._shim import only_stepdistill_shims

    pipes = []
    for folder in (quality_folder, diversity_folder):
        kwargs = dict(from_pretrained_kwargs)
        if "trust_remote_code" not in kwargs and only_stepdistill_shims(Path(folder)):
            kwargs["trust_remote_code"] = True
        pipes.append(DiffusionPipeline.from_pretrained(folder, **kwargs))
    name = "unet" if getattr(pipes[0], "unet", None) is not None else "transformer"
    a, b = (getattr(p, name) for p in pipes)
    if type(a) is not type(b):
        raise ValueError(f"the students' denoisers differ: {type(a).__name__} and {type(b).__name__}")
    a.load_state_dict(interpolate_weights(a.state_dict(), b.state_dict(), weight))
    return pipes[0]
