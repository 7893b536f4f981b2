"""The Objective contract: what a method tells the one training loop.

An objective owns its networks as attributes (``self.student``, ``self.fake_score``, ...), declares its
phases — named groups of those attributes with their own optimizer and update ratio — and computes
``loss(phase, batch, step) -> (loss, logs)``. It never touches devices, precision, DDP or checkpoints:
the loop moves it to the device, wraps the phase's modules, and switches ``requires_grad`` so that a
phase's backward reaches only that phase's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError


@dataclass
class Phase:
    """``modules``: attribute names of the objective trained in this phase (each in at most one phase)."""

    name: str
    modules: tuple[str, ...]


TEACHER_FILE = "teacher.json"  # in a run folder: the teacher it distilled (model.source and its fingerprint)


class Objective(torch.nn.Module):
    """Base class of every method. Subclasses set ``name`` and ``Config`` and implement the hooks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    ema_module: ClassVar[str | None] = "student"  # the module the loop keeps an EMA of (None: no EMA)
    # frozen modules whose weights the objective itself changes (e.g. an EMA target network in after_step): the
    # loop checkpoints and restores them with the trained ones
    state_modules: ClassVar[tuple[str, ...]] = ()
    # the distilled teacher's fingerprint (trainers.common.teacher_fingerprint): the loop records it in the run folder
    # (teacher.json), so that a warm start from this run can be checked against the teacher it is used with
    teacher_fingerprint: str | None = None

    def __init__(self, config):
        super().__init__()
        self.config = config

    # --- declared by subclasses -----------------------------------------------------------------
    @classmethod
    def phases(cls, config) -> list[Phase]:
        """The phases of the method under ``config``: each a name and the attributes of the objective it trains."""
        raise NotImplementedError

    @classmethod
    def optim_defaults(cls, config) -> dict[str, dict]:
        """Default optimizer settings per phase (the recipe's values); the user's ``optim`` overrides them."""
        return {}

    @classmethod
    def from_config(cls, run) -> "Objective":
        """Build the objective (load the teacher, make the student, ...) from a RunConfig."""
        raise NotImplementedError

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar to minimise for ``phase`` and the named terms to log (and check for NaN)."""
        raise NotImplementedError

    def after_step(self, phase: str, step: int) -> None:
        """Called after the optimizer step of ``phase`` (e.g. an EMA target network update)."""

    def set_step(self, steps_done: int) -> None:
        """The loop says how many training steps are done: after each step and on resume (so also before export,
        which loads a checkpoint), e.g. for a staged method whose sampling depends on the stage."""

    @torch.no_grad()
    def sample(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] from the model being trained, for sample grids and evaluation."""
        raise NotImplementedError

    def save_pretrained(self, directory) -> None:
        """Write the trained model as a Diffusers folder (called by the loop at the end of training)."""

    def export_spec(self):
        """What ``stepdistill export`` writes: a :class:`stepdistill.pipelines.ExportSpec` with the student
        Denoiser, the recipe it samples with (scheduler, steps, guidance; see ``stepdistill.pipelines.recipes``),
        the teacher's scheduler and folder, and metadata for the model card. A K-step student should train at
        ``stepdistill.pipelines.export_timesteps(student, recipe, teacher_scheduler)`` (and say so in
        ``ExportSpec.timesteps``), so that the exported pipeline runs exactly what was trained."""
        raise NotImplementedError(f"method {self.name!r} does not implement export_spec()")

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def source_channels(model_in_channels: int, image_channels: int, data, sample_every: int) -> int:
    """The channels of the source image an image-conditioned model takes beside the sample (``model_in_channels -
    image_channels``; 0 for an ordinary model), checked against the data: a ConfigError when the model needs
    source images and the data has none (or of another size), or when the run asks for sample grids, which would
    need sources."""
    n = model_in_channels - image_channels
    has_source = data is not None and len(data) > 0 and "source_image" in data[0]
    if n > 0 and not has_source:
        raise ConfigError(f"the model is image-conditioned (it takes {model_in_channels} input channels: "
                          f"{image_channels} of the image and {n} of a source image) and the data has no source "
                          "images: set data.source_resolution (super-resolution sources)")
    if n < 0 or (has_source and n != data[0]["source_image"].shape[0]):
        given = f" and {data[0]['source_image'].shape[0]}-channel source images" if has_source else ""
        raise ConfigError(f"the model takes {model_in_channels} input channels, but the data has {image_channels}-"
                          f"channel images{given}: set the model's in_channels to the sum")
    if n and sample_every:
        raise ConfigError("an image-conditioned model samples from source images: set train.sample_every=0 and "
                          "evaluate the export (stepdistill eval)")
    return n
