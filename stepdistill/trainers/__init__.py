"""Methods (objectives, one file each, registered by ``@register``) and the one training loop."""
from __future__ import annotations

from .base import Objective, Phase
from .callbacks import Callback, PeriodicEval, SampleGrid
from .engine import DistillTrainer, NonFiniteLoss
from .registry import (METHODS, ACDTrainer, AGDTrainer, CFGAdapterTrainer, ConsistencyTrainer, DecoupledDMDTrainer,
                       DisBackTrainer, DiversityGuidanceTrainer, DMD2Trainer, DMDTrainer, FDistillTrainer,
                       GuidanceDistillTrainer, HiPATrainer, ICTTrainer, InstaFlowTrainer, LCMLoRATrainer, LCMTrainer,
                       LoRADistillTrainer, MSDTrainer, NamedTrainer, ProgressiveDistillTrainer, RectifiedFlowDistillTrainer, ReflowTrainer, RegressionTrainer,
                       SCottTrainer, SlimFlowTrainer, SNOOPITrainer, SwiftBrushTrainer, TeacherTrainer, TSCDTrainer,
                       VSDTrainer, build_trainer, discover, get_method, load_config, register, resolve)

__all__ = ["ACDTrainer", "AGDTrainer", "CFGAdapterTrainer", "DiversityGuidanceTrainer", "GuidanceDistillTrainer",
           "HiPATrainer", "LoRADistillTrainer", "ProgressiveDistillTrainer", "Callback", "ConsistencyTrainer", "DMD2Trainer", "DMDTrainer", "DecoupledDMDTrainer",
           "DisBackTrainer", "DistillTrainer", "FDistillTrainer", "ICTTrainer", "InstaFlowTrainer", "LCMLoRATrainer",
           "LCMTrainer", "METHODS", "MSDTrainer", "NamedTrainer", "NonFiniteLoss", "Objective", "PeriodicEval", "Phase",
           "RectifiedFlowDistillTrainer", "ReflowTrainer", "RegressionTrainer", "SCottTrainer", "SNOOPITrainer",
           "SampleGrid", "SlimFlowTrainer", "SwiftBrushTrainer", "TSCDTrainer",
           "TeacherTrainer", "VSDTrainer", "build_trainer", "discover", "get_method", "load_config", "register",
           "resolve"]
