"""The methods: ``@register`` on an objective class is all a new method needs; ``get_method`` finds it by name.

The registry imports every module of :mod:`stepdistill.trainers` the first time a method is looked up, so a
method file registers itself without being listed anywhere. ``resolve`` / ``load_config`` build a run config
for the method it names, ``build_trainer`` binds that method's objective to the one loop, and the named trainer
classes (``DMD2Trainer``, ``ConsistencyTrainer``, ...) do the same for users who look for those names.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig, build_run, read_config
from ..data import build_dataset
from .base import Objective
from .engine import DistillTrainer

METHODS: dict[str, type[Objective]] = {}
_discovered = False


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` (an :class:`Objective` with a unique ``name``) a method."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no method name (set the class attribute 'name')")
    if METHODS.get(cls.name, cls) is not cls:
        raise TypeError(f"method {cls.name!r} is registered twice: {METHODS[cls.name].__name__} and {cls.__name__}")
    METHODS[cls.name] = cls
    return cls


def discover() -> dict[str, type[Objective]]:
    """Import every module of ``stepdistill.trainers`` once (each method registers itself); the methods by name."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{__package__}.{module.name}")
        _discovered = True
    return METHODS


def get_method(name: str) -> type[Objective]:
    methods = discover()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]


def resolve(raw: dict) -> RunConfig:
    """A raw mapping (a recipe's YAML) as the RunConfig of the method it names."""
    return build_run(raw, get_method(raw.get("method", "teacher")))


def load_config(path, overrides=(), defaults: dict | None = None) -> RunConfig:
    """A YAML recipe with dotted ``overrides`` (``train.max_steps=100``) as a RunConfig."""
    return resolve(read_config(path, overrides, defaults))


def build_trainer(run: RunConfig, callbacks=()) -> DistillTrainer:
    """Seed, then load the teacher once and build the data, the method's objective and the loop (what the CLI
    runs)."""
    method = get_method(run.method)
    torch.manual_seed(run.train.seed)  # model initialisation depends only on the config
    # prompts are encoded by the teacher's own text encoders, cached under the run folder
    data = build_dataset(run.data, run.model, cache_dir=run.cache_dir)
    objective = method.from_config(run, data)
    return DistillTrainer(objective, data, run, callbacks)


class NamedTrainer:
    """A method bound to the one loop, for users who look for trainer names: ``DMD2Trainer(run).train()``."""

    method = ""

    def __init__(self, run: RunConfig, callbacks=()):
        if run.method != self.method:
            raise ConfigError(f"{type(self).__name__} trains method {self.method!r}; the config says {run.method!r}")
        self.trainer = build_trainer(run, callbacks)
        self.objective = self.trainer.objective

    def train(self, resume: str | None = "latest"):
        return self.trainer.train(resume)


def _named(class_name: str, method: str) -> type[NamedTrainer]:
    return type(class_name, (NamedTrainer,), {"method": method, "__doc__": f"Trains method {method!r}."})


TeacherTrainer = _named("TeacherTrainer", "teacher")
DMDTrainer = _named("DMDTrainer", "dmd")
DMD2Trainer = _named("DMD2Trainer", "dmd2")
RegressionTrainer = _named("RegressionTrainer", "regression")
FDistillTrainer = _named("FDistillTrainer", "f_distill")
DecoupledDMDTrainer = _named("DecoupledDMDTrainer", "decoupled_dmd")
MSDTrainer = _named("MSDTrainer", "msd")
DisBackTrainer = _named("DisBackTrainer", "disback")
LCMTrainer = _named("LCMTrainer", "lcm")
ConsistencyTrainer = LCMTrainer  # consistency distillation (LCM) under its generic name
LCMLoRATrainer = _named("LCMLoRATrainer", "lcm_lora")
SCottTrainer = _named("SCottTrainer", "scott")
ACDTrainer = _named("ACDTrainer", "acd")
TSCDTrainer = _named("TSCDTrainer", "tscd")
ICTTrainer = _named("ICTTrainer", "ict")
VSDTrainer = _named("VSDTrainer", "vsd")
SwiftBrushTrainer = _named("SwiftBrushTrainer", "swiftbrush")
SNOOPITrainer = _named("SNOOPITrainer", "snoopi")
ReflowTrainer = _named("ReflowTrainer", "reflow")
RectifiedFlowDistillTrainer = _named("RectifiedFlowDistillTrainer", "rf_distill")
InstaFlowTrainer = _named("InstaFlowTrainer", "instaflow")
SlimFlowTrainer = _named("SlimFlowTrainer", "slimflow")
GuidanceDistillTrainer = _named("GuidanceDistillTrainer", "guidance")
DiversityGuidanceTrainer = _named("DiversityGuidanceTrainer", "diversity_guidance")
ProgressiveDistillTrainer = _named("ProgressiveDistillTrainer", "progressive")
AGDTrainer = _named("AGDTrainer", "agd")
CFGAdapterTrainer = AGDTrainer  # adapter guidance distillation under the design's generic name
HiPATrainer = _named("HiPATrainer", "hipa")

#: the objective settings that make a method's student LoRA on the teacher's own weights
LORA_STUDENT_KEYS = ("student_lora_rank", "lora_rank", "generator_lora_rank")


class LoRADistillTrainer(NamedTrainer):
    """LoRA-enhanced distillation (Golnari 2023): a recipe whose student is LoRA on the frozen teacher, whose teacher
    is the same network with the adapters off — one copy of the base weights in memory (about half a full student
    copy's). Any method with a LoRA student: ``guidance`` with ``objective.student_lora_rank`` (e.g.
    configs/lora_guidance_digits.yaml), ``lcm_lora``, the DMD family / regression / ``hipa`` with
    ``generator_lora_rank``; a recipe without one is refused."""

    def __init__(self, run: RunConfig, callbacks=()):
        ranks = {k: getattr(run.objective, k, 0) or 0 for k in LORA_STUDENT_KEYS if hasattr(run.objective, k)}
        if not any(ranks.values()):
            raise ConfigError(f"LoRADistillTrainer trains a LoRA student on the teacher's own weights, and this "
                              f"{run.method!r} recipe has none: set objective.{next(iter(ranks), 'student_lora_rank')}"
                              f" > 0 (or use method guidance with objective.student_lora_rank)")
        self.trainer = build_trainer(run, callbacks)
        self.objective = self.trainer.objective
