"""A pipeline for class-conditional pixel-space ``UNet2DModel`` teachers and students (the digits ones),
which no stock Diffusers pipeline covers. Sampling is the scheduler's own loop, so a student exported with
the scheduler it was trained for runs its trained steps with the default arguments.

Flow-matching models (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchLCMScheduler``) run on the uniform Euler
grid ``sigma = 1, 1 - 1/K, ..., 1/K`` (then 0), handed to the scheduler as ``sigmas`` as ``FluxPipeline`` does (the
scheduler's own ``shift`` still applies): K Euler steps of a rectified flow, at any K."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..backbones import guidance_scale_embedding
from ..guided import (GuidedUNet2DModel, guidance_range_of, load_guidance_adapters,  # noqa: F401  (re-exported)
                      save_guidance_adapters)
from ._shim import only_stepdistill_shims


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # as Diffusers' save_lora_weights


def uniform_flow_grid(scheduler) -> bool:
    """Whether this pipeline hands ``scheduler`` the uniform sigma grid: a flow-matching scheduler that takes
    ``sigmas`` and does not make its own (``use_flow_sigmas``)."""
    import inspect

    return ("FlowMatch" in type(scheduler).__name__ and not scheduler.config.get("use_flow_sigmas")
            and "sigmas" in inspect.signature(scheduler.set_timesteps).parameters)


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], num_inference_steps=K, guidance_scale=s)``.

    ``num_inference_steps``, ``guidance_scale`` and ``eta`` default to the values saved with the pipeline (the
    steps and guidance a student was trained for; ``eta`` is TCDScheduler's gamma, passed to ``scheduler.step``
    when set, as Diffusers' pipelines pass theirs). CFG is the standard ``uncond + s * (cond - uncond)`` with the
    null class ``null_class`` (= number of classes); ``s = 1`` is one network call per step. A UNet that takes the
    guidance scale (``config.time_cond_proj_dim``: a guidance-distilled :class:`~stepdistill.guided.GuidedUNet2DModel`,
    or a UNet with AGD guidance adapters) gets ``timestep_cond``, the embedding of ``w = s - 1``, instead: one network
    call per step at any ``s``; a scale outside the range it was trained for gives a warning (it extrapolates).

    LoRA students: :meth:`save_lora_weights` / :meth:`load_lora_weights` use the Diffusers file layout
    (``pytorch_lora_weights.safetensors``, keys ``unet.<peft key>``, the LoRA config in the safetensors metadata
    under ``lora_adapter_metadata``); :meth:`fuse_lora` merges the adapters into the weights.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 null_class: int | None = None, eta: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                null_class=null_class, eta=eta)

    def _step_kwargs(self, generator, eta: float | None) -> dict:
        """``scheduler.step``'s extra arguments: the generator, and ``eta`` (the call's, else the saved one)."""
        import inspect

        eta = self.config.get("eta") if eta is None else eta
        if eta is None:
            return {"generator": generator}
        if "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(f"eta={eta} was given but {type(self.scheduler).__name__}.step takes no eta")
        return {"generator": generator, "eta": float(eta)}

    def _set_explicit_timesteps(self, timesteps: list[int], device) -> None:
        import inspect

        if "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
            return
        # a scheduler without custom timesteps (DDIM): fine when they are the ones it runs for that many steps
        self.scheduler.set_timesteps(len(timesteps), device=device)
        if [int(t) for t in self.scheduler.timesteps] != timesteps:
            raise ValueError(f"{type(self.scheduler).__name__} cannot run custom timesteps {timesteps}; for "
                             f"{len(timesteps)} steps it runs {[int(t) for t in self.scheduler.timesteps]}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``DiffusionPipeline.from_pretrained``; an export folder whose only code is stepdistill's one-line
        shims (``pipeline.py`` importing this installed class) loads without ``trust_remote_code``."""
        folder = Path(pretrained_model_name_or_path)
        if "trust_remote_code" not in kwargs and folder.is_dir() and only_stepdistill_shims(folder):
            kwargs["trust_remote_code"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------ LoRA
    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers: dict, unet_lora_adapter_metadata: dict | None = None,
                          weight_name: str = LORA_WEIGHT_NAME, safe_serialization: bool = True, **_ignored):
        """Write peft LoRA tensors of the UNet (``get_peft_model_state_dict``) and their LoraConfig dict."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("stepdistill writes LoRA weights as safetensors only")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet_lora_layers.items()}
        metadata = {"format": "pt"}
        if unet_lora_adapter_metadata is not None:
            meta = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in unet_lora_adapter_metadata.items()}
            metadata[LORA_METADATA_KEY] = json.dumps(meta, sort_keys=True)
        save_file(tensors, str(path / weight_name), metadata=metadata)

    def load_lora_weights(self, pretrained_model_name_or_path, weight_name: str = LORA_WEIGHT_NAME,
                          adapter_name: str = "default"):
        """Attach LoRA adapters saved by :meth:`save_lora_weights` (a folder or the file itself) to the UNet."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        path = Path(pretrained_model_name_or_path)
        path = path / weight_name if path.is_dir() else path
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k[len("unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
        if LORA_METADATA_KEY not in metadata:
            raise ValueError(f"{path} has no LoRA config in its metadata ({LORA_METADATA_KEY}); it was not written "
                             "by ClassConditionalPipeline.save_lora_weights")
        raw = {k[len("unet."):]: v for k, v in json.loads(metadata[LORA_METADATA_KEY]).items() if k.startswith("unet.")}
        fields = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("peft_type", "task_type")})
        inject_adapter_in_model(config, self.unet, adapter_name=adapter_name)
        result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path}: LoRA keys that fit no module of the UNet: {unexpected[:5]}")
        self.unet.eval()

    def fuse_lora(self):
        """Merge every LoRA adapter into the UNet's weights and remove the adapter layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, child, module.get_base_layer())

    def unload_lora_weights(self):
        """Remove LoRA adapter layers (unmerged adapters are dropped; fused weights stay fused)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, child, module.get_base_layer())

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, timesteps: list[int] | None = None,
                 output_type: str = "pil", return_dict: bool = True, eta: float | None = None):
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            batch_size = len(labels)
        else:
            batch_size = batch_size or 1
            labels = None
        if labels is None and self.unet.config.get("num_class_embeds"):
            raise ValueError("this model is class-conditional: pass class_labels=[...]")
        embed_dim = self.unet.config.get("time_cond_proj_dim")
        if scale != 1 and self.config.null_class is None and not embed_dim:
            raise ValueError("guidance_scale != 1 needs a null class; this pipeline has none")
        device = self._execution_device
        timestep_cond = self._guidance_embedding(scale, batch_size, embed_dim, device) if embed_dim else None
        x = self._start(batch_size, self.unet.config.in_channels, steps, timesteps, generator, latents)
        if labels is not None:
            labels = labels.to(device)
        step_kwargs = self._step_kwargs(generator, eta)
        scale_input = getattr(self.scheduler, "scale_model_input", None)  # flow schedulers have none
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = scale_input(x, t) if scale_input is not None else x
            if timestep_cond is not None:  # the scale is an input of the network: one call
                out = self.unet(model_in, t, class_labels=labels, timestep_cond=timestep_cond).sample
            elif scale != 1:
                both = torch.cat([labels, torch.full_like(labels, self.config.null_class)])
                out = self.unet(torch.cat([model_in, model_in]), t, class_labels=both).sample
                cond, uncond = out.chunk(2)
                out = uncond + scale * (cond - uncond)
            else:
                out = self.unet(model_in, t, class_labels=labels).sample
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        return self._output(x, output_type, return_dict)

    def _guidance_embedding(self, scale: float, batch_size: int, dim: int, device) -> torch.Tensor:
        """``timestep_cond`` for a UNet that takes the guidance scale: the embedding of ``w = s - 1`` (as
        StableDiffusionPipeline computes it; :func:`stepdistill.backbones.guidance_scale_embedding`)."""
        import warnings

        trained = guidance_range_of(self.unet)
        if trained is not None and not trained[0] - 1e-6 <= scale <= trained[1] + 1e-6:
            warnings.warn(f"guidance_scale={scale} is outside the range {list(trained)} this model was trained for: "
                          "it extrapolates its guidance input (ask for a scale in the range)", UserWarning,
                          stacklevel=3)
        w = torch.full((batch_size,), float(scale)) - 1
        return guidance_scale_embedding(w, dim).to(device=device, dtype=self.unet.dtype)

    def _size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def _start(self, batch_size: int, channels: int, steps: int, timesteps, generator, latents) -> torch.Tensor:
        """Set the scheduler's timesteps (``timesteps``, else ``steps``) and return the initial noise."""
        device = self._execution_device
        shape = (batch_size, channels, *self._size())
        x = latents if latents is not None else randn_tensor(shape, generator=generator, device=device,
                                                              dtype=self.unet.dtype)
        if timesteps is not None:
            self._set_explicit_timesteps([int(t) for t in timesteps], device)
        elif uniform_flow_grid(self.scheduler):
            import numpy as np

            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        else:
            self.scheduler.set_timesteps(steps, device=device)
        return x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow schedulers: 1 (none recorded)

    def _output(self, x: torch.Tensor, output_type: str, return_dict: bool):
        """Samples in [-1, 1] -> images in [0, 1] as ``pt``, ``np`` or ``pil``."""
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = images
        else:
            output = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)
