"""Methods (objectives) and the one training loop."""
from __future__ import annotations

from .base import Objective, Phase
from .callbacks import Callback, PeriodicEval, SampleGrid
from .engine import DistillTrainer, NonFiniteLoss

METHODS: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Objective]:
    from ..config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_trainer(run, callbacks=()) -> DistillTrainer:
    """Seed, then build the data, the method's objective and the loop from a RunConfig (what the CLI runs)."""
    import torch

    from ..data import build_dataset

    torch.manual_seed(run.train.seed)  # model initialisation depends only on the config
    data = build_dataset(run.data)
    objective = get_method(run.method).from_config(run, data)
    return DistillTrainer(objective, data, run, callbacks)


from .teacher import DenoisingObjective, TeacherTrainer  # noqa: E402  (registers "teacher")

__all__ = ["Callback", "DenoisingObjective", "DistillTrainer", "METHODS", "NonFiniteLoss", "Objective",
           "PeriodicEval", "Phase", "SampleGrid", "TeacherTrainer", "build_trainer", "get_method", "register"]
