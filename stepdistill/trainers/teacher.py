"""Teacher training: the plain denoising loss (epsilon, v or flow matching), with label dropout for CFG.

The loss, :func:`~stepdistill.trainers.common.denoising_loss`, is also the DMD family's fake-score loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones import in_channels, unwrap
from ..conditioning import Cond
from ..config import ConfigError
from ..denoiser import Denoiser
from ..models import LoadedModel, check_resolution, load_model, save_model, text_null_cond
from ..pipelines.recipes import get_recipe
from ..pipelines.sampling import sample_student
from ..pipelines.spec import ExportSpec
from ..solvers import sample as solve, scheduler_timesteps
from .base import Objective, Phase, source_channels
from .common import denoising_loss
from .registry import register


@dataclass
class DenoisingConfig:
    label_dropout: float = 0.1  # probability of the null class, or of the empty prompt (caption dropout), for CFG
    t_dist: Literal["uniform", "logit_normal", "lognormal"] = "uniform"
    sample_steps: int = 50  # sampler steps for sample grids and the export: DDIM (VP), Euler (flow)
    sample_guidance: float = 1.0

    def validate(self):
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"objective.label_dropout must be in [0, 1), not {self.label_dropout}")


@register
class DenoisingObjective(Objective):
    """Train (or fine-tune) a diffusion/flow model with its own prediction type."""

    name = "teacher"
    Config = DenoisingConfig
    ema_module = "model"

    def __init__(self, config: DenoisingConfig, loaded: LoadedModel, num_classes: int | None, resolution: int,
                 channels: int):
        super().__init__(config)
        self.model: Denoiser = loaded.denoiser
        self.null_cond = loaded.denoiser.null_cond  # a text model's encoded empty prompt (kept here: DDP wraps model)
        self.model.requires_grad_(True).train()
        self.scheduler = loaded.scheduler
        self.source_folder = loaded.folder  # the teacher's Diffusers folder (VAE / text encoders for export)
        self.schedule, self.prediction_type = self.model.schedule, self.model.prediction_type
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.meta = {**loaded.meta, "num_classes": num_classes, "resolution": resolution, "channels": channels}
        if num_classes is not None:
            embeds = self.model.backbone.config.get("num_class_embeds")
            need = num_classes + (1 if config.label_dropout > 0 else 0)
            if embeds is None or embeds < need:
                raise ConfigError(f"the data has {num_classes} classes; with label dropout the backbone needs "
                                  f"num_class_embeds >= {need} (the null class is {num_classes}), it has {embeds}: "
                                  f"set model.backbone_config.num_class_embeds={need}")
            self.model.null_class = num_classes

    @classmethod
    def phases(cls, config):
        return [Phase("model", ("model",))]

    @classmethod
    def optim_defaults(cls, config):
        return {"model": {"lr": 2e-4, "warmup_steps": 100}}

    @classmethod
    def from_config(cls, run, data=None) -> "DenoisingObjective":
        loaded = load_model(run.model)
        check_resolution(loaded.denoiser.backbone, run.data.resolution)
        backbone = unwrap(loaded.denoiser.backbone)
        # a text teacher: its prompts are dropped to the encoded empty prompt, as its pipeline encodes it for CFG
        null = text_null_cond(run.model, run.cache_dir, run.data.resolution)
        if null is not None:
            loaded.denoiser.null_cond = null
            if data is None or len(data) == 0 or "encoder_hidden_states" not in data[0]:
                raise ConfigError(f"the model's pipeline folder {run.model.source!r} has text encoders: train it on "
                                  "prompts with images (data.dataset=prompts, data.path=a .jsonl naming an image "
                                  "per prompt)")
        # a latent model's data serve VAE latents: its channels are the data's, not data.channels (the pixels')
        channels = data[0]["image"].shape[0] if data is not None and len(data) else run.data.channels
        has_source = source_channels(in_channels(backbone), channels, data, run.train.sample_every) > 0
        # the data's classes are used only by a class-conditional backbone
        num_classes = getattr(data, "num_classes", None) if backbone.config.get("num_class_embeds") else None
        if backbone.config.get("num_class_embeds") and num_classes is None and data is not None:
            raise ConfigError(f"the backbone is class-conditional (num_class_embeds="
                              f"{backbone.config.num_class_embeds}) but the data has no class labels: put each "
                              "class's images in a sub-folder of data.path named after the class, or set "
                              "model.backbone_config.num_class_embeds=null for an unconditional teacher")
        objective = cls(run.objective, loaded, num_classes, run.data.resolution, channels)
        if getattr(data, "classes", None):  # an image folder's class names: label i is classes[i]
            objective.meta["class_names"] = list(data.classes)
        if has_source:  # its pipeline upsamples sources of this size (ImageConditionedPipeline)
            objective.meta["source_resolution"] = run.data.source_resolution
        return objective

    def loss(self, phase, batch, step):
        x0 = batch["image"]
        cond = Cond.from_batch(batch)
        if self.num_classes is None:
            cond.class_labels = None
        if self.config.label_dropout > 0 and (cond.class_labels is not None or self.null_cond is not None):
            drop = torch.rand(x0.shape[0], device=x0.device) < self.config.label_dropout
            cond = cond.dropped(drop, self.null_cond, null_class=self.num_classes)
        schedule = self.schedule
        t = schedule.sample_t(x0.shape[0], self.config.t_dist, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = schedule.add_noise(x0, noise, t)
        ptype = self.prediction_type
        pred = self.model(x_t, t, cond, output=ptype)
        loss = denoising_loss(pred, x0, noise, x_t, t, schedule, ptype)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, batch, generator=None, steps: int | None = None, guidance_scale: float | None = None):
        n = batch["batch_size"]
        model = self.model
        device = next(model.parameters()).device
        labels = batch.get("class_label")
        if labels is None and self.num_classes:
            labels = torch.arange(n, device=device) % self.num_classes
        cond = Cond(class_labels=labels)
        if self.null_cond is not None:  # a text model: the batch's prompts, or the empty prompt
            given = Cond.from_batch(batch)
            cond = (given[:n] if given.encoder_hidden_states is not None else self.null_cond.repeat(n)).to(device)
        noise = torch.randn(n, self.channels, self.resolution, self.resolution, generator=generator).to(device)
        steps = steps or self.config.sample_steps
        s = self.config.sample_guidance if guidance_scale is None else guidance_scale
        guided = labels is not None or self.null_cond is not None
        if self.schedule.kind == "flow":  # Euler on the velocity, exactly as the exported pipeline steps
            spec = self.export_spec(steps)
            return sample_student(model, spec.scheduler, noise, steps, cond, guidance_scale=s if guided else None,
                                  pipeline=spec.pipeline_name).clamp(-1, 1)
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler.config)
        fn = lambda x, t: model(x, t, cond, guidance_scale=s if guided else None)  # noqa: E731
        return solve(fn, self.schedule, noise, scheduler_timesteps(ddim, steps)).clamp(-1, 1)

    def save_pretrained(self, directory):
        save_model(self.model, self.scheduler, directory, self.meta)

    def export_spec(self, steps: int | None = None):
        """A teacher exports as DDIM (VP) or Euler on its flow schedule (``flow_euler``: a flow teacher's
        FlowMatchEulerDiscreteScheduler, K uniform Euler steps under ClassConditionalPipeline) at its
        ``sample_steps`` and ``sample_guidance`` — what :meth:`sample` runs."""
        from diffusers import DDIMScheduler

        steps = steps or self.config.sample_steps
        guidance = self.config.sample_guidance if self.num_classes or self.null_cond is not None else 1.0
        if self.schedule.kind == "flow":
            recipe = get_recipe("flow_euler", steps, guidance)
            trained = None  # the pipeline's own grid (checked by export)
        else:
            recipe = get_recipe("ddim", steps, guidance)
            trained = scheduler_timesteps(DDIMScheduler.from_config(self.scheduler.config), steps)
        return ExportSpec(student=self.model, recipe=recipe, base_scheduler=self.scheduler, method="teacher",
                          base_model=str(self.source_folder) if self.source_folder else None,
                          base_folder=self.source_folder, num_classes=self.num_classes, timesteps=trained,
                          meta=dict(self.meta))

