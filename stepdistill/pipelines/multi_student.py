"""One pipeline for K students that each own a set of classes (Multi-Student Distillation, Song et al. 2024).

:class:`MultiStudentUNet` holds the K student ``UNet2DModel`` s and a routing table ``owner[c]`` (the student
of class ``c``); its forward sends every sample to the student that owns its class label, so a batch may mix
students. :class:`MultiStudentPipeline` is :class:`~stepdistill.pipelines.ClassConditionalPipeline` over that
routed UNet: the scheduler's own loop, run at the timesteps the students were trained for. An export folder::

    model_index.json      _class_name ["pipeline", "MultiStudentPipeline"], unet ["unet", "MultiStudentUNet"]
    pipeline.py           one-line shim: from stepdistill.pipelines import MultiStudentPipeline
    unet/unet.py          one-line shim: from stepdistill.pipelines import MultiStudentUNet
    unet/config.json      student_configs (one UNet2DModel config per student), owner (class -> student)
    unet/diffusion_pytorch_model.safetensors   students.<k>.<UNet2DModel key>
    scheduler/            the students' scheduler (stock Diffusers)

It loads with ``MultiStudentPipeline.from_pretrained(folder)`` or
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (the shims only import the installed
classes). Routing is written once (:func:`route_call`) and used both here and by the trainer's routed students,
so the exported pipeline computes exactly what training sampled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from .. import backbones
from . import export as ex
from ._shim import write_shim
from .class_conditional import ClassConditionalPipeline
from .multi_student_text import export_multi_student_text
from .routing import merge, owners, route, route_call  # noqa: F401  (re-exported)
from .sampling import student_timesteps
from .spec import ExportSpec


# ------------------------------------------------------------------------------------------------ the model
def _plain_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class MultiStudentUNet(ModelMixin, ConfigMixin):
    """K ``UNet2DModel`` students behind one UNet call: ``unet(sample, t, class_labels).sample``, each sample run
    by the student that owns its class (``owner[label]``). ``sample_size``, ``in_channels``, ``out_channels`` and
    ``num_class_embeds`` describe the common input and output, as a UNet2DModel's config does."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, student_configs: list[dict], owner: list[int], sample_size=None, in_channels: int = 3,
                 out_channels: int = 3, num_class_embeds: int | None = None):
        super().__init__()
        if not student_configs:
            raise ValueError("MultiStudentUNet needs at least one student config")
        used = sorted(set(owner))
        if used and (used[0] < 0 or used[-1] >= len(student_configs)):
            raise ValueError(f"owner names students {used}, but there are {len(student_configs)}")
        self.students = torch.nn.ModuleList(UNet2DModel.from_config(dict(c)) for c in student_configs)

    @classmethod
    def from_students(cls, students: list[UNet2DModel], owner: list[int]) -> "MultiStudentUNet":
        """A routed UNet holding copies of ``students``' weights (the same architectures and configs)."""
        for k, s in enumerate(students):
            if type(s).__name__ != "UNet2DModel":
                raise TypeError(f"MultiStudentUNet holds UNet2DModel students; student {k} is {type(s).__name__}")
        first = students[0].config
        model = cls(student_configs=[_plain_config(s.config) for s in students], owner=[int(o) for o in owner],
                    sample_size=first.sample_size, in_channels=first.in_channels, out_channels=first.out_channels,
                    num_class_embeds=first.get("num_class_embeds"))
        for k, s in enumerate(students):
            model.students[k].load_state_dict(s.state_dict())
        dtype = next(students[0].parameters()).dtype
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        if class_labels is None:
            raise ValueError("a multi-student UNet routes by class label: pass class_labels")
        labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1)
        if labels.shape[0] != sample.shape[0]:
            labels = labels.expand(sample.shape[0])
        t = torch.as_tensor(timestep, device=sample.device)

        def call(k, idx):
            tk = t[idx] if t.ndim > 0 else t
            return self.students[k](sample[idx], tk, class_labels=labels[idx], return_dict=False)[0]

        out = route_call(owners(labels, self.config.owner), len(self.students), call)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class MultiStudentPipeline(ClassConditionalPipeline):
    """``pipe(class_labels=[3, 7])``: each label's image made by the student that owns it, in the students'
    trained steps (``num_inference_steps`` saved with the pipeline). No CFG: distilled students carry their
    guidance (``guidance_scale`` must stay 1)."""

    @property
    def partition(self) -> list[list[int]]:
        """The classes of each student (from the routing table)."""
        owner = self.unet.config.owner
        return [[c for c, o in enumerate(owner) if o == k] for k in range(len(self.unet.students))]

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, timesteps: list[int] | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        if class_labels is None:
            raise ValueError("a multi-student pipeline routes by class: pass class_labels=[...]")
        if guidance_scale not in (None, 1, 1.0):
            raise ValueError("a multi-student pipeline samples without CFG (its students were distilled with the "
                             "guidance baked in): leave guidance_scale at 1")
        return super().__call__(class_labels, batch_size, num_inference_steps, 1.0, generator, latents, timesteps,
                                output_type, return_dict)


# ------------------------------------------------------------------------------------------------ export
@dataclass
class MultiStudentSpec(ExportSpec):
    """An :class:`ExportSpec` for K routed students: ``students`` (their Denoisers, in order) and ``owner``
    (class -> student). ``student`` is the routed module (what the trainer's EMA and ``eval()`` act on).
    :func:`~stepdistill.pipelines.export_pipeline` hands such a spec to :meth:`export_to`."""

    students: list = field(default_factory=list)
    owner: list[int] | None = field(default_factory=list)
    keywords: list[list[str]] | None = None  # text students (owner None): each student's prompt keywords
    default_student: int | None = None

    def export_to(self, out_dir, *, overwrite: bool = False, variants=(), lora_format=None, **_ignored) -> Path:
        if self.keywords is not None:
            if variants or lora_format not in (None, "fused"):
                raise ValueError("multi-student exports write full float weights (no variants, no LoRA files)")
            return export_multi_student_text(self, out_dir, overwrite=overwrite)
        return export_multi_student(self, out_dir, overwrite=overwrite, variants=variants, lora_format=lora_format)


def export_multi_student(spec: MultiStudentSpec, out_dir, *, overwrite: bool = False, variants=(),
                         lora_format=None, name: str | None = None) -> Path:
    """Write ``spec``'s students as one :class:`MultiStudentPipeline` folder at ``out_dir``; returns the folder.

    The scheduler comes from ``spec.recipe`` on the teacher's schedule, exactly as a single student's export, and
    the pipeline must run ``spec.timesteps`` (the ones the students were trained at)."""
    pipe_name, as_pipeline = "MultiStudentPipeline", "ClassConditionalPipeline"
    if variants:
        raise ex.ExportError("weight variants (fp16/bf16) are not written for multi-student exports yet")
    if lora_format not in (None, "fused"):
        raise ex.ExportError("multi-student exports write full weights (lora_format='fused' or unset)")
    if not spec.students or not spec.owner:
        raise ex.ExportError("a multi-student export needs the students and the class -> student table")
    first = spec.students[0]
    recipe = spec.recipe
    scheduler = ex.export_scheduler(first, recipe, spec.base_scheduler, as_pipeline)
    with ex.quiet_diffusers():
        ts = student_timesteps(scheduler, recipe.num_inference_steps, as_pipeline)
    if spec.timesteps is not None and [float(t) for t in spec.timesteps] != ts:
        raise ex.ExportError(f"the students were trained at timesteps {list(spec.timesteps)} but the exported "
                             f"{type(scheduler).__name__} runs {ts} for {recipe.num_inference_steps} steps")
    for k, student in enumerate(spec.students):
        if student.lora_layers():
            raise ex.ExportError(f"student {k} has LoRA adapters; multi-student exports take full students")
        if student.prediction_type != first.prediction_type:
            raise ex.ExportError(f"student {k} predicts {student.prediction_type!r}, student 0 "
                                 f"{first.prediction_type!r}: one scheduler cannot sample both")
        ex.check_fit(student, recipe, as_pipeline, scheduler, ts)
    mode, scale = ex.guidance_plan(first, recipe, as_pipeline)
    if mode != "none":
        raise ex.ExportError("a multi-student pipeline samples without CFG: export with guidance_scale=1")
    unet = MultiStudentUNet.from_students([backbones.unwrap(s.backbone) for s in spec.students], spec.owner)

    out_dir = Path(out_dir).expanduser().resolve()
    tmp = ex.prepare_folder(out_dir, overwrite)
    try:
        pipe = MultiStudentPipeline(unet=unet, scheduler=scheduler, num_inference_steps=recipe.num_inference_steps,
                                    guidance_scale=1.0, null_class=None)
        with ex.quiet_diffusers():
            pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", pipe_name]
        index["unet"] = ["unet", "MultiStudentUNet"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_shim(tmp / "pipeline.py", pipe_name)
        write_shim(tmp / "unet" / "unet.py", "MultiStudentUNet")
        info = ex.export_info(spec, pipe_name, scheduler, ts, mode, scale, None, (), unet, name, None)
        partition = [[c for c, o in enumerate(spec.owner) if o == k] for k in range(len(spec.students))]
        info.update(needs_stepdistill=True, trust_remote_code=True, pipeline_tag="unconditional-image-generation",
                    call={"input": "class_labels", "kwargs": {"num_inference_steps": recipe.num_inference_steps}},
                    students=[{"classes": cls, "parameters": sum(p.numel() for p in s.parameters())}
                              for cls, s in zip(partition, unet.students)])
        ex.write_meta(tmp, spec, info)
        readme = tmp / "README.md"
        readme.write_text(readme.read_text().replace(
            f"(the scheduler is stepdistill.pipelines.{info['scheduler']})",
            "(the pipeline is stepdistill.pipelines.MultiStudentPipeline)")
            + "\n## Students\n\n" + "\n".join(f"- student {k}: classes {cls}, {s['parameters']:,} parameters"
                                              for k, (cls, s) in enumerate(zip(partition, info["students"]))) + "\n")
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ex.publish_folder(tmp, out_dir)
    return out_dir


__all__ = ["MultiStudentPipeline", "MultiStudentSpec", "MultiStudentUNet", "export_multi_student", "merge",
           "owners", "route", "route_call"]
