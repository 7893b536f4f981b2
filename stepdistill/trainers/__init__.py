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
    # prompts are encoded by the teacher's text encoders, cached under the run folder
    data = build_dataset(run.data, run.model, cache_dir=run_cache_dir(run))
    objective = get_method(run.method).from_config(run, data)
    return DistillTrainer(objective, data, run, callbacks)


def run_cache_dir(run):
    """Where a run caches what it derives from its inputs (encoded prompts, the null prompt, VAE latents)."""
    from pathlib import Path

    return Path(run.output_dir) / "cache"


class _NamedTrainer:
    """A method bound to the one loop, for users who look for trainer names: ``DMD2Trainer(run).train()``."""

    method = ""

    def __init__(self, run, callbacks=()):
        from ..config import ConfigError

        if run.method != self.method:
            raise ConfigError(f"{type(self).__name__} trains method {self.method!r}; the config says {run.method!r}")
        self.trainer = build_trainer(run, callbacks)
        self.objective = self.trainer.objective

    def train(self, resume: str | None = "latest"):
        return self.trainer.train(resume)


class TeacherTrainer(_NamedTrainer):
    method = "teacher"


class DMDTrainer(_NamedTrainer):
    method = "dmd"


class DMD2Trainer(_NamedTrainer):
    method = "dmd2"


class RegressionTrainer(_NamedTrainer):
    method = "regression"


class LCMTrainer(_NamedTrainer):
    method = "lcm"


ConsistencyTrainer = LCMTrainer  # consistency distillation (LCM) under its generic name


class LCMLoRATrainer(_NamedTrainer):
    method = "lcm_lora"


class SCottTrainer(_NamedTrainer):
    method = "scott"


class ACDTrainer(_NamedTrainer):
    method = "acd"


class TSCDTrainer(_NamedTrainer):
    method = "tscd"


class ICTTrainer(_NamedTrainer):
    method = "ict"


class MSDTrainer(_NamedTrainer):
    method = "msd"


class DisBackTrainer(_NamedTrainer):
    method = "disback"


class FDistillTrainer(_NamedTrainer):
    method = "f_distill"


class DecoupledDMDTrainer(_NamedTrainer):
    method = "decoupled_dmd"


from .dmd import DMDObjective, DMDv1Objective, RegressionObjective  # noqa: E402  (registers "dmd2", "dmd", "regression")
from .msd import MSDObjective, MSDTSMObjective  # noqa: E402  (registers "msd", "msd_tsm")
from .disback import DisBackObjective, DisBackRecordObjective  # noqa: E402  (registers "disback", "disback_record")
from .f_distill import FDistillObjective  # noqa: E402  (registers "f_distill")
from .decoupled_dmd import DecoupledDMDObjective  # noqa: E402  (registers "decoupled_dmd")
from .teacher import DenoisingObjective  # noqa: E402  (registers "teacher")
from .consistency import ACDObjective, ConsistencyObjective, LCMLoRAObjective, SCottObjective  # noqa: E402,F401  (lcm, lcm_lora, scott, acd)
from .tscd import TSCDObjective  # noqa: E402  (registers "tscd")
from .ict import ICTObjective  # noqa: E402  (registers "ict")

__all__ = ["ACDObjective", "ACDTrainer", "Callback", "ConsistencyObjective", "ConsistencyTrainer", "LCMLoRAObjective", "LCMLoRATrainer", "LCMTrainer", "SCottObjective", "SCottTrainer", "TSCDObjective", "TSCDTrainer", "ICTObjective", "ICTTrainer", "DMD2Trainer", "DMDObjective", "DMDTrainer", "DMDv1Objective", "DisBackObjective", "DisBackRecordObjective", "DisBackTrainer", "MSDObjective", "MSDTSMObjective", "MSDTrainer", "DecoupledDMDObjective",
           "DecoupledDMDTrainer", "DenoisingObjective", "DistillTrainer", "FDistillObjective", "FDistillTrainer", "METHODS", "NonFiniteLoss", "Objective",
           "PeriodicEval", "Phase", "RegressionObjective", "RegressionTrainer", "SampleGrid", "TeacherTrainer", "build_trainer", "get_method", "register"]
