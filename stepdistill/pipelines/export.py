"""Export: a student becomes a folder that ``DiffusionPipeline.from_pretrained`` loads and that samples in the
student's trained steps.

- :func:`export_pipeline` writes an in-memory student (a :class:`~stepdistill.Denoiser`, or an
  :class:`ExportSpec` from ``objective.export_spec()``) with a :class:`~stepdistill.pipelines.recipes.Recipe`.
- :func:`export_run` (``stepdistill export RUN_DIR --out DIR``) rebuilds a run's objective from its
  ``config.yaml``, loads a checkpoint (the latest, or ``checkpoint=``), puts in the EMA weights and exports.

Stock pipelines per backbone (they load with plain Diffusers):

=============================  ==========================================================================
backbone                       pipeline
=============================  ==========================================================================
UNet2DModel, unconditional     ``DDPMPipeline`` (call with ``num_inference_steps=K``)
UNet2DModel, class labels      ``stepdistill.pipelines.ClassConditionalPipeline`` (``trust_remote_code``)
UNet2DModel, source image      ``stepdistill.pipelines.ImageConditionedPipeline`` (in_channels > out_channels)
UNet2DConditionModel           ``StableDiffusionPipeline``; SDXL (``text_time``): ``StableDiffusionXLPipeline``;
                               guidance embedding (``time_cond_proj_dim``): ``LatentConsistencyModelPipeline``
DiTTransformer2DModel          ``DiTPipeline`` (its CFG null class is 1000)
PixArtTransformer2DModel       ``PixArtAlphaPipeline`` (``PixArtSigmaPipeline`` for a Sigma base)
SD3Transformer2DModel          ``StableDiffusion3Pipeline``
FluxTransformer2DModel         ``FluxPipeline``
=============================  ==========================================================================

The VAE, tokenizers and text encoders come from ``components=`` (in memory) or are linked (hard links, else
copies) from ``base_folder`` — the teacher's Diffusers folder (``model.source``). Weights are safetensors;
``variants=("fp16",)`` adds fp16/bf16 copies. LoRA students export as Diffusers LoRA weights
(``pytorch_lora_weights.safetensors``, ``save_lora_weights`` format, on the base weights in the same folder)
and/or fused into full weights (``lora_format``). Every export has a model card (README.md), a machine-readable
``stepdistill.json`` and, when known, the resolved training config (``training_config.yaml``).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import backbones
from ..denoiser import Denoiser
from ._shim import write_shim
from .recipes import ExportError, Recipe, as_loaded, get_recipe
from .sampling import student_timesteps

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
META_FILE = "stepdistill.json"
CONFIG_FILE = "training_config.yaml"
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FORMATS = ("diffusers", "fused", "both")
#: pipelines of this package (need stepdistill and trust_remote_code to load)
OWN_PIPELINES = ("ClassConditionalPipeline", "ImageConditionedPipeline")
#: the component a pipeline's LoRA loader takes (``save_lora_weights(<prefix>_lora_layers=...)``)
LORA_PREFIX = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
               "LatentConsistencyModelPipeline": "unet", "StableDiffusion3Pipeline": "transformer",
               "FluxPipeline": "transformer", "ClassConditionalPipeline": "unet", "ImageConditionedPipeline": "unet"}
#: text and VAE components each pipeline needs to generate (the rest may be None)
REQUIRED = {
    "DDPMPipeline": (), "ClassConditionalPipeline": (), "ImageConditionedPipeline": (), "DiTPipeline": ("vae",),
    "StableDiffusionPipeline": ("vae", "tokenizer", "text_encoder"),
    "LatentConsistencyModelPipeline": ("vae", "tokenizer", "text_encoder"),
    "StableDiffusionXLPipeline": ("vae", "tokenizer_2", "text_encoder_2"),
    "PixArtAlphaPipeline": ("vae", "tokenizer", "text_encoder"),
    "PixArtSigmaPipeline": ("vae", "tokenizer", "text_encoder"),
    "StableDiffusion3Pipeline": ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
    "FluxPipeline": ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
}
PIPELINES_FOR = {
    "UNet2DModel": ("DDPMPipeline", "ClassConditionalPipeline", "ImageConditionedPipeline"),
    "UNet2DConditionModel": ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                             "LatentConsistencyModelPipeline"),
    "DiTTransformer2DModel": ("DiTPipeline",),
    "PixArtTransformer2DModel": ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline",),
    "FluxTransformer2DModel": ("FluxPipeline",),
}
CFG_PIPELINES = ("ClassConditionalPipeline", "DiTPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                 "PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline")


@dataclass
class ExportSpec:
    """What an objective tells export about its student (``Objective.export_spec()``).

    ``student``: the Denoiser to export (its backbone, schedule and prediction type; LoRA adapters if any).
    ``recipe``: the scheduler, steps and guidance it samples with. ``base_scheduler``: the teacher's scheduler
    (the noise schedule the recipe's scheduler is built on). ``base_folder``: a Diffusers folder to take the VAE
    and text components from (the teacher's). ``timesteps``: the timesteps the student was trained at, if the
    objective fixed them — export checks that the pipeline runs exactly these. The rest describes the model card.
    """

    student: Denoiser
    recipe: Recipe
    base_scheduler: Any = None
    method: str = "unknown"
    base_model: str | None = None
    base_folder: str | Path | None = None
    num_classes: int | None = None
    image_size: int | None = None
    timesteps: list[float] | None = None
    training_steps: int | None = None
    metrics: dict = field(default_factory=dict)
    config: Any = None
    meta: dict = field(default_factory=dict)
    pipeline: str | None = None  # override the pipeline class (e.g. StableDiffusionPipeline for an LCM student)

    @property
    def pipeline_name(self) -> str:
        return pipeline_for(self.student, _base_class(self.base_folder), self.pipeline)

    @property
    def scheduler(self):
        """The scheduler the student samples with, as the exported pipeline will hold it."""
        return export_scheduler(self.student, self.recipe, self.base_scheduler, self.pipeline_name)

    def run_timesteps(self) -> list[float]:
        """The timesteps the exported pipeline runs: the ones a K-step student must be trained at."""
        return student_timesteps(self.scheduler, self.recipe.num_inference_steps, self.pipeline_name)


def _base_class(base_folder) -> str | None:
    if not base_folder:
        return None
    index = Path(base_folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return name if isinstance(name, str) else None


def export_scheduler(student: Denoiser, recipe: Recipe, base_scheduler=None, pipeline: str | None = None):
    """The scheduler an export of ``student`` with ``recipe`` writes (as ``pipeline`` will hold it)."""
    pipeline = pipeline or pipeline_for(student)
    base = base_scheduler if base_scheduler is not None else _scheduler_from_schedule(student)
    with _quiet():
        return as_loaded(recipe.make_scheduler(base, student.prediction_type, pipeline), pipeline)


def export_timesteps(student: Denoiser, recipe: Recipe, base_scheduler=None,
                     pipeline: str | None = None) -> list[float]:
    """The timesteps an export of ``student`` with ``recipe`` runs — what a K-step student must be trained at.

    Trainers call this once (with the teacher's scheduler) and train at exactly these timesteps."""
    pipeline = pipeline or pipeline_for(student)
    scheduler = export_scheduler(student, recipe, base_scheduler, pipeline)
    return student_timesteps(scheduler, recipe.num_inference_steps, pipeline)


# ---------------------------------------------------------------------------------------------- choosing
def pipeline_for(student: Denoiser, base_class: str | None = None, override: str | None = None) -> str:
    """The pipeline class name an export of ``student`` uses (``override`` if it fits the backbone)."""
    fam = student.family
    config = backbones.unwrap(student.backbone).config
    allowed = list(PIPELINES_FOR[fam])
    if fam == "UNet2DModel":
        has_classes = bool(config.get("num_class_embeds")) or config.get("class_embed_type") is not None
        if config.in_channels != config.out_channels:  # the source image is concatenated on channels
            if has_classes:
                raise ExportError("a class-conditional image-conditioned UNet2DModel has no pipeline yet")
            allowed, default = ["ImageConditionedPipeline"], "ImageConditionedPipeline"
        else:
            allowed.remove("ImageConditionedPipeline")
            default = "ClassConditionalPipeline" if has_classes else "DDPMPipeline"
            if has_classes:
                allowed.remove("DDPMPipeline")
    elif fam == "UNet2DConditionModel":
        if config.get("addition_embed_type") == "text_time":
            allowed = ["StableDiffusionXLPipeline"]
        else:
            allowed.remove("StableDiffusionXLPipeline")
            if not config.get("time_cond_proj_dim"):
                allowed.remove("LatentConsistencyModelPipeline")
        default = ("StableDiffusionXLPipeline" if allowed == ["StableDiffusionXLPipeline"] else
                   "LatentConsistencyModelPipeline" if config.get("time_cond_proj_dim") else "StableDiffusionPipeline")
        if config.get("class_embed_type") or config.get("num_class_embeds"):
            raise ExportError("a class-conditional UNet2DConditionModel has no stock text-to-image pipeline")
    elif fam == "PixArtTransformer2DModel":
        default = "PixArtSigmaPipeline" if base_class and "Sigma" in base_class else "PixArtAlphaPipeline"
    else:
        default = allowed[0]
    if override is None:
        return default
    if override not in allowed:
        raise ExportError(f"pipeline {override!r} does not fit this {fam} student; use one of {', '.join(allowed)}")
    return override


def pipeline_class(name: str):
    if name in OWN_PIPELINES:
        from .. import pipelines

        return getattr(pipelines, name)
    import diffusers

    return getattr(diffusers, name)


def guidance_plan(student: Denoiser, recipe: Recipe, pipeline: str) -> tuple[str, float]:
    """(mode, guidance_scale): ``embedded`` (fed to a guidance embedding), ``cfg`` (CFG at that scale) or ``none``."""
    config = backbones.unwrap(student.backbone).config
    embedded = bool(config.get("time_cond_proj_dim")) or bool(config.get("guidance_embeds"))
    s = recipe.guidance_scale
    if embedded:
        if s is None:
            raise ExportError("this student has a guidance embedding (time_cond_proj_dim / guidance_embeds): give "
                              "the recipe the guidance_scale it was trained for (the value fed to the embedding)")
        return "embedded", float(s)
    s = 1.0 if s is None else float(s)
    if s < 1:
        raise ExportError(f"guidance_scale {s} < 1: use 1.0 for a student without guidance (CFG baked in) or the "
                          "CFG scale (> 1) the student samples with")
    if s == 1:
        return "none", 1.0
    if pipeline not in CFG_PIPELINES:
        raise ExportError(f"{pipeline} has no classifier-free guidance, but the recipe asks for guidance_scale={s}: "
                          "distil the guidance into the student and export with guidance_scale=1.0")
    if pipeline == "DiTPipeline" and student.null_class != 1000:
        raise ExportError(f"DiTPipeline's CFG uses the null class 1000, but this student's null class is "
                          f"{student.null_class}: export with guidance_scale=1.0 (guidance distilled)")
    if pipeline == "ClassConditionalPipeline" and student.null_class is None:
        raise ExportError("CFG with class labels needs the student's null class (Denoiser.null_class)")
    return "cfg", s


def _check_fit(student: Denoiser, recipe: Recipe, pipeline: str, scheduler, timesteps: list[float]) -> None:
    kind = student.schedule.kind
    saved = type(scheduler).from_config(scheduler.config).config.get("prediction_type")
    if kind == "vp" and saved != student.prediction_type:
        raise ExportError(f"{type(scheduler).__name__} would read the student's output as {saved!r}, but the "
                          f"student predicts {student.prediction_type!r}")
    if pipeline in ("StableDiffusion3Pipeline", "FluxPipeline") and kind != "flow":
        raise ExportError(f"{pipeline} runs flow-matching models; this student has a VP schedule")
    if kind == "flow" and recipe.sampler not in ("flow_euler", "flow_lcm"):
        raise ExportError(f"a flow-matching student needs the flow_euler or flow_lcm recipe, not {recipe.name!r}")
    if kind == "vp" and student.prediction_type == "epsilon":
        abar = float(scheduler.alphas_cumprod[int(timesteps[0])])
        if abar <= 0:
            raise ExportError(f"an epsilon-prediction student cannot give x0 at t={timesteps[0]:g}, where the "
                              "schedule has zero signal (zero terminal SNR): use v_prediction or sample")


# ---------------------------------------------------------------------------------------------- weights
def _adapter_name(model) -> str:
    names = list(getattr(model, "peft_config", {}) or {})
    if len(names) != 1:
        raise ExportError(f"export supports one LoRA adapter per student; this one has {names or 'none named'}")
    return names[0]


def plain_state_dict(model: torch.nn.Module, merge: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's weights without LoRA wrappers: the base weights, or (``merge``) base + LoRA delta."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    out = {}
    for key, value in model.state_dict().items():
        if ".base_layer." in key:
            prefix, rest = key.split(".base_layer.", 1)
            if prefix in tuners:
                if merge and rest == "weight":
                    layer = tuners[prefix]
                    with torch.no_grad():
                        for adapter in layer.active_adapters:
                            if adapter in getattr(layer, "lora_A", {}) or \
                                    adapter in getattr(layer, "lora_embedding_A", {}):
                                value = value + layer.get_delta_weight(adapter).to(value.dtype)
                out[f"{prefix}.{rest}"] = value
                continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in tuners for i in range(1, len(parts))):
            continue  # an adapter parameter (lora_A / lora_B / ...)
        out[key] = value
    return out


def _check_keys(model, state: dict) -> None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = type(model).from_config(model.config)
    except Exception:  # pragma: no cover - a model that cannot be built on the meta device: skip the check
        return
    expected = set(reference.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"the weights to export do not match a plain {type(model).__name__}: missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def _save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except RuntimeError:  # tensors sharing storage
        save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_model(model, state: dict, folder: Path, variants=()) -> None:
    """A Diffusers model folder (config.json + diffusion_pytorch_model[.variant].safetensors) from a state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    _save_tensors(state, folder / "diffusion_pytorch_model.safetensors")
    for variant in variants:
        dtype = VARIANT_DTYPES[variant]
        _save_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                      folder / f"diffusion_pytorch_model.{variant}.safetensors")


def _lora_payload(model, pipeline: str) -> tuple[dict, dict]:
    from peft.utils import get_peft_model_state_dict

    name = _adapter_name(model)
    state = get_peft_model_state_dict(model, adapter_name=name)
    config = model.peft_config[name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    # peft key names, as ``save_lora_adapter`` writes them. (convert_state_dict_to_diffusers renames attention
    # LoRA layers to the old ``lora.down/up`` names, and load_lora_weights then silently skips them when the file
    # also holds peft-named layers such as resnet convs.)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


# ---------------------------------------------------------------------------------------------- folders
def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (else copy) every file of ``src`` into ``dst``."""
    for path in src.rglob("*"):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)


def _read_index(folder: Path | None) -> dict:
    """The base folder's model_index.json ({} for a bare model folder such as the digits teacher's)."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise ExportError(f"base folder {folder} does not exist; give the teacher's Diffusers pipeline folder")
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} already exists; choose another --out or pass --overwrite")
        if any(out_dir.iterdir()) and not ((out_dir / META_FILE).is_file() or (out_dir / "model_index.json").is_file()):
            raise ExportError(f"{out_dir} is not empty and not an export; refusing to overwrite it")
    tmp = out_dir.parent / f".{out_dir.name}.exporting"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _quiet():
    """Silence Diffusers' deprecation chatter while pipelines are assembled (we set the values it warns about)."""
    from diffusers.utils import logging as dlogging

    class _Ctx:
        def __enter__(self):
            self.level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()
            self.w = warnings.catch_warnings()
            self.w.__enter__()
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)

        def __exit__(self, *exc):
            self.w.__exit__(*exc)
            dlogging.set_verbosity(self.level)

    return _Ctx()


def _assemble(pipeline: str, scheduler, components: dict, linked: dict, base_index: dict, denoiser_name: str,
              backbone, state: dict, folder: Path, variants, extra_init: dict) -> None:
    """Write one pipeline folder: in-memory components via save_pretrained, the denoiser from ``state``, linked
    components from the base folder, and a model_index.json that names them all."""
    cls = pipeline_class(pipeline)
    expected, optional = cls._get_signature_keys(cls)
    kwargs = {name: None for name in expected}
    kwargs.update({k: v for k, v in components.items() if k in expected})
    kwargs["scheduler"] = scheduler
    kwargs[denoiser_name] = None
    kwargs.update({k: v for k, v in extra_init.items() if k in optional or k in expected})
    with _quiet():
        pipe = cls(**kwargs)
        pipe.save_pretrained(folder, safe_serialization=True)
        for variant in variants:
            dtype = VARIANT_DTYPES[variant]
            for name, module in components.items():
                if isinstance(module, torch.nn.Module) and name in expected:
                    copy.deepcopy(module).to(dtype).save_pretrained(folder / name, variant=variant,
                                                                    safe_serialization=True)
    write_model(backbone, state, folder / denoiser_name, variants)
    index = json.loads((folder / "model_index.json").read_text())
    index[denoiser_name] = ["diffusers", type(backbone).__name__]
    for name, src in linked.items():
        _link_tree(src, folder / name)
        index[name] = base_index[name]
    if pipeline in OWN_PIPELINES:
        index["_class_name"] = ["pipeline", pipeline]
        write_shim(folder / "pipeline.py", pipeline)
    sched_name = type(scheduler).__name__
    if not hasattr(__import__("diffusers"), sched_name):
        index["scheduler"] = ["scheduler", sched_name]
        write_shim(folder / "scheduler" / "scheduler.py", sched_name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _gather_components(pipeline: str, components: dict | None, base_folder: Path | None, denoiser_name: str):
    cls = pipeline_class(pipeline)
    expected, _ = cls._get_signature_keys(cls)
    components = dict(components or {})
    unknown = set(components) - set(expected)
    if unknown:
        raise ExportError(f"{pipeline} has no components {sorted(unknown)}; it takes {sorted(expected)}")
    for name in (denoiser_name, "scheduler"):
        if name in components:
            raise ExportError(f"components must not include {name!r}: export writes the student's {name}")
    base_index = _read_index(base_folder)
    linked = {}
    for name in expected:
        if name in (denoiser_name, "scheduler") or name in components:
            continue
        entry = base_index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (base_folder / name).is_dir():
            linked[name] = base_folder / name
    missing = [n for n in REQUIRED[pipeline] if components.get(n) is None and n not in linked]
    if missing:
        where = f" ({base_folder} has none of them)" if base_folder else ""
        raise ExportError(f"a {pipeline} export needs {', '.join(missing)}{where}: give base_folder= (the teacher's "
                          "Diffusers pipeline folder, model.source) or components={...} in memory")
    return components, linked, base_index


# ---------------------------------------------------------------------------------------------- the export
def export_pipeline(student, recipe: Recipe | str | None = None, out_dir=None, *, base_scheduler=None,
                    components: dict | None = None, base_folder=None, lora_format: str | None = None,
                    variants=(), pipeline: str | None = None, method: str | None = None,
                    base_model: str | None = None, training_steps: int | None = None, metrics: dict | None = None,
                    config=None, meta: dict | None = None, num_classes: int | None = None,
                    image_size: int | None = None, timesteps=None, steps: int | None = None,
                    guidance_scale: float | None = None, name: str | None = None, overwrite: bool = False,
                    extra: dict | None = None) -> Path:
    """Write ``student`` as a Diffusers pipeline folder at ``out_dir``; returns the folder.

    ``student``: a :class:`~stepdistill.Denoiser` or an :class:`ExportSpec` (whose fields are the defaults of the
    keyword arguments). ``recipe``: a :class:`Recipe` or a recipe name (then ``steps`` / ``guidance_scale``).
    ``base_scheduler``: the teacher's scheduler (without it, a VP schedule is rebuilt from the Denoiser's
    ``alphas_cumprod`` as ``trained_betas``). ``components`` / ``base_folder``: where the VAE and text components
    come from. ``lora_format``: ``diffusers`` (LoRA file on the base weights; the default where the pipeline
    can load LoRA), ``fused`` or ``both`` (the fused pipeline in ``fused/``). ``variants``: ``fp16`` / ``bf16``.
    ``timesteps``: the timesteps the student was trained at; export fails if the pipeline would run others.
    """
    if hasattr(student, "export_to"):  # a spec that writes its own folder (multi_student.MultiStudentSpec)
        return student.export_to(out_dir, overwrite=overwrite, variants=variants, lora_format=lora_format)
    spec = _resolve_spec(student, recipe, base_scheduler=base_scheduler, base_folder=base_folder, method=method,
                         base_model=base_model, training_steps=training_steps, metrics=metrics, config=config,
                         meta=meta, num_classes=num_classes, image_size=image_size, timesteps=timesteps,
                         steps=steps, guidance_scale=guidance_scale)
    if out_dir is None:
        raise ExportError("export_pipeline needs out_dir")
    out_dir = Path(out_dir).expanduser().resolve()
    variants = tuple(variants or ())
    bad = [v for v in variants if v not in VARIANT_DTYPES]
    if bad:
        raise ExportError(f"unknown weight variant(s) {bad}; choose from {', '.join(VARIANT_DTYPES)}")
    student, recipe = spec.student, spec.recipe
    backbone = backbones.unwrap(student.backbone)
    base_folder = Path(spec.base_folder).expanduser() if spec.base_folder else None
    base_index = _read_index(base_folder) if base_folder else {}
    pipe_name = pipeline_for(student, base_index.get("_class_name") if isinstance(base_index.get("_class_name"), str)
                             else None, pipeline or spec.pipeline)
    denoiser_name = "unet" if "UNet" in type(backbone).__name__ else "transformer"

    # the scheduler, as the pipeline will hold it, and the timesteps it runs
    scheduler = export_scheduler(student, recipe, spec.base_scheduler, pipe_name)
    with _quiet():
        try:
            ts = student_timesteps(scheduler, recipe.num_inference_steps, pipe_name)
        except ValueError as exc:
            raise ExportError(f"recipe {recipe.name!r} cannot run {recipe.num_inference_steps} step(s) with "
                              f"{type(scheduler).__name__}: {exc}") from exc
    if spec.timesteps is not None and [float(t) for t in spec.timesteps] != ts:
        raise ExportError(f"the student was trained at timesteps {list(spec.timesteps)} but {pipe_name} with "
                          f"{type(scheduler).__name__} runs {ts} for {recipe.num_inference_steps} steps; train with "
                          "student_timesteps(scheduler, K) of the export recipe, or export with a recipe whose "
                          "scheduler runs the trained timesteps")
    total = float(scheduler.config.get("num_train_timesteps", 1000))
    if recipe.timesteps is None and ts[0] < total / 2:
        raise ExportError(f"{type(scheduler).__name__} with this config starts {recipe.num_inference_steps}-step "
                          f"sampling at t={ts[0]:g} (of {total:g}): a few-step student must start from noise. Use "
                          "ddim_trailing or lcm (DDPM/DDIM 'leading' spacing runs one step at t=0), or give the "
                          "recipe explicit timesteps")
    _check_fit(student, recipe, pipe_name, scheduler, ts)
    if recipe.eta is not None and "eta" not in inspect.signature(pipeline_class(pipe_name).__call__).parameters:
        raise ExportError(f"recipe {recipe.name!r} samples with eta={recipe.eta} (TCD's gamma), but {pipe_name}'s call "
                          "takes no eta: export with the lcm recipe, or to a pipeline that passes eta to its scheduler")
    mode, scale = guidance_plan(student, recipe, pipe_name)

    # LoRA
    is_lora = bool(student.lora_layers())
    if is_lora:
        loadable = pipe_name in LORA_PREFIX
        if lora_format is None:
            lora_format = "diffusers" if loadable else "fused"
        if lora_format not in LORA_FORMATS:
            raise ExportError(f"unknown lora_format {lora_format!r}; choose from {', '.join(LORA_FORMATS)}")
        if lora_format != "fused" and not loadable:
            raise ExportError(f"{pipe_name} cannot load LoRA weights (no load_lora_weights): export this LoRA "
                              "student with lora_format='fused'")
        adapter = _adapter_name(backbone)
        lora_config = backbone.peft_config[adapter]
    elif lora_format not in (None, *LORA_FORMATS):
        raise ExportError(f"unknown lora_format {lora_format!r}; choose from {', '.join(LORA_FORMATS)}")

    components, linked, base_index = _gather_components(pipe_name, components, base_folder, denoiser_name)
    extra_init = {"requires_safety_checker": False, "add_watermarker": False}
    if "force_zeros_for_empty_prompt" in base_index:
        extra_init["force_zeros_for_empty_prompt"] = base_index["force_zeros_for_empty_prompt"]
    if pipe_name == "ClassConditionalPipeline":
        extra_init.update(num_inference_steps=recipe.num_inference_steps, guidance_scale=scale,
                          null_class=student.null_class, eta=recipe.eta)
    if pipe_name == "ImageConditionedPipeline":
        extra_init.update(num_inference_steps=recipe.num_inference_steps,
                          source_resolution=(spec.meta or {}).get("source_resolution"), eta=recipe.eta)

    tmp = _prepare_out(out_dir, overwrite)
    try:
        main_state = plain_state_dict(backbone, merge=is_lora and lora_format == "fused")
        _check_keys(backbone, main_state)
        _assemble(pipe_name, scheduler, components, linked, base_index, denoiser_name, backbone, main_state, tmp,
                  variants, extra_init)
        lora_info = None
        if is_lora:
            lora_info = {"format": lora_format, "rank": int(lora_config.r), "alpha": float(lora_config.lora_alpha),
                         "target_modules": sorted(lora_config.target_modules or []),
                         "weight_name": LORA_WEIGHT_NAME if lora_format != "fused" else None,
                         "fused_folder": "fused" if lora_format == "both" else None}
            if lora_format in ("diffusers", "both"):
                layers, config_dict = _lora_payload(backbone, pipe_name)
                prefix = LORA_PREFIX[pipe_name]
                with _quiet():
                    pipeline_class(pipe_name).save_lora_weights(
                        str(tmp), **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": config_dict},
                        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
            if lora_format == "both":
                fused = plain_state_dict(backbone, merge=True)
                _assemble(pipe_name, scheduler, components, linked, base_index, denoiser_name, backbone, fused,
                          tmp / "fused", variants, extra_init)
        info = _export_info(spec, pipe_name, scheduler, ts, mode, scale, lora_info, variants, backbone, name, extra)
        _write_meta(tmp, spec, info)
        if lora_format == "both" and is_lora:
            fused_info = {**info, "lora": {**lora_info, "format": "fused", "weight_name": None, "fused_folder": None}}
            _write_meta(tmp / "fused", spec, fused_info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out_dir)
    return out_dir


def _resolve_spec(student, recipe, *, steps, guidance_scale, **fields) -> ExportSpec:
    if isinstance(student, ExportSpec):
        spec = copy.copy(student)
    elif isinstance(student, Denoiser):
        spec = ExportSpec(student=student, recipe=None)
    else:
        raise ExportError(f"export needs a Denoiser or an ExportSpec, not {type(student).__name__}")
    for key, value in fields.items():
        if value is not None:
            setattr(spec, key, value)
    if isinstance(recipe, str):
        recipe = get_recipe(recipe, steps or 1, guidance_scale)
    elif recipe is not None and (steps is not None or guidance_scale is not None):
        recipe = copy.copy(recipe)
        if steps is not None:
            recipe.num_inference_steps = int(steps)
        if guidance_scale is not None:
            recipe.guidance_scale = float(guidance_scale)
    spec.recipe = recipe or spec.recipe
    if spec.recipe is None:
        raise ExportError("export needs a recipe (e.g. get_recipe('lcm_uniform', steps=4)); see "
                          "stepdistill.pipelines.RECIPES")
    if spec.base_scheduler is None:
        spec.base_scheduler = _scheduler_from_schedule(spec.student)
    return spec


def _scheduler_from_schedule(student: Denoiser):
    """A scheduler config for a Denoiser's own schedule (when no teacher scheduler is given)."""
    schedule = student.schedule
    if schedule.kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
    from diffusers import DDPMScheduler

    abar = schedule.alphas_cumprod.to(torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = (1 - abar / prev).clamp(0, 1)
    return DDPMScheduler(num_train_timesteps=len(abar), trained_betas=betas.tolist(),
                         prediction_type=student.prediction_type if student.prediction_type != "flow" else "epsilon",
                         timestep_spacing="trailing")


def _other_steps(recipe, scheduler, pipe_name) -> dict[int, list[float]]:
    """What an x0-then-fresh-noise sampler (lcm, tcd, flow_lcm) runs at 1, 2, 4 and 8 steps besides the trained
    count: consistency students are sampled at several."""
    if recipe.sampler not in ("lcm", "tcd", "flow_lcm"):
        return {}
    other = {}
    for k in (1, 2, 4, 8):
        try:
            if k != recipe.num_inference_steps:
                other[k] = student_timesteps(scheduler, k, pipe_name)
        except ValueError:  # LCM / TCDScheduler: more steps than its original_inference_steps grid
            break
    return other


def _export_info(spec, pipe_name, scheduler, ts, mode, scale, lora_info, variants, backbone, name, extra) -> dict:
    recipe = spec.recipe
    config = backbones.unwrap(backbone).config
    kwargs = {"num_inference_steps": recipe.num_inference_steps}
    if pipe_name not in ("DDPMPipeline", "ImageConditionedPipeline") and not (pipe_name == "FluxPipeline"
                                                                              and mode != "embedded"):
        kwargs["guidance_scale"] = scale
    if pipe_name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline") and config.get("sample_size") not in (32, 64, 128):
        kwargs["use_resolution_binning"] = False
    if pipe_name == "FluxPipeline" and spec.image_size:
        kwargs["height"] = kwargs["width"] = int(spec.image_size)
    if recipe.eta is not None:
        kwargs["eta"] = recipe.eta
    kwargs.update(extra or {})
    if pipe_name in ("DDPMPipeline",):
        call_input = "batch_size"
    elif pipe_name in ("DiTPipeline",):
        call_input = "class_labels"
    elif pipe_name == "ClassConditionalPipeline":
        call_input = "class_labels" if config.get("num_class_embeds") else "batch_size"
    elif pipe_name == "ImageConditionedPipeline":
        call_input = "image"
    else:
        call_input = "prompt"
    needs = pipe_name in OWN_PIPELINES or not hasattr(__import__("diffusers"), type(scheduler).__name__)
    dtype = next((p.dtype for p in backbone.parameters()), torch.float32)
    return {
        "name": name,
        "pipeline": pipe_name,
        "pipeline_tag": {"prompt": "text-to-image", "image": "image-to-image"}.get(call_input,
                                                                                   "unconditional-image-generation"),
        "needs_stepdistill": needs,
        "trust_remote_code": needs,
        "denoiser": type(backbone).__name__,
        "recipe": recipe.as_dict(),
        "scheduler": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "num_inference_steps": recipe.num_inference_steps,
        "timesteps": ts,
        "other_steps": _other_steps(recipe, scheduler, pipe_name),
        "guidance": {"mode": mode, "guidance_scale": scale},
        "nfe_per_image": recipe.num_inference_steps * (2 if mode == "cfg" else 1),
        "call": {"input": call_input, "kwargs": kwargs,
                 **({"source_resolution": spec.meta.get("source_resolution"),
                     "source_channels": config.in_channels - config.out_channels} if call_input == "image" else {})},
        "lora": lora_info,
        "variants": list(variants),
        "dtype": str(dtype).replace("torch.", ""),
        "method": spec.method,
        "base_model": spec.base_model,
        "training_steps": spec.training_steps,
        "metrics": dict(spec.metrics or {}),
        "checkpoint": spec.meta.get("checkpoint"),
        "ema": spec.meta.get("ema"),
        "has_config": spec.config is not None,
    }


def _write_meta(folder: Path, spec: ExportSpec, info: dict) -> None:
    from .. import __version__
    from . import card

    meta = {k: v for k, v in spec.meta.items() if k not in ("checkpoint", "ema")}
    meta.update({"stepdistill_version": __version__, "prediction_type": spec.student.prediction_type})
    # the sampling defaults at the top level too, where evaluation looks first
    meta.update({"num_inference_steps": info["num_inference_steps"],
                 "guidance_scale": info["guidance"]["guidance_scale"]})
    if info["recipe"].get("eta") is not None:
        meta["eta"] = info["recipe"]["eta"]
    if all(float(t).is_integer() for t in info["timesteps"]):
        meta["timesteps"] = [int(t) for t in info["timesteps"]]
    if spec.num_classes is not None:
        meta["num_classes"] = spec.num_classes
    (folder / META_FILE).write_text(json.dumps({**meta, "export": info}, indent=1, default=str) + "\n")
    if spec.config is not None:
        from ..config import RunConfig, save_config

        if isinstance(spec.config, RunConfig):
            save_config(spec.config, folder / CONFIG_FILE)
        else:
            import yaml

            (folder / CONFIG_FILE).write_text(yaml.safe_dump(spec.config, sort_keys=False))
    (folder / "README.md").write_text(card.render(info, meta))


# ---------------------------------------------------------------------------------------------- from a run
def export_run(run_dir, out_dir, *, checkpoint=None, ema: bool | None = None, lora_format: str | None = None,
               variants=(), overwrite: bool = False, overrides=(), metrics_file=None) -> Path:
    """Export a training run's student from one of its checkpoints (the latest unless ``checkpoint``).

    The objective is rebuilt from ``RUN_DIR/config.yaml`` (``overrides``: dotted keys, e.g. to point
    ``model.source`` at a moved teacher), the checkpoint is loaded, and the EMA weights are used when the run has
    an EMA (``ema=None``; ``True`` insists, ``False`` uses the raw weights). The model card lists the run's
    ``eval/*`` metrics logged up to the checkpoint and, from ``metrics_file`` (e.g. ``stepdistill eval``'s
    results.json), every number in it.
    """
    from ..config import ConfigError, load_config
    from ..trainers import build_trainer
    from ..trainers.checkpoint import CheckpointError, step_dirs

    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a training run (no config.yaml); give the output_dir of a "
                          "`stepdistill train` run")
    if checkpoint is None and not step_dirs(run_dir / "checkpoints"):
        raise CheckpointError(f"{run_dir} has no checkpoint (checkpoints/step_*): train it first (`stepdistill "
                              f"train {config_path}` writes checkpoints every train.checkpoint_every steps and at the "
                              "end) or pass --checkpoint PATH")
    run = load_config(config_path, list(overrides))
    run.output_dir = str(run_dir)
    run.train.progress = False
    trainer = build_trainer(run)
    try:
        loaded = trainer.load_checkpoint(str(checkpoint) if checkpoint is not None else "latest")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (export rebuilds the model from {config_path}, so the checkpoint must come "
                              "from this run and its config)") from exc
    if not loaded:  # pragma: no cover - guarded above
        raise CheckpointError(f"{run_dir} has no checkpoint to export")
    ckpt_path = Path(checkpoint) if checkpoint is not None else step_dirs(run_dir / "checkpoints")[-1]
    if ema and trainer.ema is None:
        raise CheckpointError(f"the run {run_dir} keeps no EMA (train.ema_decay is 0): export without --ema")
    use_ema = trainer.ema is not None and ema is not False
    objective = trainer.objective
    try:
        spec = objective.export_spec()
    except NotImplementedError as exc:
        raise ExportError(f"method {run.method!r} does not say how to export its student "
                          f"(Objective.export_spec): {exc}") from exc
    spec = copy.copy(spec)
    if hasattr(spec, "base_model") and spec.base_model is None and run.model.source:
        spec.base_model = str(run.model.source)  # the teacher the student was distilled from
    spec.training_steps = trainer.step
    spec.config = run
    spec.meta = {**spec.meta, "checkpoint": str(ckpt_path), "ema": use_ema}
    spec.metrics = {**_run_metrics(run_dir, trainer.step), **(spec.metrics or {}), **_file_metrics(metrics_file)}
    context = trainer.ema_weights() if use_ema else nullcontext()
    with context, torch.no_grad():
        spec.student.eval()
        return export_pipeline(spec, out_dir=out_dir, lora_format=lora_format, variants=variants,
                               overwrite=overwrite)


def _file_metrics(path, limit: int = 40) -> dict:
    """Numbers (and short strings) of a JSON results file, flattened to dotted keys, for the model card."""
    if path is None:
        return {}
    from ..config import ConfigError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"metrics file {path} is not readable JSON ({exc})") from exc
    out = {}

    def walk(node, prefix):
        if len(out) >= limit:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list) and len(node) <= 8:
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        elif (isinstance(node, (int, float)) and not isinstance(node, bool)) or \
                (isinstance(node, str) and len(node) < 60):
            out[prefix] = node

    walk(data, "")
    return out


def _run_metrics(run_dir: Path, step: int) -> dict:
    """The latest ``eval/*`` values logged up to ``step`` in the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) > step:
            continue
        for key, value in row.items():
            if key.startswith("eval/"):
                out[key[len("eval/"):]] = value
                out["evaluated_at_step"] = row.get("step")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """``stepdistill export RUN_DIR --out DIR [--ema/--no-ema] [--lora-format ...] [--checkpoint PATH]``."""
    import argparse

    p = subparsers.add_parser("export", help="write a run's student as a Diffusers pipeline folder")
    p.add_argument("run_dir", help="the output_dir of a training run (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="the folder to write (DiffusionPipeline.from_pretrained loads it)")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA weights (default: when the run keeps an EMA)")
    p.add_argument("--lora-format", choices=LORA_FORMATS, default=None,
                   help="LoRA students: Diffusers LoRA weights, fused weights, or both (default: diffusers where "
                        "the pipeline can load LoRA, else fused)")
    p.add_argument("--variant", action="append", choices=sorted(VARIANT_DTYPES), default=[],
                   help="also write fp16 / bf16 weight variants (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    p.add_argument("--metrics", default=None, help="a JSON results file (e.g. from `stepdistill eval`) whose numbers "
                                                    "go into the model card")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.source=/new/teacher/path")


def run_cli(args) -> int:
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, ema=args.ema, lora_format=args.lora_format,
                     variants=args.variant, overwrite=args.overwrite, overrides=args.overrides,
                     metrics_file=args.metrics)
    info = json.loads((out / META_FILE).read_text())["export"]
    kw = ", ".join(f"{k}={v!r}" for k, v in info["call"]["kwargs"].items())
    how = "DiffusionPipeline.from_pretrained(out, trust_remote_code=True)" if info["needs_stepdistill"] else \
        "DiffusionPipeline.from_pretrained(out)"
    lora = info.get("lora") or {}
    if lora.get("format") in ("diffusers", "both"):
        how += "; then pipe.load_lora_weights(out) (this folder holds the base weights and the LoRA)"
    at = f" at {info['timesteps']}" if info.get("timesteps") else ""
    print(f"exported {info['pipeline']} ({info['scheduler']}, {info['num_inference_steps']} step(s){at}) to {out}\n"
          f"load: {how}; generate: pipe(..., {kw}); see {out / 'README.md'}")
    return 0
