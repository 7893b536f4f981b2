"""AGD, adapter guidance distillation (Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using
Adapters"; cristianpjensen/agd ``agd/sd/train.py``, ../shared/reference/methods.md 1.5).

A frozen base gets small adapters conditioned on the guidance scale (:mod:`stepdistill.guided`: agd's ``--arch
attention`` adapter on each attention output — the cross-attention of SD-style UNets, every attention of the digits
UNet, DiT's self-attention — hidden width ``hidden_dim`` (agd: 320), ``out_proj`` zero-initialised so the adapted
model starts as the base), about 2-3% of the parameters (SD 1.5 at hidden 320: 23.1M of 859.5M, 2.7%). Only the
adapters train, on the teacher's CFG-guided sampling trajectories, cached once like make-pairs
(:mod:`stepdistill.trajectories`: points ``x_t``, the guided noise ``eps_cfg = eps_u + s (eps_c - eps_u)``, ``t``,
``s ~ U[guidance_range]``; agd: U[1, 12] for SD)::

    L = mse(eps_student(x_t, t, c; s), eps_cfg)                                    (:func:`agd_loss`)

with AdamW at lr 1e-4, no weight decay (agd's defaults). Training on the teacher's own guided trajectories, rather than
on noised data, is what lets the one-call student follow the guided sampling path.

The adapters save as a file of their own (``guidance_adapters.safetensors``) and load onto the base or any fine-tune of
the same architecture (a base of another architecture is refused, naming the difference). The export is the base
pipeline plus that file; one documented call loads it::

    pipe = DiffusionPipeline.from_pretrained(EXPORT)            # the base model (CFG, two calls per step)
    load_guidance_adapters(pipe, EXPORT)                         # stepdistill.pipelines: one call per step

after which the pipeline's ``guidance_scale`` drives the adapters (StableDiffusion(XL)Pipeline and
ClassConditionalPipeline pass it as ``timestep_cond``; DiTPipeline has no guidance input: call it with
``guidance_scale=1`` and the adapters run at the exported scale). The trainable fraction is logged
(``trainable_fraction``) and written to the export's card and stepdistill.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..backbones import in_channels, sample_size, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..guided import (ADAPTER_FILE, adapter_fraction, base_config, base_state_dict, install_guidance_adapters,
                      save_guidance_adapters)
from ..models import META_FILE, load_model, text_null_cond
from ..pipelines.recipes import get_recipe
from ..pipelines.sampling import sample_student
from ..pipelines.spec import ExportSpec, one_call_pipeline
from ..pipelines.weights import write_model
from ..trajectories import MANIFEST, TrajectorySet, make_trajectories
from .base import Objective, Phase
from .common import teacher_fingerprint
from .registry import register


def agd_loss(eps_student: torch.Tensor, eps_cfg: torch.Tensor) -> torch.Tensor:
    """``mse(eps_student(x_t, t, c; s), eps_cfg)`` (agd ``train.py``: ``F.mse_loss(eps_student, eps_teacher)``)."""
    return torch.mean((eps_student.float() - eps_cfg.float()) ** 2)


@dataclass
class AGDConfig:
    hidden_dim: int = 320  # agd --hidden-dim
    embed_dim: int = 256  # the guidance embedding's width (time_cond_proj_dim the pipelines embed w = s - 1 in)
    num_heads: int = 1
    mlp_ratio: float = 4.0
    use_timestep: bool = False  # agd --use-timestep: a timestep token beside the guidance token
    targets: list[str] | None = None  # fnmatch patterns of the attention modules (None: the family's, see guided.py)
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 12.0])  # agd SD: U[1, 12]
    trajectories: str | None = None  # the trajectory cache (None: <output_dir>/cache/agd-trajectories)
    num_trajectories: int = 1024
    trajectory_steps: int = 50  # the teacher's DDIM steps per trajectory
    labels: Literal["balanced", "random"] = "balanced"
    trajectory_batch_size: int = 64
    sample_steps: int = 25  # the exported pipeline's DDIM steps (trailing spacing)
    sample_guidance: float | None = None  # its guidance_scale (None: the middle of guidance_range)

    def validate(self):
        r = self.guidance_range
        if len(r) != 2 or not 1 <= r[0] <= r[1]:
            raise ConfigError(f"objective.guidance_range is [s_min, s_max] with 1 <= s_min <= s_max, not {r}")
        if self.sample_guidance is not None and not r[0] <= self.sample_guidance <= r[1]:
            raise ConfigError(f"objective.sample_guidance={self.sample_guidance} is outside guidance_range {r}")
        for key in ("hidden_dim", "embed_dim", "num_heads", "num_trajectories", "trajectory_steps", "sample_steps",
                    "trajectory_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"objective.{key} must be >= 1")
        if self.hidden_dim % (2 * self.num_heads):
            raise ConfigError("objective.hidden_dim must be even and divisible by objective.num_heads")


@register
class AGDObjective(Objective):
    """AGD on the one loop: phase ``student``, whose only trainable parameters are the adapters (the base is the
    teacher's own weights, shared)."""

    name = "agd"
    Config = AGDConfig

    def __init__(self, config: AGDConfig, teacher: Denoiser, teacher_scheduler, num_classes, resolution, channels):
        super().__init__(config)
        self.teacher = teacher.freeze()
        self.teacher_scheduler = teacher_scheduler
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.null_cond = teacher.null_cond
        self.student = teacher.clone(trainable=False, share_weights=True)
        try:
            install_guidance_adapters(self.student.backbone, hidden_dim=config.hidden_dim, embed_dim=config.embed_dim,
                                      num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                                      use_timestep=config.use_timestep, targets=config.targets,
                                      guidance_range=config.guidance_range)
        except ValueError as exc:
            raise ConfigError(f"objective.targets: {exc}") from None
        self.fraction = adapter_fraction(self.student.backbone)
        guidance = config.sample_guidance or sum(config.guidance_range) / 2
        self.recipe = get_recipe("ddim_trailing", config.sample_steps, guidance)
        self.pipeline = one_call_pipeline(self.student)
        spec = ExportSpec(self.student, self.recipe, teacher_scheduler, pipeline=self.pipeline)
        self.timesteps = spec.run_timesteps()
        self.trajectories: TrajectorySet | None = None

    @classmethod
    def phases(cls, config):
        return [Phase("student", ("student",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"student": {"lr": 1e-4, "weight_decay": 0.0, "max_grad_norm": None, "lr_schedule": "constant",
                            "warmup_steps": 0}}  # agd: AdamW lr 1e-4, wd 0

    @classmethod
    def from_config(cls, run, data=None) -> "AGDObjective":
        cfg = run.objective
        loaded = load_model(run.model)
        teacher = loaded.denoiser
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            teacher.null_cond = null
        if teacher.schedule.kind != "vp":
            raise ConfigError("AGD here caches DDIM trajectories of VP (DDPM-type) teachers")
        config = unwrap(teacher.backbone).config
        num_classes = loaded.meta.get("num_classes") or config.get("num_embeds_ada_norm")  # DiT: its class count
        if teacher.null_class is None and num_classes is not None:
            teacher.null_class = num_classes  # the null class is num_classes (DiT's; the digits teacher's 10)
        prompt_cond, prompts = None, None
        if null is not None:
            if data is None or not hasattr(data, "tensors"):
                raise ConfigError(f"the teacher {run.model.source!r} is text-conditioned: its trajectories follow "
                                  "prompts, so set data.dataset=prompts and data.path to a prompt file")
            prompt_cond, prompts = Cond.from_dict(data.tensors), list(data.prompts)
            num_classes = None
        elif num_classes is None:
            raise ConfigError("AGD distils classifier-free guidance: the teacher needs class labels with a null class "
                              "(num_classes in its stepdistill.json) or prompts")
        resolution = run.data.resolution or sample_size(teacher.backbone)
        channels = in_channels(teacher.backbone)
        objective = cls(cfg, teacher, loaded.scheduler, num_classes, resolution, channels)
        objective.teacher_fingerprint = teacher_fingerprint(teacher)
        if loaded.folder is not None and (loaded.folder / "model_index.json").is_file():
            objective.base_folder = loaded.folder
        folder = Path(cfg.trajectories) if cfg.trajectories else Path(run.output_dir) / "cache" / "agd-trajectories"
        objective.load_trajectories(folder, prompt_cond, prompts, run.train.seed)
        return objective

    def load_trajectories(self, folder: Path, prompt_cond=None, prompts=None, seed: int = 0) -> None:
        """Make (or finish) the trajectory cache in ``folder``, then read it."""
        cfg = self.config
        manifest = folder / MANIFEST
        if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
            make_trajectories(self.teacher, self.teacher_scheduler, folder, cfg.num_trajectories,
                              steps=cfg.trajectory_steps, guidance_range=cfg.guidance_range,
                              resolution=self.resolution, channels=self.channels, fingerprint=self.teacher_fingerprint,
                              num_classes=self.num_classes, prompt_cond=prompt_cond, prompts=prompts, seed=seed,
                              labels=cfg.labels, batch_size=cfg.trajectory_batch_size)
        self.trajectories = TrajectorySet(folder)
        made = self.trajectories.manifest
        if made.get("teacher_weights") != self.teacher_fingerprint:
            raise ConfigError(f"the trajectories in {folder} were made by another teacher: delete the folder (or set "
                              "objective.trajectories to another) to make them with this one")
        if list(map(float, made.get("guidance_range"))) != list(map(float, cfg.guidance_range)):
            raise ConfigError(f"the trajectories in {folder} were made for guidance_range "
                              f"{made.get('guidance_range')}, not {cfg.guidance_range}: use another "
                              "objective.trajectories folder")

    # --- the loss ------------------------------------------------------------------------------------
    def loss(self, phase, batch, step):
        n, device = batch["batch_size"], self.device
        idx = torch.randint(0, len(self.trajectories), (n,))
        points, cond = self.trajectories.rows(idx, device)
        eps = self.student(points["x"], points["t"], replace(cond, guidance=points["scale"]), output="epsilon")
        loss = agd_loss(eps, points["eps"])
        return loss, {"agd": loss.detach(), "trainable_fraction": torch.tensor(self.fraction["fraction"])}

    # --- sampling and export -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generator=None):
        n, device = batch["batch_size"], self.device
        cond = (Cond(class_labels=torch.arange(n, device=device) % self.num_classes) if self.num_classes
                else self.null_cond.to(device).repeat(n) if self.null_cond is not None else Cond())
        cond = replace(cond, guidance=torch.full((n,), self.recipe.guidance_scale, device=device))
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        spec = self.export_spec()
        return sample_student(self.student, spec.scheduler, noise, self.recipe.num_inference_steps, cond,
                              generator=generator, pipeline=spec.pipeline_name).clamp(-1, 1)

    def _meta(self) -> dict:
        return {"resolution": self.resolution, "channels": self.channels,
                "guidance_range": list(self.config.guidance_range), "trainable": dict(self.fraction)}

    def save_pretrained(self, directory):
        """The base (plain weights, its own config) and the adapters beside it: ``stepdistill.models`` loads both."""
        directory = Path(directory)
        backbone = unwrap(self.student.backbone)
        sub = "unet" if "UNet" in type(backbone).__name__ else "transformer"
        write_model(backbone, base_state_dict(backbone), directory / sub, config=base_config(backbone))
        self.teacher_scheduler.save_pretrained(directory / "scheduler")
        save_guidance_adapters(backbone, directory / ADAPTER_FILE, guidance_range=list(self.config.guidance_range))
        (directory / META_FILE).write_text(json.dumps({"prediction_type": self.student.prediction_type,
                                                       "num_classes": self.num_classes, **self._meta()}, indent=1))

    def export_spec(self):
        return ExportSpec(student=self.student, recipe=self.recipe, base_scheduler=self.teacher_scheduler,
                          method=self.name, num_classes=self.num_classes, timesteps=self.timesteps,
                          base_folder=getattr(self, "base_folder", None), meta=self._meta(), pipeline=self.pipeline)
