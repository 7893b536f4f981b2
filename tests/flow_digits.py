"""The digits flow teacher recipe (configs/teacher_digits_flow.yaml) trained for two steps at a reduced width, and
runs of the rectified-flow recipes on it: shared by tests/test_reflow.py and tests/test_slimflow.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stepdistill.trainers import build_trainer, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the teacher recipe's UNet at a quarter of its widths (the recipes' own architecture otherwise)
NARROW = ["model.backbone_config.block_out_channels=[8,16,16]", "model.backbone_config.norm_num_groups=4",
          "model.backbone_config.attention_head_dim=4", "model.backbone_config.layers_per_block=1"]
FAST = ["train.max_steps=2", "train.batch_size=4", "train.mixed_precision=no", "train.sample_every=0",
        "train.checkpoint_every=0", "train.progress=false", "train.log_every=1", "train.threads=1"]


def flow_teacher(out: Path, *extra) -> Path:
    """configs/teacher_digits_flow.yaml for two steps (narrow): the run folder (its final/ is the 1-RF)."""
    run = load_config(CONFIGS / "teacher_digits_flow.yaml",
                      [f"output_dir={out}", "objective.sample_steps=2", *NARROW, *FAST, *extra])
    build_trainer(run).train(resume=None)
    return out


def recipe(name: str, out: Path, source, pairs, *extra):
    """configs/<name>.yaml on ``source`` and ``pairs``: two steps of batch 4."""
    return load_config(CONFIGS / f"{name}.yaml", [f"output_dir={out}", f"model.source={source}",
                                                  f"data.path={pairs}", *FAST, "optim.student.warmup_steps=0", *extra])


def train(run):
    trainer = build_trainer(run)
    trainer.train(resume=None)
    return trainer


def logged(trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


def reload_matches(trainer, folder, n: int = 3):
    """The export at ``folder`` (a ClassConditionalPipeline) gives the trained student's own samples."""
    from stepdistill.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(folder)  # no trust_remote_code: our own one-line shim
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=list(range(n)), generator=torch.Generator().manual_seed(0), output_type="pt").images
    with trainer.ema_weights():
        samples = trainer.objective.sample({"batch_size": n}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (samples / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=2e-5)
    return pipe
