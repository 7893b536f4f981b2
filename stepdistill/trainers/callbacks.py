"""Callbacks of the training loop: sample grids and periodic evaluation."""
from __future__ import annotations


class Callback:
    """Hooks the loop calls with itself (the :class:`~stepdistill.trainers.engine.DistillTrainer`)."""

    def on_step_end(self, trainer, step: int) -> None: ...

    def on_train_end(self, trainer) -> None: ...


class SampleGrid(Callback):
    """Every ``every`` steps, a PNG grid of the (EMA) model's samples under ``OUTPUT/samples``."""

    def __init__(self, every: int, num_samples: int = 64):
        self.every, self.num_samples = every, num_samples

    def on_step_end(self, trainer, step):
        if self.every and step % self.every == 0:
            trainer.save_samples(trainer.output_dir / "samples" / f"step_{step:07d}.png", self.num_samples)


class PeriodicEval(Callback):
    """Every ``every`` steps, ``fn(trainer, step) -> dict`` of metrics, logged like the losses."""

    def __init__(self, every: int, fn):
        self.every, self.fn = every, fn

    def on_step_end(self, trainer, step):
        if self.every and step % self.every == 0:
            trainer.log(step, {f"eval/{k}": v for k, v in self.fn(trainer, step).items()})
