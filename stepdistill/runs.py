"""Runs: rebuild a training run from its folder and export its student (``stepdistill export``)."""
from __future__ import annotations

import argparse
import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import ConfigError
from .models import teacher_folder
from .pipelines.export import LORA_FORMATS, META_FILE, VARIANT_DTYPES, export_pipeline
from .pipelines.recipes import ExportError
from .trainers import build_trainer, load_config
from .trainers.checkpoint import CheckpointError, step_dirs


def export_run(run_dir, out_dir, *, checkpoint=None, ema: bool | None = None, lora_format: str | None = None,
               variants=(), overwrite: bool = False, overrides=(), metrics_file=None) -> Path:
    """Export a training run's student from one of its checkpoints (the latest unless ``checkpoint``).

    The objective is rebuilt from ``RUN_DIR/config.yaml`` (``overrides``: dotted keys, e.g. to point
    ``model.source`` at a moved teacher), the checkpoint is loaded, and the EMA weights are used when the run has
    an EMA (``ema=None``; ``True`` insists, ``False`` uses the raw weights). The model card lists the run's
    ``eval/*`` metrics logged up to the checkpoint and, from ``metrics_file`` (e.g. ``stepdistill eval``'s
    results.json), every number in it.
    """
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
    _check_out(Path(out_dir), run_dir, teacher_folder(run.model))
    run.train.progress = False
    trainer = build_trainer(run)
    try:
        loaded = trainer.load_checkpoint(str(checkpoint) if checkpoint is not None else "latest", quiet=True)
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
    if hasattr(spec, "base_model") and (spec.base_model or run.model.source):  # what it was distilled from
        spec.base_model = model_name(str(spec.base_model or run.model.source))
    spec.training_steps = trainer.step
    spec.config = run
    spec.meta = {**spec.meta, "checkpoint": run_relative(ckpt_path, run_dir), "ema": use_ema}
    teacher = teacher_folder(run.model)
    if "class_names" not in spec.meta and teacher is not None and (teacher / META_FILE).is_file():
        names = json.loads((teacher / META_FILE).read_text()).get("class_names")  # what its labels mean
        if names:
            spec.meta["class_names"] = names
    spec.metrics = {**_run_metrics(run_dir, trainer.step), **(spec.metrics or {}), **_file_metrics(metrics_file)}
    context = trainer.ema_weights() if use_ema else nullcontext()
    with context, torch.no_grad():
        spec.student.eval()
        return export_pipeline(spec, out_dir=out_dir, lora_format=lora_format, variants=variants,
                               overwrite=overwrite)


def _check_out(out_dir: Path, run_dir: Path, teacher: Path | None) -> None:
    """An export never replaces (nor, with --overwrite, deletes) the run it comes from or its teacher."""
    out = out_dir.expanduser().resolve()
    for what, folder in (("the run folder", run_dir), ("the run's teacher (model.source)", teacher)):
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if out == folder or out in folder.parents:
            raise ExportError(f"--out {out_dir} is {what} {folder} or holds it: an export there would replace it; "
                              "export to a folder of its own")


def model_name(source: str) -> str:
    """How a model card names a teacher: a Hub id or a shipped name as given, a local folder by its name only (no
    path of the machine that exported it)."""
    path = Path(source).expanduser()
    return path.name if path.is_absolute() or source.startswith((".", "~")) or path.exists() else source


def run_relative(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run folder (``checkpoints/step_0000400``); a path outside it by its name."""
    try:
        return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _file_metrics(path, limit: int = 40) -> dict:
    """Numbers (and short strings) of a JSON results file, flattened to dotted keys, for the model card."""
    if path is None:
        return {}
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


def add_cli(subparsers) -> None:
    """``stepdistill export RUN_DIR --out DIR [--ema/--no-ema] [--lora-format ...] [--checkpoint PATH]``."""
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
    if info.get("guidance_adapters"):
        how += ("; then stepdistill.pipelines.load_guidance_adapters(pipe, out) (this folder holds the base weights and "
                "the AGD guidance adapters)")
    at = f" at {info['timesteps']}" if info.get("timesteps") else ""
    print(f"exported {info['pipeline']} ({info['scheduler']}, {info['num_inference_steps']} step(s){at}) to {out}\n"
          f"load: {how}; generate: pipe(..., {kw}); see {out / 'README.md'}")
    return 0
