"""Export: a student becomes a folder that ``DiffusionPipeline.from_pretrained`` loads and that samples in the
student's trained steps.

- :func:`export_pipeline` writes an in-memory student (a :class:`~stepdistill.Denoiser`, or an
  :class:`ExportSpec` from ``objective.export_spec()``) with a :class:`~stepdistill.pipelines.recipes.Recipe`.
- :func:`stepdistill.runs.export_run` (``stepdistill export RUN_DIR --out DIR``) rebuilds a run's objective from
  its ``config.yaml``, loads a checkpoint (the latest, or ``checkpoint=``), puts in the EMA weights and exports.

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
from pathlib import Path

import torch

from .. import backbones
from ..denoiser import Denoiser
from ..guided import (ADAPTER_FILE, MODEL_CLASSES, adapter_fraction, base_config, guidance_range_of,
                      has_guidance_adapters, save_guidance_adapters)
from ._shim import write_shim
from .card import META_FILE, export_info, write_meta
from .recipes import ExportError, Recipe, get_recipe
from .sampling import student_timesteps
from .spec import (OWN_PIPELINES, ExportSpec, export_scheduler, guidance_plan, pipeline_for, quiet_diffusers,
                   scheduler_from_schedule)
from .weights import VARIANT_DTYPES, adapter_name, check_keys, lora_payload, plain_state_dict, write_model

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_FORMATS = ("diffusers", "fused", "both")
#: the component a pipeline's LoRA loader takes (``save_lora_weights(<prefix>_lora_layers=...)``)
LORA_PREFIX = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
               "LatentConsistencyModelPipeline": "unet", "StableDiffusion3Pipeline": "transformer",
               "FluxPipeline": "transformer", "ClassConditionalPipeline": "unet", "ImageConditionedPipeline": "unet"}
#: pipelines that pass their guidance_scale to a guidance-taking denoiser (``time_cond_proj_dim``) and skip CFG
ADAPTER_GUIDED_PIPELINES = ("ClassConditionalPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                            "LatentConsistencyModelPipeline")
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


# ---------------------------------------------------------------------------------------------- choosing


def pipeline_class(name: str):
    if name in OWN_PIPELINES:
        from .. import pipelines

        return getattr(pipelines, name)
    import diffusers

    return getattr(diffusers, name)


def check_fit(student: Denoiser, recipe: Recipe, pipeline: str, scheduler, timesteps: list[float]) -> None:
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


def read_index(folder: Path | None) -> dict:
    """The base folder's model_index.json ({} for a bare model folder such as the digits teacher's)."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise ExportError(f"base folder {folder} does not exist; give the teacher's Diffusers pipeline folder")
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an export of this package: its ``stepdistill.json`` holds an ``export`` entry (a teacher
    folder's, or a pipeline another tool wrote, does not)."""
    try:
        return "export" in json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def prepare_folder(out_dir: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside ``out_dir`` to write an export into (see :func:`publish_folder`)."""
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} already exists; choose another --out or pass --overwrite")
        if any(out_dir.iterdir()) and not is_export(out_dir):
            shown = ", ".join(sorted(p.name for p in out_dir.iterdir())[:8])
            raise ExportError(f"{out_dir} is not a folder stepdistill exported (its {META_FILE} has no export entry), "
                              f"so --overwrite would delete what it holds ({shown}, ...); choose another --out")
    tmp = out_dir.parent / f".{out_dir.name}.exporting"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, out_dir: Path) -> None:
    """Put the finished temporary folder in place of ``out_dir`` (a reader sees the old export or the new one)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _assemble(pipeline: str, scheduler, components: dict, linked: dict, base_index: dict, denoiser_name: str,
              backbone, state: dict, folder: Path, variants, extra_init: dict,
              denoiser_config: dict | None = None) -> None:
    """Write one pipeline folder: in-memory components via save_pretrained, the denoiser from ``state`` (with
    ``denoiser_config`` instead of its own, if given), linked components from the base folder, and a model_index.json
    that names them all. A denoiser of stepdistill's own class (GuidedUNet2DModel) is named through a one-line
    shim, as the pipeline and scheduler classes are."""
    cls = pipeline_class(pipeline)
    expected, optional = cls._get_signature_keys(cls)
    kwargs = {name: None for name in expected}
    kwargs.update({k: v for k, v in components.items() if k in expected})
    kwargs["scheduler"] = scheduler
    kwargs[denoiser_name] = None
    kwargs.update({k: v for k, v in extra_init.items() if k in optional or k in expected})
    with quiet_diffusers():
        pipe = cls(**kwargs)
        pipe.save_pretrained(folder, safe_serialization=True)
        for variant in variants:
            dtype = VARIANT_DTYPES[variant]
            for name, module in components.items():
                if isinstance(module, torch.nn.Module) and name in expected:
                    copy.deepcopy(module).to(dtype).save_pretrained(folder / name, variant=variant,
                                                                    safe_serialization=True)
    write_model(backbone, state, folder / denoiser_name, variants, denoiser_config)
    index = json.loads((folder / "model_index.json").read_text())
    index[denoiser_name] = ["diffusers", type(backbone).__name__]
    if type(backbone).__name__ in MODEL_CLASSES:
        index[denoiser_name] = [denoiser_name, type(backbone).__name__]
        write_shim(folder / denoiser_name / f"{denoiser_name}.py", type(backbone).__name__)
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
    base_index = read_index(base_folder)
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
    base_index = read_index(base_folder) if base_folder else {}
    pipe_name = pipeline_for(student, base_index.get("_class_name") if isinstance(base_index.get("_class_name"), str)
                             else None, pipeline or spec.pipeline)
    denoiser_name = "unet" if "UNet" in type(backbone).__name__ else "transformer"

    # the scheduler, as the pipeline will hold it, and the timesteps it runs
    scheduler = export_scheduler(student, recipe, spec.base_scheduler, pipe_name)
    with quiet_diffusers():
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
    check_fit(student, recipe, pipe_name, scheduler, ts)
    if recipe.eta is not None and "eta" not in inspect.signature(pipeline_class(pipe_name).__call__).parameters:
        raise ExportError(f"recipe {recipe.name!r} samples with eta={recipe.eta} (TCD's gamma), but {pipe_name}'s call "
                          "takes no eta: export with the lcm recipe, or to a pipeline that passes eta to its scheduler")
    mode, scale = guidance_plan(student, recipe, pipe_name, (spec.meta or {}).get("guidance_range"))
    adapters = has_guidance_adapters(backbone)  # AGD: the base's weights here, its adapters in a file of their own
    denoiser_config = base_config(backbone) if adapters else None

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
        adapter = adapter_name(backbone)
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

    tmp = prepare_folder(out_dir, overwrite)
    try:
        main_state = plain_state_dict(backbone, merge=is_lora and lora_format == "fused")
        if adapters:
            main_state = {k: v for k, v in main_state.items() if ".guidance_adapter." not in k}
        check_keys(backbone, main_state, denoiser_config)
        _assemble(pipe_name, scheduler, components, linked, base_index, denoiser_name, backbone, main_state, tmp,
                  variants, extra_init, denoiser_config)
        if adapters:
            # pipelines that pass no guidance input (DiTPipeline) run the adapters at the recorded scale
            default = scale if pipe_name not in ADAPTER_GUIDED_PIPELINES else None
            save_guidance_adapters(backbone, tmp / ADAPTER_FILE, guidance_range=(spec.meta or {}).get(
                "guidance_range") or guidance_range_of(backbone), default_guidance_scale=default)
            extra = {**(extra or {}), **({"guidance_scale": 1.0} if default is not None else {})}
        lora_info = None
        if is_lora:
            lora_info = {"format": lora_format, "rank": int(lora_config.r), "alpha": float(lora_config.lora_alpha),
                         "target_modules": sorted(lora_config.target_modules or []),
                         "weight_name": LORA_WEIGHT_NAME if lora_format != "fused" else None,
                         "fused_folder": "fused" if lora_format == "both" else None}
            if lora_format in ("diffusers", "both"):
                layers, config_dict = lora_payload(backbone, pipe_name)
                prefix = LORA_PREFIX[pipe_name]
                with quiet_diffusers():
                    pipeline_class(pipe_name).save_lora_weights(
                        str(tmp), **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": config_dict},
                        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
            if lora_format == "both":
                fused = plain_state_dict(backbone, merge=True)
                _assemble(pipe_name, scheduler, components, linked, base_index, denoiser_name, backbone, fused,
                          tmp / "fused", variants, extra_init, denoiser_config)
        info = export_info(spec, pipe_name, scheduler, ts, mode, scale, lora_info, variants, backbone, name, extra)
        if adapters:
            info["guidance_adapters"] = {"file": ADAPTER_FILE, **adapter_fraction(backbone),
                                         "load": "stepdistill.pipelines.load_guidance_adapters(pipe, PATH)"}
        write_meta(tmp, spec, info)
        if lora_format == "both" and is_lora:
            fused_info = {**info, "lora": {**lora_info, "format": "fused", "weight_name": None, "fused_folder": None}}
            write_meta(tmp / "fused", spec, fused_info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, out_dir)
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
    else:
        recipe = recipe if recipe is not None else spec.recipe  # an ExportSpec's own, with steps / guidance given
        if recipe is not None and (steps is not None or guidance_scale is not None):
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
        spec.base_scheduler = scheduler_from_schedule(spec.student)
    return spec


# ---------------------------------------------------------------------------------------------- from a run


# ---------------------------------------------------------------------------------------------- CLI


