"""What every export says about itself: ``stepdistill.json`` (the export's facts, read by evaluation), the
resolved training config, and the model card (README.md) with the exact call."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from .. import __version__, backbones
from ..config import RunConfig, save_config
from .sampling import student_timesteps
from .spec import OWN_PIPELINES, ExportSpec


def _py(value) -> str:
    return repr(value)


def call_code(info: dict, path: str = "PATH/TO/THIS/FOLDER") -> str:
    """The exact loading and generating code for an export, from its ``stepdistill.json`` ``export`` entry."""
    lines = ["import torch"]
    pipe_name = info["pipeline"]
    if info["needs_stepdistill"] and pipe_name in ("ClassConditionalPipeline", "ImageConditionedPipeline"):
        lines.append("from diffusers import DiffusionPipeline")
        lines.append("")
        lines.append("# needs `pip install stepdistill`;")
        lines.append(f"# or: from stepdistill.pipelines import {pipe_name}")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({path!r}, trust_remote_code=True)")
    elif info["needs_stepdistill"]:
        lines.append("from diffusers import DiffusionPipeline")
        lines.append("")
        lines.append("# needs `pip install stepdistill` (the scheduler is stepdistill.pipelines."
                     f"{info['scheduler']})")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({path!r}, trust_remote_code=True)")
    else:
        lines.append("from diffusers import DiffusionPipeline")
        lines.append("")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({path!r})  # {pipe_name}, plain Diffusers")
    lora = info.get("lora")
    if lora and lora["format"] in ("diffusers", "both"):
        lines.append(f"pipe.load_lora_weights({path!r})  # LoRA student on its base model (optional: pipe.fuse_lora())")
    if info.get("guidance_adapters"):
        lines.insert(1, "from stepdistill.pipelines import load_guidance_adapters")
        lines.append(f"load_guidance_adapters(pipe, {path!r})  # AGD: the guidance adapters onto the base model")
    call = info["call"]
    args = []
    if call["input"] == "prompt":
        args.append(repr("a photo of a cat"))
    elif call["input"] == "class_labels":
        args.append("class_labels=[0, 1, 2, 3]")
    elif call["input"] == "image":
        size, channels = call.get("source_resolution") or 8, call.get("source_channels") or 1
        lines.append(f"low_res = torch.rand(4, {channels}, {size}, {size}) * 2 - 1  # your sources, in [-1, 1] "
                     "(or PIL images)")
        args.append("image=low_res")
    elif call["input"] == "batch_size":
        args.append("batch_size=4")
    args += [f"{k}={_py(v)}" for k, v in call["kwargs"].items()]
    args.append("generator=torch.Generator().manual_seed(0)")
    lines.append(f"images = pipe({', '.join(args)}).images")
    return "\n".join(lines)


def render(info: dict, meta: dict) -> str:
    """README.md for an export. ``info``: the ``export`` entry of stepdistill.json; ``meta``: the rest."""
    recipe = info["recipe"]
    steps = info["num_inference_steps"]
    method = info.get("method") or "unknown"
    base = info.get("base_model")
    tags = ["stepdistill", "diffusers", "distillation", f"{steps}-step"] + ([method] if method != "unknown" else [])
    if info["call"]["input"] == "class_labels":  # the Hub has no pipeline tag for it: a free tag, not a wrong one
        tags += ["class-conditional", "image-generation"]
    front = ["---", "library_name: diffusers"] + ([f"pipeline_tag: {info['pipeline_tag']}"] if info["pipeline_tag"]
                                                  else []) + ["tags:"] + [f"- {t}" for t in tags]
    if base and "/" in str(base) and not str(base).startswith((".", "/", "~")) and str(base).count("/") == 1:
        front.append(f"base_model: {base}")
    front.append("---")
    guidance = info["guidance"]
    if guidance["mode"] == "embedded":
        g = (f"guidance_scale={guidance['guidance_scale']} is fed to the student's guidance embedding (one network "
             "call per step; no classifier-free guidance)")
    elif guidance["mode"] == "cfg":
        g = (f"classifier-free guidance at guidance_scale={guidance['guidance_scale']} (standard form uncond + s * "
             "(cond - uncond): two network evaluations per step, batched)")
    else:
        g = "none (guidance_scale=1.0: no classifier-free guidance, one network call per step)"
    ts = ", ".join(f"{t:g}" for t in info["timesteps"])
    other = "; ".join(f"{k}: {', '.join(f'{t:g}' for t in v)}" for k, v in (info.get("other_steps") or {}).items())
    loads = ("plain Diffusers (no stepdistill import)" if not info["needs_stepdistill"] else
             "stepdistill installed and `trust_remote_code=True` (the folder's one-line shim imports the installed "
             "class; no code is downloaded)")
    rows = [
        ("base model", base or "trained from scratch"),
        ("method", method),
        ("recipe", f"`{recipe['name']}`: {recipe.get('description') or recipe['sampler']}"),
        ("pipeline", f"`{info['pipeline']}`, loads with {loads}"),
        ("scheduler", f"`{info['scheduler']}` ({_scheduler_summary(info['scheduler_config'])})"),
        ("steps", f"{steps} (timesteps {ts}); network evaluations per image: {info['nfe_per_image']}"),
        *([("other step counts", other)] if other else []),
        ("guidance", g),
        ("training steps", info.get("training_steps") if info.get("training_steps") is not None else "unknown"),
        ("weights", f"safetensors, {info['dtype']}" + (f"; variants: {', '.join(info['variants'])} (load with "
                                                         "variant=...)" if info["variants"] else "")),
    ]
    if meta.get("class_names"):
        rows.append(("classes", "class_labels=i asks for " + ", ".join(f"{i}: {name}" for i, name in
                                                                       enumerate(meta["class_names"]))))
    if info.get("ema") is not None:
        rows.append(("EMA", "EMA weights" if info["ema"] else "raw (non-EMA) weights"))
    if info.get("checkpoint"):
        rows.append(("checkpoint", f"`{info['checkpoint']}`"))
    lora = info.get("lora")
    if lora:
        where = {"diffusers": "`pytorch_lora_weights.safetensors` here (Diffusers `save_lora_weights` format) on "
                              "the base weights in this folder",
                 "fused": "fused into the weights in this folder",
                 "both": "`pytorch_lora_weights.safetensors` here on the base weights, and fused in `fused/`"}
        rows.append(("LoRA", f"rank {lora['rank']}, alpha {lora['alpha']}: {where[lora['format']]}"))
    adapters = info.get("guidance_adapters")
    if adapters:
        rows.append(("guidance adapters", f"`{adapters['file']}` (AGD): {adapters['adapter_parameters']:,} trainable "
                     f"parameters, {100 * adapters['fraction']:.2f}% of the base's {adapters['base_parameters']:,}; "
                     "they load onto this base or any fine-tune of the same architecture"))
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    what = (f"{steps}-step DDIM sampling of a teacher" if method == "teacher" else
            f"a {steps}-step student" if method == "unknown" else f"a {steps}-step {method} student")
    title = f"# {info.get('name') or 'stepdistill export'}: {what}"
    body = [title, "", f"Exported by stepdistill {meta.get('stepdistill_version', '')}. "
            "Generating with the call below runs exactly the timesteps and guidance the student was trained for.",
            "", *table, "", "## Use", "", "```python", call_code(info), "```", ""]
    if adapters:
        body += ["**This folder holds the base weights plus the guidance adapters**: without "
                 "`load_guidance_adapters(pipe, ...)` it is the base model (classifier-free guidance, two network "
                 "calls per step); with them its `guidance_scale` drives the adapters in one call per step.", ""]
    if lora and lora["format"] in ("diffusers", "both"):
        body += ["**This folder holds the base weights plus the LoRA**: without `pipe.load_lora_weights(...)` it "
                 "generates with the base model, not the student.", ""]
    if lora and lora["format"] == "both":
        body += ["The fused pipeline loads on its own:", "", "```python",
                 "pipe = DiffusionPipeline.from_pretrained('PATH/TO/THIS/FOLDER/fused')", "```", ""]
    if lora and lora["format"] in ("diffusers", "both"):
        body += ["The LoRA file also applies to the original base model: load the base pipeline, set its scheduler "
                 f"to this folder's (`{info['scheduler']}.from_pretrained(PATH, subfolder='scheduler')`) and call "
                 "`pipe.load_lora_weights(PATH)`.", ""]
    for heading, text in (meta.get("card_sections") or {}).items():  # a method's own notes (e.g. SNOOPI's NASA)
        body += [f"## {heading}", "", text, ""]
    body += ["## Evaluation", ""]
    metrics = info.get("metrics") or {}
    if metrics:
        body += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt_metric(v)} |" for k, v in metrics.items()]
    else:
        body.append("Not evaluated at export time (run `stepdistill eval` on this folder or the run).")
    body += ["", "## Training", "",
             "The resolved training configuration is in `training_config.yaml`" if info.get("has_config") else
             "No training configuration was given to the export.",
             "", "Machine-readable details (recipe, timesteps, call) are in `stepdistill.json`:", "", "```json",
             json.dumps({k: info[k] for k in ("pipeline", "scheduler", "timesteps", "call")}, indent=1), "```", ""]
    return "\n".join(front + [""] + body)


def _fmt_metric(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _scheduler_summary(config: dict) -> str:
    keys = ("timestep_spacing", "steps_offset", "original_inference_steps", "trained_timesteps", "prediction_type",
            "shift", "shift_terminal", "rescale_betas_zero_snr")
    return ", ".join(f"{k}={config[k]!r}" for k in keys if config.get(k) is not None)


# ---------------------------------------------------------------------------------------------- stepdistill.json
def pipeline_tag(call_input: str) -> str | None:
    """The Hub's pipeline tag for an export called with ``call_input``; None for class labels, which no Hub task
    describes (the card tags them ``class-conditional`` instead of calling them unconditional)."""
    return {"prompt": "text-to-image", "image": "image-to-image", "batch_size": "unconditional-image-generation"}.get(
        call_input)


META_FILE = "stepdistill.json"


CONFIG_FILE = "training_config.yaml"


def other_steps(recipe, scheduler, pipe_name) -> dict[int, list[float]]:
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


def export_info(spec, pipe_name, scheduler, ts, mode, scale, lora_info, variants, backbone, name, extra) -> dict:
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
        "pipeline_tag": pipeline_tag(call_input),
        "needs_stepdistill": needs,
        "trust_remote_code": needs,
        "denoiser": type(backbone).__name__,
        "recipe": recipe.as_dict(),
        "scheduler": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "num_inference_steps": recipe.num_inference_steps,
        "timesteps": ts,
        "other_steps": other_steps(recipe, scheduler, pipe_name),
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


def write_meta(folder: Path, spec: ExportSpec, info: dict) -> None:
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
        if isinstance(spec.config, RunConfig):
            save_config(spec.config, folder / CONFIG_FILE)
        else:
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(spec.config, sort_keys=False))
    (folder / "README.md").write_text(render(info, meta))
