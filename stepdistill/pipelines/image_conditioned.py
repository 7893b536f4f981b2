"""A pipeline for image-conditioned pixel-space ``UNet2DModel`` teachers and students (the source image
concatenated to the sample on channels), e.g. the digits super-resolution teacher 8x8 -> 16x16, which no stock
Diffusers pipeline covers. Sampling is the scheduler's own loop, as in :class:`ClassConditionalPipeline`."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .class_conditional import ClassConditionalPipeline


class ImageConditionedPipeline(ClassConditionalPipeline):
    """``pipe(image=low_res, num_inference_steps=K)``: one output per source image.

    ``image``: the sources — a float tensor (B, C, h, w) in [-1, 1], or PIL images / uint8 arrays. Sources smaller
    than the model's ``sample_size`` are brought to it by nearest-neighbour upsampling, as in training
    (``data.source_resolution``: area-down, nearest-up); ``source_resolution`` in the config is the size the
    model was trained to upsample from. ``num_inference_steps`` (and ``eta``, TCD's gamma) default to the trained
    ones. No guidance: the source is the condition.
    """

    def __init__(self, unet, scheduler, num_inference_steps: int = 50, source_resolution: int | None = None,
                 eta: float | None = None):
        super(ClassConditionalPipeline, self).__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(num_inference_steps=num_inference_steps, source_resolution=source_resolution,
                                eta=eta)

    def _sources(self, image, size: tuple[int, int], device, dtype) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            src = image.float()
            if src.ndim == 3:
                src = src[None]
        else:
            images = image if isinstance(image, (list, tuple)) else [image]
            arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
            src = torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])).permute(0, 3, 1, 2)
            src = src * 2 - 1
        channels = self.unet.config.in_channels - self.unet.config.out_channels
        if src.ndim != 4 or src.shape[1] != channels:
            raise ValueError(f"image: this model takes {channels}-channel source images (B, {channels}, h, w), got "
                             f"shape {tuple(src.shape)}")
        if tuple(src.shape[-2:]) != size:
            src = F.interpolate(src, size=size, mode="nearest")
        return src.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, image=None, num_inference_steps: int | None = None,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None,
                 timesteps: list[int] | None = None, output_type: str = "pil", return_dict: bool = True,
                 eta: float | None = None):
        if image is None:
            raise ValueError("pass image= (the source images this model is conditioned on)")
        steps = num_inference_steps or self.config.num_inference_steps
        source = self._sources(image, self._size(), self._execution_device, self.unet.dtype)
        x = self._start(source.shape[0], self.unet.config.out_channels, steps, timesteps, generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([self.scheduler.scale_model_input(x, t), source], dim=1)
            out = self.unet(model_in, t).sample
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        return self._output(x, output_type, return_dict)
