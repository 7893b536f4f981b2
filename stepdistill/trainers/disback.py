"""DisBack — Distribution Backtracking (Zhang et al. 2024, "Distribution Backtracking Builds A Faster Convergence
Trajectory for One-step Diffusion Distillation"). Official code: SYZhang0805/DisBack (a DMD2 fork); see
../shared/reference/methods.md 1.2.

Two stages, two methods on the one loop (each an ordinary run: checkpoints resume either mid-stage):

1. ``disback_record`` — *degradation recording*. A score model initialised from the teacher (DMD2's fake score)
   is trained with the denoising loss on the **initial** student's samples while the student stays frozen
   (DisBack's ``degradation.py``: DMD2 with the generator update switched off). Every ``record_every`` updates
   its weights are saved to ``RUN/path/score_<updates>.safetensors``: the path ``s_1, ..., s_N`` from the
   teacher ``s_0`` towards the initial student's score.
2. ``disback`` — *distribution backtracking*. DMD2, with the "real" score of the distribution-matching gradient
   walking the path backwards: ``s_N`` (closest to the initial student) for the first ``interval`` steps, then
   ``s_{N-1}``, ..., ``s_1``, and from step ``N * interval`` on the teacher itself (:func:`target_index`).
   The target is a function of the step alone, so a resumed run loads the same target.

Differences from the official code, on purpose: the path checkpoints hold the score backbone only (the official
loader reads a whole guidance-model state dict with ``strict=False`` into ``real_unet``, which may load nothing —
methods.md's caveat); the target's CFG scale is ``real_guidance_scale`` as for the teacher (as the official code);
stage 2 checks that stage 1 recorded the path of the same initial student (teacher, steps, recipe, clamp).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..backbones import unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..models import save_model
from .base import Phase
from .common import check_teacher
from .dmd import DMDConfig, DMDObjective
from .registry import register

PATH_DIR = "path"
RECORD_FILE = "record.json"
# what makes stage 1's initial student the same as stage 2's (the teacher's copy or a warm start, sampled like this)
_STUDENT_KEYS = ("student_steps", "recipe", "output_clamp", "generator_init")


# ------------------------------------------------------------------------------------------------ the math
def record_due(step: int, record_every: int) -> bool:
    """Stage 1 saves the score after the update of loop step ``step`` when ``(step + 1) % record_every == 0``:
    checkpoint ``i`` (1-based) holds ``i * record_every`` updates, so ``max_steps`` steps record
    ``max_steps // record_every`` checkpoints."""
    return (step + 1) % record_every == 0


def target_index(step: int, interval: int, num_recorded: int) -> int | None:
    """Stage 2's "real" score at loop step ``step``: the path checkpoint index (0-based, in recording order) or
    None for the teacher.

    ``k = floor(step / interval)``; while ``k < N`` the target is checkpoint ``N - 1 - k`` (the last recorded —
    nearest the initial student — first), from ``step = N * interval`` on the teacher."""
    k = step // interval
    return num_recorded - 1 - k if k < num_recorded else None


def path_files(folder: str | Path) -> list[Path]:
    """The recorded checkpoints of a stage-1 run (its folder or its ``path/`` folder), in recording order."""
    folder = Path(folder).expanduser()
    if (folder / PATH_DIR).is_dir():
        folder = folder / PATH_DIR
    return sorted(folder.glob("score_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))


def _save_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _is_main_process() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


# ------------------------------------------------------------------------------------------------ stage 1
@dataclass
class DisBackRecordConfig(DMDConfig):
    """DMD2's settings for the initial student and the score model (``label_dropout``, ``recipe``, ...) plus
    ``record_every``: save the score every this many updates (DisBack's script: 100)."""

    record_every: int = 100

    def validate(self):
        super().validate()
        if self.record_every < 1:
            raise ConfigError(f"objective.record_every must be >= 1, not {self.record_every}")
        if self.gan_weight_disc > 0 or self.regression_weight > 0:
            raise ConfigError("disback_record trains only the score model: set objective.gan_weight_gen, "
                              "gan_weight_disc and regression_weight to 0 (use them in the disback stage)")


@register
class DisBackRecordObjective(DMDObjective):
    """Stage 1: one phase, ``critic`` — DMD2's fake-score loss on the frozen initial student's samples; the
    path is written by :meth:`after_step`."""

    name = "disback_record"
    Config = DisBackRecordConfig
    ema_module = None
    path_dir: Path | None = None  # RUN/path, set by from_config
    source: str | None = None  # the teacher's model.source, written to record.json

    @classmethod
    def phases(cls, config):
        return [Phase("critic", ("fake_score",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"critic": super().optim_defaults(config)["critic"]}

    @classmethod
    def from_config(cls, run, data=None) -> "DisBackRecordObjective":
        objective = super().from_config(run, data)
        objective.path_dir = Path(run.output_dir) / PATH_DIR
        objective.source = run.model.source
        return objective

    def loss(self, phase, batch, step):
        if phase != "critic":  # pragma: no cover - the loop only runs declared phases
            raise ValueError(f"disback_record has no phase {phase!r}")
        return super().loss(phase, batch, step)

    def after_step(self, phase, step):
        if not record_due(step, self.config.record_every) or not _is_main_process():
            return
        if self.path_dir is None:
            raise RuntimeError("disback_record needs its run folder: build it with from_config(run) or set path_dir")
        updates = step + 1
        self.path_dir.mkdir(parents=True, exist_ok=True)
        record = self.path_dir / RECORD_FILE
        if not record.is_file():
            info = {"teacher": self.source, "teacher_fingerprint": self.teacher_fingerprint,
                    "record_every": self.config.record_every,
                    "label_dropout": self.config.label_dropout, **{k: getattr(self.config, k) for k in _STUDENT_KEYS}}
            record.write_text(json.dumps(info, indent=1))
        backbone = unwrap(unwrap(self.fake_score).backbone)
        _save_atomic(backbone.state_dict(), self.path_dir / f"score_{updates:07d}.safetensors",
                     {"updates": str(updates), "format": "pt"})

    def save_pretrained(self, directory):
        """The score at the end of recording (the path's last point) as a model folder."""
        save_model(self.fake_score, self.teacher_scheduler, directory,
                   {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                    "disback": "path end (score of the initial student's samples)"})

    def export_spec(self):
        raise NotImplementedError("disback_record records the degradation path and trains no student; run the "
                                  "disback stage (objective.path = this run's folder) and export that run")


# ------------------------------------------------------------------------------------------------ stage 2
@dataclass
class DisBackConfig(DMDConfig):
    """DMD2's settings plus ``path``: stage 1's run folder (or its ``path/``); ``interval``: steps per target
    (DisBack: 1000); ``fake_score_init``: the fake score starts as the teacher (DMD2, the official code) or as the
    path's last score (``path_end``: already the initial student's score)."""

    path: str = ""
    interval: int = 1000
    fake_score_init: Literal["teacher", "path_end"] = "teacher"

    def validate(self):
        super().validate()
        if not self.path:
            raise ConfigError("objective.path: give the output_dir of a disback_record run (stage 1)")
        if self.interval < 1:
            raise ConfigError(f"objective.interval must be >= 1, not {self.interval}")


@register
class DisBackObjective(DMDObjective):
    """Stage 2: DMD2 whose real score is :func:`target_index` of the step — the recorded path in reverse, then
    the teacher. The path scores are loaded, one at a time, into a frozen copy of the teacher (``path_score``)."""

    name = "disback"
    Config = DisBackConfig

    @classmethod
    def from_config(cls, run, data=None) -> "DisBackObjective":
        objective = super().from_config(run, data)
        made_by = {"source": objective.recorded.get("teacher"),
                   "fingerprint": objective.recorded.get("teacher_fingerprint")}
        check_teacher(made_by, objective.teacher_fingerprint, f"the path in {run.objective.path}", run.model.source)
        return objective

    def __init__(self, config: DisBackConfig, teacher: Denoiser, teacher_scheduler, num_classes, resolution,
                 channels):
        super().__init__(config, teacher, teacher_scheduler, num_classes, resolution, channels)
        self.path = path_files(config.path)
        if not self.path:
            raise ConfigError(f"objective.path: {config.path} holds no recorded path (path/score_*.safetensors); "
                              "run the disback_record stage first")
        record = self.path[0].parent / RECORD_FILE
        recorded = json.loads(record.read_text()) if record.is_file() else {}
        for key in _STUDENT_KEYS:
            if key in recorded and recorded[key] != getattr(config, key):
                raise ConfigError(f"objective.{key} is {getattr(config, key)!r} but the path in {config.path} was "
                                  f"recorded for {recorded[key]!r}: the path belongs to another initial student")
        self.recorded = recorded
        if config.real_guidance_scale != 1 and recorded.get("label_dropout", 0) == 0:
            warnings.warn(f"objective.real_guidance_scale={config.real_guidance_scale} applies CFG to the path's "
                          "scores, but they were recorded without label dropout (their null class drifts from the "
                          "teacher's); record with objective.label_dropout > 0, or use guidance 1", stacklevel=2)
        self.path_score = teacher.clone(trainable=False).freeze()
        self._loaded: int | None = None  # a cache of which file path_score holds; the target comes from the step
        self._target: int | None = None
        if config.fake_score_init == "path_end":
            self._load_into(self.fake_score, len(self.path) - 1)

    def _load_into(self, score: Denoiser, index: int) -> None:
        from safetensors.torch import load_file

        state = load_file(str(self.path[index]))
        backbone = unwrap(unwrap(score).backbone)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{self.path[index]} does not fit this teacher's backbone (recorded from another "
                              f"teacher?): {str(exc).splitlines()[0]}") from exc

    def set_target(self, step: int) -> int | None:
        """Point the real score at the target of ``step`` (loading the checkpoint if another one is in place)."""
        index = target_index(step, self.config.interval, len(self.path))
        if index is not None and index != self._loaded:
            self._load_into(self.path_score, index)
            self._loaded = index
        self._target = index
        return index

    def target_updates(self, index: int | None) -> int:
        """How many stage-1 updates the target had (0: the teacher)."""
        return 0 if index is None else int(self.path[index].stem.split("_")[1])

    @property
    def real_score(self) -> Denoiser:
        """The network that is the real score now: the path checkpoint of the current target, or the teacher."""
        return self.teacher if self._target is None else self.path_score

    def real_score_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None) -> torch.Tensor:
        """DMD2's real score replaced by the current target (:meth:`set_target`), with the teacher's CFG scale
        (``guidance_scale``, None: ``real_guidance_scale``): ``grad = (x0_fake - x0_target) / mean|x - x0_target|``
        (:func:`~stepdistill.trainers.dmd.dmd_gradient`)."""
        scale = self.config.real_guidance_scale if guidance_scale is None else guidance_scale
        return self.real_score(x_t, t, cond, guidance_scale=scale)

    def loss(self, phase, batch, step):
        """DMD2's loss against the target of ``step``; the generator's logs add the target's stage-1 updates."""
        self.set_target(step)
        total, logs = super().loss(phase, batch, step)
        if phase == "generator":
            logs["target_updates"] = torch.tensor(float(self.target_updates(self._target)), device=total.device)
        return total, logs
