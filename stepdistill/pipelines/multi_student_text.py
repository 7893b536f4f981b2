"""One Stable Diffusion pipeline for K text students that each own a set of prompts (MSD, keyword partition).

:class:`MultiStudentUNet2DConditionModel` holds the K ``UNet2DConditionModel`` students and their keywords;
:class:`MultiStudentTextPipeline` is ``StableDiffusionPipeline`` that finds each prompt's student with
:func:`~stepdistill.pipelines.routing.prompt_owner` (the rule the trainer routed by) and passes it to the UNet,
which runs every sample on its own student. An export folder is a Stable Diffusion folder whose ``unet/`` holds
the students (``students.<k>.<key>``) and whose ``pipeline.py`` / ``unet/unet.py`` are one-line shims importing
these classes: it loads with ``MultiStudentTextPipeline.from_pretrained(folder)`` or
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import ModelMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .. import backbones
from . import export as ex
from ._shim import write_shim
from .routing import prompt_owners, route_call


def _take(value, idx: torch.Tensor, n: int):
    """The routed samples of a per-sample keyword argument (tensors with the batch first, dicts of them)."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n:
        return value[idx]
    if isinstance(value, dict):
        return {k: _take(v, idx, n) for k, v in value.items()}
    return value


class MultiStudentUNet2DConditionModel(ModelMixin, ConfigMixin):
    """K ``UNet2DConditionModel`` students behind one UNet call; each sample runs on the student given in
    ``cross_attention_kwargs["student"]`` (what :class:`MultiStudentTextPipeline` passes). The config mirrors the
    students' shared keys that Stable Diffusion pipelines read."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, student_configs: list[dict], keywords: list[list[str]], default_student: int | None = None,
                 sample_size=None, in_channels: int = 4, out_channels: int = 4, cross_attention_dim=None,
                 time_cond_proj_dim: int | None = None, addition_embed_type: str | None = None):
        super().__init__()
        if len(student_configs) != len(keywords):
            raise ValueError(f"{len(student_configs)} students but {len(keywords)} keyword groups")
        self.students = torch.nn.ModuleList(UNet2DConditionModel.from_config(dict(c)) for c in student_configs)

    @classmethod
    def from_students(cls, students: list[UNet2DConditionModel], keywords, default_student=None):
        first = students[0].config
        configs = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(s.config).items()
                    if not k.startswith("_")} for s in students]
        model = cls(student_configs=configs, keywords=[list(g) for g in keywords], default_student=default_student,
                    sample_size=first.sample_size, in_channels=first.in_channels, out_channels=first.out_channels,
                    cross_attention_dim=first.cross_attention_dim, time_cond_proj_dim=first.time_cond_proj_dim,
                    addition_embed_type=first.addition_embed_type)
        for k, s in enumerate(students):
            model.students[k].load_state_dict(s.state_dict())
        return model.to(next(students[0].parameters()).dtype).eval()

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                cross_attention_kwargs: dict | None = None, return_dict: bool = True, **kwargs):
        extra = dict(cross_attention_kwargs or {})
        students = extra.pop("student", None)
        if students is None:
            raise ValueError("a multi-student UNet routes each prompt to its student: call it through "
                             "MultiStudentTextPipeline (which passes cross_attention_kwargs={'student': ...})")
        n = sample.shape[0]
        students = torch.as_tensor(students, device=sample.device).reshape(-1)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(n) if t.ndim == 0 else t

        def call(k, idx):
            return self.students[k](sample[idx], t[idx], encoder_hidden_states[idx], *args,
                                    cross_attention_kwargs=extra or None, return_dict=False,
                                    **{key: _take(v, idx, n) for key, v in kwargs.items()})[0]

        out = route_call(students, len(self.students), call)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class MultiStudentTextPipeline(StableDiffusionPipeline):
    """``pipe(prompt=[...], num_inference_steps=K, guidance_scale=1)``: each prompt's images made by the student
    whose keywords it contains (or the default student). No CFG: distilled students carry their guidance."""

    @torch.no_grad()
    def __call__(self, prompt=None, *args, num_images_per_prompt: int = 1, guidance_scale: float = 1.0,
                 cross_attention_kwargs: dict | None = None, **kwargs):
        if prompt is None:
            raise ValueError("a multi-student pipeline routes by the prompt's text: pass prompt=..., not prompt_embeds")
        if guidance_scale > 1:
            raise ValueError("a multi-student pipeline samples without CFG (its students were distilled with the "
                             "guidance baked in): leave guidance_scale at 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        config = self.unet.config
        students = prompt_owners(prompts, config.keywords, config.default_student).repeat_interleave(
            num_images_per_prompt)
        return super().__call__(prompts, *args, num_images_per_prompt=num_images_per_prompt,
                                guidance_scale=guidance_scale,
                                cross_attention_kwargs={**(cross_attention_kwargs or {}), "student": students},
                                **kwargs)


def export_multi_student_text(spec, out_dir, *, overwrite: bool = False) -> Path:
    """Write ``spec``'s text students (a :class:`~stepdistill.pipelines.multi_student.MultiStudentSpec` with
    ``keywords``) as one :class:`MultiStudentTextPipeline` folder: the first student is exported as a stock
    Stable Diffusion pipeline (scheduler, VAE, text encoder, card: the single-student export's checks), then its
    ``unet/`` is replaced by all the students."""
    base_index = ex.read_index(Path(spec.base_folder)) if spec.base_folder else {}
    if base_index.get("_class_name") != "StableDiffusionPipeline":
        raise ex.ExportError("text multi-student exports are written for Stable Diffusion (1.x/2.x) teachers; this "
                             f"teacher's pipeline is {base_index.get('_class_name') or 'unknown'}")
    for k, student in enumerate(spec.students):
        if student.lora_layers():
            raise ex.ExportError(f"student {k} has LoRA adapters; multi-student exports take full students")
    out_dir = Path(out_dir).expanduser().resolve()
    staging = ex.prepare_folder(out_dir, overwrite)
    try:
        first = ex.ExportSpec(student=spec.students[0], recipe=spec.recipe, base_scheduler=spec.base_scheduler,
                              base_folder=spec.base_folder, method=spec.method, timesteps=spec.timesteps,
                              meta=spec.meta, base_model=spec.base_model)
        ex.export_pipeline(first, None, staging / "pipe", overwrite=True)
        folder = staging / "pipe"
        info = json.loads((folder / ex.META_FILE).read_text())
        if info["export"]["recipe"].get("guidance_scale", 1) not in (0, 1, None):
            raise ex.ExportError("a multi-student pipeline samples without CFG: export with guidance_scale=1")
        unet = MultiStudentUNet2DConditionModel.from_students(
            [backbones.unwrap(s.backbone) for s in spec.students], spec.keywords, spec.default_student)
        shutil.rmtree(folder / "unet")
        with ex.quiet_diffusers():
            unet.save_pretrained(folder / "unet", safe_serialization=True)
        write_shim(folder / "unet" / "unet.py", "MultiStudentUNet2DConditionModel")
        write_shim(folder / "pipeline.py", "MultiStudentTextPipeline")
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", "MultiStudentTextPipeline"]
        index["unet"] = ["unet", "MultiStudentUNet2DConditionModel"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        students = [{"keywords": list(g), "parameters": sum(p.numel() for p in s.parameters())}
                    for g, s in zip(spec.keywords, unet.students)]
        info["export"].update(pipeline="MultiStudentTextPipeline", needs_stepdistill=True, trust_remote_code=True,
                              students=students, default_student=spec.default_student)
        (folder / ex.META_FILE).write_text(json.dumps(info, indent=1) + "\n")
        readme = folder / "README.md"
        readme.write_text(readme.read_text().replace("StableDiffusionPipeline", "MultiStudentTextPipeline")
                          + "\n## Students\n\nLoad with `DiffusionPipeline.from_pretrained(folder, trust_remote_code="
                          "True)` (stepdistill installed). Each prompt goes to the student whose keywords it contains "
                          "(whole words)" + (f", else student {spec.default_student}" if spec.default_student
                                             is not None else "") + ":\n\n"
                          + "\n".join(f"- student {k}: {', '.join(s['keywords'])} ({s['parameters']:,} parameters)"
                                      for k, s in enumerate(students)) + "\n")
        for item in folder.iterdir():
            item.rename(staging / item.name)
        folder.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ex.publish_folder(staging, out_dir)
    return out_dir
