"""Schedulers for students that no stock scheduler config runs: :class:`StudentLCMScheduler` (trained timesteps no
stock config produces) and :class:`FlowMatchEulerUniformScheduler` (a rectified-flow UNet in a stock Stable Diffusion
pipeline).

Almost every distilled model ships with a stock scheduler (see :mod:`stepdistill.pipelines.recipes`). A few
paper recipes pick timesteps that no stock config yields by default — for example a multi-step student at
``[999, 600, 300]`` — and their releases ask users to pass ``timesteps=[...]`` at every call. An export must run
the trained timesteps with nothing passed by hand, so for those :class:`StudentLCMScheduler` records them in its
config. It is an ``LCMScheduler`` (x0 prediction, then fresh noise to the next timestep) in every other respect.

A folder that uses it needs stepdistill installed: it loads with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` through a one-line
``scheduler/scheduler.py`` that imports this class.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler
from diffusers.configuration_utils import register_to_config


class StudentLCMScheduler(LCMScheduler):
    """``LCMScheduler`` whose default timesteps are ``trained_timesteps`` (config).

    ``set_timesteps(K)`` with ``K == len(trained_timesteps)`` (or ``None``) runs exactly the trained timesteps; any
    other ``K`` is an error that names the right call (the student was trained for those steps only). Explicit
    ``timesteps=[...]`` and ``strength < 1`` (img2img) fall through to ``LCMScheduler``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False, trained_timesteps: list[int] | None = None):
        # the undecorated LCMScheduler.__init__: a second register_to_config would mark every value as a default
        LCMScheduler.__init__.__wrapped__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                          original_inference_steps, clip_sample, clip_sample_range, set_alpha_to_one,
                                          steps_offset, prediction_type, thresholding, dynamic_thresholding_ratio,
                                          sample_max_value, timestep_spacing, timestep_scaling, rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, original_inference_steps=None,
                      timesteps: list[int] | None = None, strength: float = 1.0) -> None:
        trained = self.config.trained_timesteps
        if not trained or timesteps is not None or strength != 1.0:
            return super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
        if num_inference_steps not in (None, len(trained)):
            raise ValueError(f"this student was trained for {len(trained)} step(s) at timesteps {list(trained)}; "
                             f"call the pipeline with num_inference_steps={len(trained)} (got {num_inference_steps})")
        trained = [int(t) for t in trained]
        if any(b >= a for a, b in zip(trained, trained[1:])) or trained[0] >= self.config.num_train_timesteps:
            raise ValueError(f"trained_timesteps must decrease and stay below num_train_timesteps: {trained}")
        self.num_inference_steps = len(trained)
        self.custom_timesteps = True
        self.timesteps = torch.tensor(trained, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None


class FlowMatchEulerUniformScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` that a stock ``StableDiffusionPipeline`` (or SDXL's) can run, for UNets
    trained as rectified flows (InstaFlow's 2-RF of SD 1.5 and its one-step student).

    Those pipelines read ``scheduler.init_noise_sigma`` and call ``scheduler.scale_model_input``, which the stock
    flow schedulers lack; here they are 1 and the identity (flow sampling starts from unit noise and feeds it to the
    network as is). ``set_timesteps(K)`` runs the uniform Euler grid ``sigma = 1, 1 - 1/K, ..., 1/K`` (then 0),
    InstaFlow's ``RectifiedFlowPipeline`` timesteps ``(1 - i/K) * 1000``, under the config's ``shift`` (1 for a
    rectified flow); explicit ``sigmas`` or ``timesteps`` fall through to the parent. Each step is the parent's
    Euler step ``x' = x + (sigma' - sigma) u`` on the velocity ``u = eps - x0``.

    A folder that uses it needs stepdistill installed (``trust_remote_code=True`` through a one-line
    ``scheduler/scheduler.py`` shim, as :class:`StudentLCMScheduler`).
    """

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None) -> None:
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            import numpy as np

            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        return super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
