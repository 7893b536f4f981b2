"""What the loop takes from torch, Accelerate and Diffusers: the device, precision, gradient synchronisation,
gradient checkpointing and the warm-up-stable-decay LR schedule."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from ..config import ConfigError


def warmup_stable_decay(warmup: int, decay: int, total: int):
    """The lr factor at each update: a linear warm-up over ``warmup`` updates (as Diffusers' schedules), then 1,
    then a linear fall to 0 over the last ``decay`` of ``total`` updates (the last update's factor is 1 / decay)."""

    def factor(update: int) -> float:
        if update < warmup:
            return update / max(1, warmup)
        return max(0.0, min(1.0, (total - update) / decay))

    return factor


def no_accelerator() -> bool:
    """True on a CPU-only machine: Accelerate then uses gloo for torchrun/`accelerate launch` processes
    (without ``cpu=True`` it silently runs each process alone)."""
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_mps_available() or is_xpu_available() or is_npu_available())


def diffusers_models(module: torch.nn.Module) -> list:
    """The Diffusers models inside ``module`` (teacher, students, targets, fake scores)."""
    from diffusers import ModelMixin

    return [m for m in module.modules() if isinstance(m, ModelMixin)]


def enable_gradient_checkpointing(modules: dict) -> None:
    """Diffusers' gradient checkpointing (activations recomputed in the backward pass) in every trained backbone."""
    backbones = [m for module in modules.values() for m in diffusers_models(module) if m._supports_gradient_checkpointing]
    if not backbones:
        raise ConfigError(f"train.gradient_checkpointing: none of the trained modules ({', '.join(modules)}) "
                          "supports it; set it to false")
    for backbone in backbones:
        backbone.enable_gradient_checkpointing()


def allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state; let a later trainer in the same process (quickstart, tests)
    use another precision instead of failing."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


@contextmanager
def no_sync(modules, accelerator):
    with ExitStack() as stack:
        for m in modules:
            stack.enter_context(accelerator.no_sync(m))
        yield


def flat_for_trackers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_for_trackers(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
