"""Tiny runs of every registered method, for the contract test (tests/test_contract.py).

A method trains here from the tiny class-conditional teacher on 8x8 digits with its own defaults; ``SETUPS`` holds
only what a method needs beyond that (data of another kind, a teacher of another kind, a setting without which
the tiny run cannot work). A method registered tomorrow is checked without an entry when its defaults suffice.
"""
from __future__ import annotations

import os
import signal

import torch

from stepdistill.trainers import Callback, build_trainer, resolve
from tiny import TINY_SCHEDULER, TINY_UNET, tiny_teacher_raw

MAX_STEPS = 4
STOP_AT = 2


class StopAt(Callback):
    """Sends the run SIGTERM at the end of ``step``: the loop checkpoints and returns, as on a cluster's pre-emption."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def sr_teacher(folder):
    """A tiny image-conditioned teacher (the 8x8 digit's 4x4 source on a second channel) as a Diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model
    from stepdistill.schedule import NoiseSchedule

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "in_channels": 2, "num_class_embeds": None})
    sched = DDPMScheduler(**TINY_SCHEDULER)
    denoiser = Denoiser(unet, NoiseSchedule.from_scheduler(sched), "v_prediction")
    return save_model(denoiser, sched, folder, {"resolution": 8, "channels": 1, "source_resolution": 4})


def _new_model(raw, tmp, teacher):
    """Methods that build their model from a config (teacher training, consistency training from data)."""
    raw["model"] = tiny_teacher_raw(tmp)["model"]


def _pairs(raw, tmp, teacher):
    from stepdistill.pairs import make_pairs

    make_pairs(str(teacher), tmp / "pairs", 16, nfe=2, shard_size=16, batch_size=16, progress=False)
    raw["data"] = {"dataset": "pairs", "path": str(tmp / "pairs"), "resolution": 8, "channels": 1}


def flow_teacher(folder):
    """The tiny class-conditional teacher as a flow-matching model (FlowMatchEulerDiscreteScheduler, shift 1), as a
    Diffusers folder: what the rectified-flow methods straighten."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.models import save_model
    from stepdistill.schedule import NoiseSchedule

    torch.manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    denoiser = Denoiser(UNet2DModel(**TINY_UNET), NoiseSchedule.from_scheduler(sched), "flow")
    return save_model(denoiser, sched, folder, {"num_classes": 10, "resolution": 8, "channels": 1})


def _flow_pairs(raw, tmp, teacher):
    """Pairs of the tiny flow teacher, which becomes the run's model (the rectified-flow methods)."""
    flow = flow_teacher(tmp / "flow_teacher")
    raw["model"] = {"source": str(flow)}
    _pairs(raw, tmp, flow)


def _source_images(raw, tmp, teacher):
    raw["model"] = {"source": str(sr_teacher(tmp / "sr_teacher"))}
    raw["data"]["source_resolution"] = 4
    raw["train"]["sample_every"] = 0


def _recorded_path(raw, tmp, teacher):
    record = contract_run("disback_record", tmp / "record", teacher)
    record.train.max_steps = 2
    build_trainer(record).train(resume=None)
    raw["objective"]["path"] = record.output_dir


def _image_free(raw, tmp, teacher):
    """Image-free methods (SwiftBrush, SNOOPI) refuse image data: class labels are drawn at random."""
    raw["data"] = {"dataset": "none", "resolution": 8, "channels": 1}


#: method -> (changes to the raw config, objective settings): only what the defaults cannot do on the tiny run
SETUPS = {
    "teacher": (_new_model, {"sample_steps": 1}),
    "ict": (_new_model, {"s0": 2, "s1": 8, "student_steps": 1}),
    "regression": (_pairs, {}),
    "acd": (_source_images, {"num_ddim_timesteps": 50, "student_steps": 1}),
    "disback": (_recorded_path, {"interval": 1}),
    "disback_record": (None, {"record_every": 1}),
    "lcm": (None, {"num_ddim_timesteps": 50, "student_steps": 1}),
    "scott": (None, {"num_ddim_timesteps": 50, "student_steps": 1}),
    "lcm_lora": (None, {"num_ddim_timesteps": 50, "student_steps": 1, "lora_rank": 4}),
    "tscd": (None, {"num_ddim_timesteps": 40, "student_steps": 1}),
    "reflow": (_flow_pairs, {}),
    "rf_distill": (_flow_pairs, {}),
    "instaflow": (_pairs, {}),  # the VP teacher's pairs: its weights become the flow student (InstaFlow's 2-RF)
    "slimflow": (_flow_pairs, {"student_config": {"block_out_channels": [8, 16], "norm_num_groups": 4},
                               "warmup_N": 2}),
    "guidance": (None, {"guidance_embedding_dim": 8, "sample_steps": 2}),
    "diversity_guidance": (None, {"guidance_embedding_dim": 8, "sample_steps": 2, "groups": 2, "group_size": 2}),
    "progressive": (None, {"teacher_steps": 4}),
    "agd": (None, {"hidden_dim": 8, "embed_dim": 8, "num_trajectories": 4, "trajectory_steps": 2, "sample_steps": 2}),
    "hipa": (_pairs, {"generator_lora_rank": 2}),
    "swiftbrush": (_image_free, {}),
    "snoopi": (_image_free, {}),
}


def contract_run(method: str, tmp, teacher, **train):
    """The RunConfig of a tiny ``method`` run in ``tmp`` distilling ``teacher``: every phase updates every step."""
    raw = tiny_teacher_raw(tmp / "run", max_steps=MAX_STEPS, **train)
    raw["method"] = method
    raw["model"] = {"source": str(teacher)}
    raw.pop("optim")
    change, objective = SETUPS.get(method, (None, {}))
    raw["objective"] = dict(objective)
    if change is not None:
        change(raw, tmp, teacher)
    run = resolve(raw)
    for optim in run.optim.values():
        optim.every, optim.warmup_steps, optim.lr = 1, 0, 1e-3
    return run
