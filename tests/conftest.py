import os

# The suite checks exact CPU arithmetic (bitwise resume, CPU generators), so it runs on the CPU on any machine.
# STEPDISTILL_TEST_CUDA=1 shows the GPU, for tests/test_cuda.py (the CUDA paths, skipped without a GPU).
if os.environ.get("STEPDISTILL_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention

from tiny import TINY_SCHEDULER, TINY_UNET, tiny_teacher_raw


@pytest.fixture
def tiny_teacher_config(tmp_path):
    from stepdistill.trainers import resolve

    def make(**train):
        return resolve(tiny_teacher_raw(tmp_path / "run", **train))

    return make


@pytest.fixture
def teacher_folder(tmp_path):
    """A tiny class-conditional v-prediction teacher saved as a Diffusers folder (10 classes, null class 10)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model
    from stepdistill.schedule import NoiseSchedule

    torch.manual_seed(0)
    unet, sched = UNet2DModel(**TINY_UNET), DDPMScheduler(**TINY_SCHEDULER)
    d = Denoiser(unet, NoiseSchedule.from_scheduler(sched), "v_prediction")
    return save_model(d, sched, tmp_path / "teacher", {"num_classes": 10, "resolution": 8, "channels": 1})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SD 1.5-, SDXL- and SD3-layout text-to-image teachers and their prompt files (tests/text_teachers.py)."""
    from text_teachers import build_assets

    return build_assets(tmp_path_factory.mktemp("text_teachers"))

