"""Multi-Student Distillation (MSD; Song et al. 2024, "Multi-student Diffusion Distillation for Better One-step
Generators", arXiv 2410.23274). No official code; see ../shared/reference/methods.md 1.2.

K students each own a part of the conditioning set (here: a partition of the class labels) and each is
distilled with DMD2 from the shared teacher. A batch is routed per sample: sample i is made (and its
distribution-matching, fake-score and GAN terms computed) by the student that owns its class, so one batch
mixes students and every student sees only its own classes. Students may be smaller than the teacher
(``student_backbone_config``); such students start from a short teacher-score-matching (TSM) stage, the method
``msd_tsm`` here, whose run folder ``msd`` then takes as ``objective.student_init``.

Choices (the paper leaves them open or we could not verify them; methods.md marks them "verify in PDF"):

- **Partition**: ``partition: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]`` (class ids per student); default: the classes
  split evenly into ``num_students`` contiguous groups (sizes differ by at most one). Every class must have
  exactly one student. Text teachers: ``prompt_partition: [["dog", "cat"], ["car", "street"]]`` — keywords per
  student, matched as whole words; a prompt goes to the one student whose keywords it contains, or to
  ``default_student`` when it contains none (every training prompt is checked before training starts). The
  exported pipeline routes each prompt by the same rule.
- **Fake scores**: one per student (``fake_score: per_student``, the paper's independent students), each with its
  own discriminator head; ``shared`` is one fake score (and head) for all students — cheaper, and since it is
  conditional it still models each class's student.
- **Phases**: all students form the ``generator`` phase and all fake scores (+ heads) the ``critic`` phase, so
  DMD2's two time-scale rule, the loop's EMA (of every student) and its checkpoints work unchanged. The students'
  losses are independent (a sample reaches one student); they share one AdamW (per-parameter, so each student's
  step is its own) and one gradient-norm clip.
- **TSM** (smaller students): ``msd_tsm`` trains the students with the denoising loss against the teacher's
  predictions on noised data images, ``|| s_theta(x_t, t, c) - s_teacher(x_t, t, c) ||^2`` in the teacher's
  parameterisation (:func:`tsm_loss`), each student on its own classes. Its own optimizer and learning rate (a
  randomly initialised student needs a far larger one than DMD2's) is why it is a separate run. The fake scores
  stay teacher-sized (initialised from the teacher, as DMD2's).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones import unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..models import load_model, save_model
from ..pipelines.routing import RoutedDenoiser, RoutedFeatures, RoutedHeads, prompt_owners, student_of
from ..solvers import sample as solve, scheduler_timesteps
from .base import Objective, Phase
from .common import new_student
from .dmd import DMDConfig, DMDObjective
from .registry import register

STUDENTS_FILE = "multi_student.json"


# ------------------------------------------------------------------------------------------------ the math
def even_partition(num_classes: int, num_students: int) -> list[list[int]]:
    """Classes ``0..C-1`` in ``K`` contiguous groups whose sizes differ by at most one (the first ``C mod K``
    groups get ``ceil(C/K)``): 10 classes, 2 students -> ``[[0..4], [5..9]]``."""
    if not 1 <= num_students <= num_classes:
        raise ConfigError(f"objective.num_students must be between 1 and the number of classes ({num_classes}), "
                          f"not {num_students}")
    base, extra = divmod(num_classes, num_students)
    out, start = [], 0
    for k in range(num_students):
        size = base + (1 if k < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def owner_table(partition: list[list[int]], num_classes: int) -> list[int]:
    """The routing table ``owner[c] = k`` for ``c in partition[k]``.

    A partition must cover every class ``0..C-1`` exactly once: classes without a student, classes owned by
    several students, unknown classes and students without classes are a ConfigError naming them."""
    owner: dict[int, int] = {}
    dup, unknown = {}, []
    for k, group in enumerate(partition):
        if not group:
            raise ConfigError(f"objective.partition: student {k} owns no class; give every student at least one")
        for c in group:
            if not 0 <= c < num_classes:
                unknown.append(c)
            elif c in owner:
                dup.setdefault(c, [owner[c]]).append(k)
            else:
                owner[c] = k
    if unknown:
        raise ConfigError(f"objective.partition names class(es) {sorted(set(unknown))} that do not exist (the "
                          f"teacher has classes 0..{num_classes - 1})")
    if dup:
        detail = "; ".join(f"class {c}: students {ks}" for c, ks in sorted(dup.items()))
        raise ConfigError(f"objective.partition gives class(es) {sorted(dup)} to more than one student ({detail}); "
                          "each class needs exactly one")
    missing = [c for c in range(num_classes) if c not in owner]
    if missing:
        raise ConfigError(f"objective.partition leaves class(es) {missing} without a student; add them to a group")
    return [owner[c] for c in range(num_classes)]


def tsm_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """Teacher score matching (MSD's pretraining of smaller students): the denoising loss with the teacher's
    prediction as the target, ``E_{x0, eps, t} || s_theta(x_t, t, c) - sg(s_teacher(x_t, t, c)) ||^2``, in the
    teacher's parameterisation (eps / v / x0 / flow), float32."""
    return F.mse_loss(student_pred.float(), teacher_pred.detach().float())


# ------------------------------------------------------------------------------------------------ students
def check_routable(num_classes: int | None, cfg) -> None:
    """Class teachers route by ``partition`` (class ids), text teachers by ``prompt_partition`` (keywords)."""
    if not num_classes and not hasattr(cfg, "prompt_partition"):
        raise ConfigError("msd_tsm pretrains class-routed students; a text teacher's MSD students start as copies "
                          "of the teacher (method msd with objective.prompt_partition)")
    if num_classes and getattr(cfg, "prompt_partition", None):
        raise ConfigError("objective.prompt_partition routes text prompts; this teacher is class-conditional: use "
                          "objective.partition (class ids per student)")
    if not num_classes and not cfg.prompt_partition:
        raise ConfigError("MSD on a teacher without classes routes prompts by keywords: set "
                          "objective.prompt_partition: [[keywords of student 0], [keywords of student 1], ...] and, "
                          "for prompts with none of them, objective.default_student")


def make_student(teacher: Denoiser, overrides: dict) -> Denoiser:
    """A student: the teacher's copy (no overrides), or a new, randomly initialised backbone of the teacher's
    class whose config is the teacher's updated with ``overrides`` (e.g. fewer ``block_out_channels``) on the
    teacher's schedule and prediction type."""
    if not overrides:
        return teacher.clone(trainable=True)
    return new_student(teacher, overrides, "objective.student_backbone_config")


@torch.no_grad()
def check_student_output(student: Denoiser, teacher: Denoiser, k: int, num_classes: int, resolution: int,
                         channels: int) -> None:
    """A student must map the teacher's inputs to outputs of the teacher's shape (for its lowest and highest
    class); anything else is a ConfigError naming the shapes."""
    x = torch.zeros(2, channels, resolution, resolution, device=next(teacher.parameters()).device)
    cond = (Cond(class_labels=torch.tensor([0, num_classes - 1], device=x.device)) if num_classes
            else teacher.null_cond.to(x.device).repeat(2))
    t = torch.full((2,), 500.0, device=x.device)
    want = teacher(x, t, cond).shape
    try:
        got = student(x, t, cond).shape
    except Exception as exc:  # noqa: BLE001 - any failure of the student's forward is a config problem
        raise ConfigError(f"student {k} cannot take the teacher's input (shape {tuple(x.shape)}): "
                          f"{type(exc).__name__}: {exc}") from exc
    if got != want:
        raise ConfigError(f"student {k}'s output has shape {tuple(got)} but the teacher's has {tuple(want)}; "
                          "objective.student_backbone_config must keep the channels and sample size")


def students_folder(path: str | Path) -> Path:
    """The folder of saved students: ``path`` itself or, for a run folder, ``path/final``."""
    path = Path(path).expanduser()
    for folder in (path, path / "final"):
        if (folder / STUDENTS_FILE).is_file():
            return folder
    raise ConfigError(f"objective.student_init: {path} holds no saved students ({STUDENTS_FILE}); give the "
                      "output_dir of a finished msd_tsm (or msd) run")


def save_students(members: list[Denoiser], scheduler, directory, partition: list[list[int]], meta: dict) -> Path:
    """``directory/student_<k>/`` (a Diffusers model folder each) and ``directory/multi_student.json``."""
    directory = Path(directory)
    for k, (student, classes) in enumerate(zip(members, partition)):
        save_model(student, scheduler, directory / f"student_{k}", {**meta, "classes": classes})
    (directory / STUDENTS_FILE).write_text(json.dumps({"partition": partition, **meta}, indent=1))
    return directory


def load_students(members: list[Denoiser], path, partition: list[list[int]]) -> None:
    """Load saved students (from :func:`save_students`) into ``members``; the partition and each architecture
    must match (a ConfigError says which does not)."""
    from safetensors.torch import load_file

    folder = students_folder(path)
    saved = json.loads((folder / STUDENTS_FILE).read_text())
    if saved["partition"] != partition:
        raise ConfigError(f"objective.student_init: {folder} has students for the partition {saved['partition']}, "
                          f"this run uses {partition}; use the same objective.partition")
    for k, student in enumerate(members):
        files = sorted((folder / f"student_{k}").glob("*/diffusion_pytorch_model.safetensors"))
        if not files:
            raise ConfigError(f"objective.student_init: {folder / f'student_{k}'} has no weights")
        try:
            unwrap(student.backbone).load_state_dict(load_file(str(files[0])), strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"objective.student_init: student {k} in {folder} has another architecture than "
                              "this run's students (set objective.student_backbone_config as in the run that "
                              f"saved them): {str(exc).splitlines()[0]}") from exc


def build_students(teacher: Denoiser, cfg, num_classes: int | None, resolution: int, channels: int):
    """``(students, partition, owner)`` for a config with ``num_students`` / ``partition`` /
    ``student_backbone_config`` / ``student_init``; every check that can fail is a ConfigError."""
    check_routable(num_classes, cfg)
    if not num_classes:  # text: keyword groups, routed per prompt (owner None)
        partition, owner = [list(g) for g in cfg.prompt_partition], None
    else:
        partition = ([list(g) for g in cfg.partition] if cfg.partition
                     else even_partition(num_classes, cfg.num_students))
        owner = owner_table(partition, num_classes)
    if len(partition) != cfg.num_students:
        raise ConfigError(f"objective.partition has {len(partition)} groups but objective.num_students is "
                          f"{cfg.num_students}")
    students = [make_student(teacher, cfg.student_backbone_config) for _ in partition]
    for k, student in enumerate(students):
        check_student_output(student, teacher, k, num_classes, resolution, channels)
    if getattr(cfg, "student_init", None):
        load_students(students, cfg.student_init, partition)
    return students, partition, owner


def _validate_students(cfg) -> None:
    if cfg.num_students < 1:
        raise ConfigError(f"objective.num_students must be >= 1, not {cfg.num_students}")
    for key in ("partition", "prompt_partition"):
        groups = getattr(cfg, key, None)
        if groups is not None and len(groups) != cfg.num_students:
            raise ConfigError(f"objective.{key} has {len(groups)} groups but objective.num_students is "
                              f"{cfg.num_students}")
    default = getattr(cfg, "default_student", None)
    if default is not None and not 0 <= default < cfg.num_students:
        raise ConfigError(f"objective.default_student must name a student 0..{cfg.num_students - 1}, not {default}")


def _fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with newly initialised parameters (``reset_parameters`` of every layer)."""
    import copy

    other = copy.deepcopy(module)
    for m in other.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return other


# ------------------------------------------------------------------------------------------------ MSD (DMD2)
@dataclass
class MSDConfig(DMDConfig):
    """DMD2's settings (shared by every student) plus:

    ``num_students`` K; ``partition`` the class ids of each student (default: an even split); ``fake_score``
    ``per_student`` (the paper) or ``shared``; ``student_backbone_config`` overrides of the teacher's backbone
    config for smaller students (empty: students are copies of the teacher); ``student_init`` an ``msd_tsm``
    (or ``msd``) run folder whose saved students start this run (needed for smaller students)."""

    num_students: int = 2
    partition: list[list[int]] | None = None
    # text teachers: keywords per student (whole words, case-insensitive); a prompt goes to the one student whose
    # keywords it contains, or to default_student when it contains none
    prompt_partition: list[list[str]] | None = None
    default_student: int | None = None
    fake_score: Literal["per_student", "shared"] = "per_student"
    student_backbone_config: dict = field(default_factory=dict)
    student_init: str | None = None

    def validate(self):
        super().validate()
        _validate_students(self)
        if self.label_dropout > 0 and self.fake_score == "per_student":
            raise ConfigError("objective.label_dropout replaces labels by the null class, which no student owns: "
                              "with per-student fake scores keep it 0 (or use fake_score: shared)")


@register
class MSDObjective(DMDObjective):
    """MSD on the one loop: DMD2 with K routed students (``generator``), K routed fake scores and discriminator
    heads (``critic``); the rest — backward simulation, TTUR, GAN, export timesteps — is DMD2's."""

    name = "msd"
    Config = MSDConfig
    ema_module = "generator"

    _routed_heads = False  # per-student discriminator heads (set in __init__)
    partition: list | None = None  # set in __init__ (after DMD2's set-up, which already samples conditions)
    owner: list[int] | None = None

    @property
    def routes_prompts(self) -> bool:
        return self.partition is not None and self.owner is None

    def __init__(self, config: MSDConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        # DMD2's set-up (teacher, recipe, timesteps, one generator / fake score / head), then the routed modules
        # (DMD2's fake score and head become the first student's)
        super().__init__(config, teacher, teacher_scheduler, num_classes, resolution, channels)
        students, self.partition, self.owner = build_students(teacher, config, num_classes, resolution, channels)
        if config.student_backbone_config and not config.student_init:
            warnings.warn("MSD students smaller than the teacher start from random weights; pretrain them with "
                          "method msd_tsm and pass its run folder as objective.student_init", stacklevel=2)
        self.generator = RoutedDenoiser(students, self.owner)
        if config.fake_score == "per_student":
            k = len(students)
            self.fake_score = RoutedDenoiser([self.fake_score] + [teacher.clone(trainable=True) for _ in range(k - 1)],
                                             self.owner)
            if self.disc_head is not None:
                self.disc_head = RoutedHeads([self.disc_head] + [_fresh_copy(self.disc_head) for _ in range(k - 1)])
                self._routed_heads = True

    @classmethod
    def from_config(cls, run, data=None) -> "MSDObjective":
        objective = super().from_config(run, data)
        if objective.routes_prompts and getattr(data, "prompts", None):  # every training prompt needs one student
            try:
                prompt_owners(data.prompts, objective.partition, run.objective.default_student)
            except ValueError as exc:
                raise ConfigError(f"objective.prompt_partition: {exc}") from None
        return objective

    def _batch_cond(self, batch: dict) -> Cond:
        """Text students: the batch's prompts decide each sample's student (``cond.extra["student"]``)."""
        cond = super()._batch_cond(batch)
        if self.routes_prompts and cond.batch_size:
            students = prompt_owners(list(batch["prompt"]), self.partition, self.config.default_student,
                                     device=cond.encoder_hidden_states.device)
            cond = replace(cond, extra={**cond.extra, "student": students})
        return cond

    def _random_cond(self, n: int, device) -> Cond:
        cond = super()._random_cond(n, device)
        if self.routes_prompts:  # the empty prompt, spread over the students (sample grids)
            cond = replace(cond, extra={**cond.extra, "student": torch.arange(n, device=device) % len(self.partition)})
        return cond

    def _features(self, score, x, t, cond):
        """The fake score's bottleneck features; with per-student heads, tagged with each sample's student."""
        feats = score(x, t, cond, return_features=True)[1]
        if self._routed_heads:
            return RoutedFeatures(feats, student_of(cond, self.owner))
        return feats

    @property
    def students(self) -> list[Denoiser]:
        return list(unwrap(self.generator).members)

    def save_pretrained(self, directory):
        save_students(self.students, self.teacher_scheduler, directory, self.partition,
                      {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                       "student_steps": self.config.student_steps, "timesteps": self.timesteps})

    def export_spec(self):
        from ..pipelines.multi_student import MultiStudentSpec  # lazy: it imports Diffusers' pipelines

        return MultiStudentSpec(student=unwrap(self.generator), recipe=self.recipe,
                                base_scheduler=self.teacher_scheduler, method=self.name, num_classes=self.num_classes,
                                timesteps=self.timesteps, students=self.students, owner=self.owner,
                                keywords=self.partition if self.routes_prompts else None,
                                default_student=self.config.default_student,
                                base_folder=getattr(self, "base_folder", None),
                                meta={"resolution": self.resolution, "channels": self.channels,
                                      "partition": self.partition})


# ------------------------------------------------------------------------------------------------ TSM
@dataclass
class MSDTSMConfig:
    """Teacher score matching for (smaller) MSD students; ``num_students`` / ``partition`` /
    ``student_backbone_config`` as in :class:`MSDConfig` (use the same values in the ``msd`` run)."""

    num_students: int = 2
    partition: list[list[int]] | None = None
    student_backbone_config: dict = field(default_factory=dict)
    t_dist: Literal["uniform", "logit_normal", "lognormal"] = "uniform"
    sample_steps: int = 8  # DDIM steps for sample grids (TSM students are still multi-step models)

    def validate(self):
        _validate_students(self)


@register
class MSDTSMObjective(Objective):
    """Stage 1 for smaller MSD students: each student learns the teacher's prediction on its own classes
    (:func:`tsm_loss`) on data images noised at ``t ~ t_dist``. One phase, ``generator``."""

    name = "msd_tsm"
    Config = MSDTSMConfig
    ema_module = "generator"

    def __init__(self, config: MSDTSMConfig, teacher: Denoiser, teacher_scheduler, num_classes: int | None,
                 resolution: int, channels: int):
        super().__init__(config)
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.schedule = teacher.schedule
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        students, self.partition, self.owner = build_students(teacher, config, num_classes, resolution, channels)
        self.generator = RoutedDenoiser(students, self.owner)

    @classmethod
    def phases(cls, config):
        return [Phase("generator", ("generator",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"generator": {"lr": 2e-4, "warmup_steps": 0, "lr_schedule": "constant", "max_grad_norm": 1.0}}

    @classmethod
    def from_config(cls, run, data=None) -> "MSDTSMObjective":
        if data is None or len(data) == 0 or "image" not in data[0]:
            raise ConfigError("msd_tsm noises data images: set data.dataset to digits, folder or pairs")
        loaded = load_model(run.model)
        num_classes = loaded.meta.get("num_classes", getattr(data, "num_classes", None))
        return cls(run.objective, loaded.denoiser, loaded.scheduler, num_classes, run.data.resolution,
                   run.data.channels)

    def loss(self, phase, batch, step):
        x0 = batch["image"]
        cond = Cond.from_batch(batch)
        t = self.schedule.sample_t(x0.shape[0], self.config.t_dist, device=x0.device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        ptype = self.teacher.prediction_type
        with torch.no_grad():
            target = self.teacher(x_t, t, cond, output=ptype)
        loss = tsm_loss(self.generator(x_t, t, cond, output=ptype), target)
        return loss, {"tsm": loss.detach()}

    @property
    def students(self) -> list[Denoiser]:
        return list(unwrap(self.generator).members)

    @torch.no_grad()
    def sample(self, batch, generator=None):
        from diffusers import DDIMScheduler

        n = batch["batch_size"]
        device = self.device
        cond = Cond(class_labels=torch.arange(n, device=device) % self.num_classes)
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        ddim = DDIMScheduler.from_config(self.teacher_scheduler.config)
        timesteps = scheduler_timesteps(ddim, self.config.sample_steps)
        return solve(lambda x, t: self.generator(x, t, cond), self.schedule, noise, timesteps).clamp(-1, 1)

    def save_pretrained(self, directory):
        save_students(self.students, self.teacher_scheduler, directory, self.partition,
                      {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                       "stage": "msd_tsm"})

    def export_spec(self):
        raise NotImplementedError("msd_tsm pretrains MSD students; distil them with method msd "
                                  "(objective.student_init = this run's folder) and export that run")
