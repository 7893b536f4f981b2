import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention

from tiny import tiny_teacher_raw


@pytest.fixture
def tiny_teacher_config(tmp_path):
    from stepdistill.config import resolve

    def make(**train):
        return resolve(tiny_teacher_raw(tmp_path / "run", **train))

    return make
