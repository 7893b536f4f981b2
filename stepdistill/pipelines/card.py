"""The model card (README.md) written into every export."""
from __future__ import annotations

import json


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
    front = ["---", "library_name: diffusers", f"pipeline_tag: {info['pipeline_tag']}",
             "tags:"] + [f"- {t}" for t in tags]
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
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    what = (f"{steps}-step DDIM sampling of a teacher" if method == "teacher" else
            f"a {steps}-step student" if method == "unknown" else f"a {steps}-step {method} student")
    title = f"# {info.get('name') or 'stepdistill export'}: {what}"
    body = [title, "", f"Exported by stepdistill {meta.get('stepdistill_version', '')}. "
            "Generating with the call below runs exactly the timesteps and guidance the student was trained for.",
            "", *table, "", "## Use", "", "```python", call_code(info), "```", ""]
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
