"""The README's sample grid of the shipped digits teacher: 50-step DDIM, guidance 1, one column per class.

    python scripts/teacher_grid.py [OUT.png]
"""
import sys

import torch
from diffusers import DDIMScheduler

from stepdistill.data import save_grid
from stepdistill.models import load_model
from stepdistill.config import ModelConfig
from stepdistill.pipelines import ClassConditionalPipeline

out = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/digits-teacher/teacher_ddim50.png"
teacher = load_model(ModelConfig(source="digits-teacher"))
pipe = ClassConditionalPipeline(teacher.denoiser.backbone, DDIMScheduler.from_config(teacher.scheduler.config),
                                num_inference_steps=50, null_class=10)
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels=torch.arange(100) % 10, generator=torch.Generator().manual_seed(0), output_type="pt").images
print(save_grid(images * 2 - 1, out, nrow=10, scale=3))
