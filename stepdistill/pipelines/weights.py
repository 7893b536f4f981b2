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


def check_keys(model, state: dict) -> None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = type(model).from_config(model.config)
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


def write_model(model, state: dict, folder: Path, variants=()) -> None:
    """A Diffusers model folder (config.json + diffusion_pytorch_model[.variant].safetensors) from a state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
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
