"""Teacher (noise, image) pairs: ``make_pairs`` writes them as sharded safetensors (``stepdistill.data.pairs`` reads them).

Used by DMD's regression loss and by reflow. A pair is ``(z, x)`` where ``z ~ N(0, I)`` and ``x`` is the teacher's
deterministic ODE solution from ``z`` (:func:`stepdistill.solvers.sample`).

What is generated
- Sample ``i`` draws everything from its own ``torch.Generator`` seeded ``sample_seed(PAIRS_STREAM + seed, i)``:
  the rule of ``stepdistill eval``/``bench`` (:func:`stepdistill.data.sample_seed`) on a stream of its own, so
  that a student trained on pairs is never evaluated on its training noise: first its noise
  (float32, ``(channels, resolution, resolution)``), then, with ``labels="random"``, its class (or prompt). So
  the pair set depends on neither the batch size nor the shard size nor on interruptions.
- Conditions: ``labels="balanced"`` gives sample ``i`` class ``i % num_classes`` (prompt ``i % len(prompts)``);
  ``"random"`` draws it uniformly. An unconditional teacher gets none.
- The batch size changes speed and memory only: noise and conditions are the same bit for bit, images the same
  up to float32 rounding (about 1e-6: CPU and GPU kernels sum in an order that depends on the batch size). A
  resumed run with the same batch size gives exactly the bytes of an uninterrupted one.
- Images are the raw ODE solution in the teacher's space (pixels in about [-1, 1], or latents), not clipped.
- Timesteps: those the teacher's scheduler gives for ``nfe`` steps — ``DDIMScheduler.from_config(teacher
  scheduler config)`` for VP teachers (as ``eval``/``bench`` sample the teacher); for flow models (a flow teacher,
  a reflow run, an exported flow student) the uniform Euler grid ``sigma = 1, 1 - 1/K, ..., 1/K`` handed to their
  own flow scheduler (its shift applies), as ``eval`` samples them: the ODE the next reflow round straightens.
- The source may be a teacher folder, a training run folder (its ``final/`` model: the next reflow round's pairs
  from a student run) or an exported pipeline; a run's prompts are encoded by the text encoders of the pipeline it
  started from (:func:`stepdistill.models.pipeline_folder`).
- ``nfe`` means **steps**, i.e. the number of timesteps (what ``num_inference_steps`` means in a pipeline and
  what the teacher's NFE means in ``bench`` for DDIM). DDIM and Euler evaluate the teacher once per step (the
  last step returns its x0 prediction); Heun twice per step except the last step and except a step starting at
  infinite noise (zero-terminal-SNR ``t = 999``), which are Euler steps. The manifest records the exact count as
  ``network_evaluations`` (with CFG each evaluation runs the backbone on the conditional and null batch).

Folder layout (``out_dir``)::

    pairs.json                 the manifest (settings, teacher, timesteps, completed shards)
    pairs-00000.safetensors    noise (N,C,H,W) f32, image (N,C,H,W) f32, index (N,) i64,
    pairs-00001.safetensors    and class_labels (N,) i64 or prompt_index (N,) i64
    prompt-embeddings.safetensors   (text teachers) the Cond fields of every prompt, row = prompt index

Shard ``k`` holds samples ``k * shard_size`` up to ``shard_size`` of them. Each shard is written to a temporary
name and renamed, and is then added to the manifest (also replaced atomically): a shard is whole or absent.
Re-running the same command resumes: completed shards are kept, the rest are made. A run with other settings
in the same folder is refused (:class:`~stepdistill.data.DataError`); a run with another ``n`` but the same
settings keeps the shards it can (so a set can be extended). One writer per folder: a second make-pairs into a
folder in use fails at once (:class:`~stepdistill.locks.FolderInUse`).
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import in_channels, sample_size, unwrap
from .cache import file_sha256, module_fingerprint
from .conditioning import Cond
from .config import ModelConfig
from .data import DataError, PromptRecord, read_prompts, sample_seed
from .data.pairs import (FORMAT, LABEL_MODES, MANIFEST, PROMPT_EMBEDDINGS, SETTINGS_KEYS, SHARD_PATTERN, TMP_PATTERN,
                         VERSION, read_manifest, settings_key, sha256_json, shard_name)
from .locks import hold_folder
from .models import LoadedModel, load_model, pipeline_folder
from .prompts import PromptEncoder
from .solvers import SOLVERS, sample, scheduler_timesteps


PAIRS_STREAM = 2**31  # pair i of seed s is seeded 2**31 + s * 0x9E3779B1 + i: never eval's noise (seed 0: i)


def sample_generator(seed: int, i: int) -> torch.Generator:
    """The generator of pair ``i``: eval's per-sample rule, on a stream disjoint from eval's."""
    return torch.Generator("cpu").manual_seed(sample_seed(PAIRS_STREAM + int(seed), i))


def pair_noise(indices, seed: int, shape: tuple[int, ...], labels: str | None = None, num_labels: int | None = None):
    """The noise (and, with ``labels="random"``, the condition index) of each sample in ``indices``.

    Returns ``(noise (B, *shape) float32, conditions (B,) int64 or None)``; balanced conditions are ``i % num``.
    """
    noise, conds = [], []
    for i in indices:
        g = sample_generator(seed, i)
        noise.append(torch.randn(shape, generator=g))
        if labels == "random":
            conds.append(int(torch.randint(num_labels, (), generator=g)))
        elif labels == "balanced":
            conds.append(int(i) % num_labels)
    noise = torch.stack(noise) if noise else torch.zeros(0, *shape)
    return noise, (torch.tensor(conds, dtype=torch.int64) if labels and num_labels else None)


def teacher_scheduler(scheduler):
    """The scheduler whose timesteps the pairs use: DDIM from the teacher's VP config, or the flow scheduler."""
    from diffusers import DDIMScheduler

    if "FlowMatch" in type(scheduler).__name__:
        return type(scheduler).from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


def pair_timesteps(scheduler, nfe: int) -> list[float]:
    """The timesteps of ``nfe`` steps of :func:`teacher_scheduler` (``scheduler`` is the teacher's own); a flow
    scheduler is handed the uniform Euler grid ``linspace(1, 1/nfe, nfe)`` of sigmas (its shift applies)."""
    sched = teacher_scheduler(scheduler)
    if sched.config.get("use_dynamic_shifting"):
        raise DataError("the teacher's flow scheduler uses dynamic shifting (its timesteps depend on the image "
                        "size); give the teacher a scheduler config with use_dynamic_shifting=false and a fixed shift")
    if "FlowMatch" in type(sched).__name__ and "sigmas" in inspect.signature(sched.set_timesteps).parameters:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / nfe, nfe))
        return [float(t) for t in sched.timesteps]
    return scheduler_timesteps(sched, nfe)


def count_evaluations(schedule, timesteps, solver: str) -> int:
    """How many times :func:`stepdistill.solvers.sample` calls the model along ``timesteps`` (no network run)."""
    calls = [0]

    def fake(x, t):
        calls[0] += 1
        return torch.zeros_like(x)

    sample(fake, schedule, torch.zeros(1, 1, 1, 1), timesteps, solver)
    return calls[0]


# --------------------------------------------------------------------------------------------------------------
# make_pairs
# --------------------------------------------------------------------------------------------------------------

def _load_teacher(model):
    if isinstance(model, LoadedModel):
        return model, (str(model.folder) if model.folder is not None else None)
    if isinstance(model, (str, Path)):
        model = ModelConfig(source=str(model))
    if isinstance(model, ModelConfig):
        return load_model(model), model.source or model.backbone
    raise TypeError(f"make_pairs takes a ModelConfig, a LoadedModel or a model source, not {type(model).__name__}")


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, (str, Path)):
        return [r.prompt for r in read_prompts(prompts)]
    out = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    if not out:
        raise DataError("no prompts given")
    bad = [i for i, p in enumerate(out) if not isinstance(p, str)]
    if bad:
        raise DataError(f"prompts must be strings; prompt {bad[0]} is {type(out[bad[0]]).__name__}")
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _plan(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(shard_size, n - start)) for start in range(0, n, shard_size)]


def _shard_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _generate(denoiser, schedule, timesteps, solver, guidance_scale, noise, cond, device, dtype) -> torch.Tensor:
    """The teacher's ODE solution from ``noise`` (one batch), float32 on the CPU."""
    cond = cond.to(device)

    def x0(x, t):
        return denoiser(x.to(dtype), t, cond, guidance_scale=guidance_scale)

    with torch.no_grad():
        return sample(x0, schedule, noise.to(device), timesteps, solver).float().cpu()


def _write_shard(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a shard under a temporary name, then rename it: it is whole or absent."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def add_shard(path: Path, tensors: dict, key: str, plan: list[tuple[int, int]], k: int, done: dict, manifest: dict,
              manifest_path: Path) -> None:
    """Write shard ``k`` of ``plan`` atomically, record it (with its sha256) in ``done`` and in ``manifest``, and
    rewrite the manifest: what a resumed run trusts (make-pairs, AGD's trajectories)."""
    start, count = plan[k]
    _write_shard(path, tensors, {"settings_key": key, "start": str(start), "count": str(count)})
    done[k] = {"file": path.name, "start": start, "count": count, "sha256": file_sha256(path)}
    manifest["shards"] = [done[j] for j in sorted(done)]
    manifest["complete"] = len(done) == len(plan)
    _write_json(manifest_path, manifest)


def make_pairs(model, out_dir, n: int, *, solver: str = "ddim", nfe: int = 25, guidance_scale: float = 1.0,
               batch_size: int = 256, shard_size: int = 1024, seed: int = 0, labels: str = "balanced",
               prompts=None, prompt_encoder=None, device=None, progress: bool = True) -> Path:
    """Generate ``n`` teacher (noise, image) pairs into ``out_dir`` (see the module docstring); returns the manifest
    path. Resumes when ``out_dir`` holds an interrupted run with the same settings.

    ``model``: a :class:`~stepdistill.config.ModelConfig`, a :class:`~stepdistill.models.LoadedModel` or a source
    string (``digits-teacher``, a teacher folder, a Hub id). ``solver``: ``ddim``, ``euler``, ``heun`` or
    ``dpmpp_2m``; ``nfe``: the number of **steps** (timesteps of the teacher's scheduler; Heun evaluates about
    twice per step).
    ``guidance_scale``: standard CFG (1 = none). ``labels``: ``balanced`` (``i % num_classes``) or ``random``.
    ``prompts``: a prompt file or a list of strings for text teachers, encoded once with ``prompt_encoder`` (by
    default :meth:`PromptEncoder.from_pretrained` of the teacher's pipeline folder). ``batch_size`` changes speed
    and memory, and the images only by float32 rounding. ``device``: default CUDA when available, else CPU.
    """

    if solver not in SOLVERS:
        raise DataError(f"unknown solver {solver!r}; expected one of {', '.join(sorted(SOLVERS))}")
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {', '.join(LABEL_MODES)}, not {labels!r}")
    for name, value in (("n", n), ("nfe", nfe), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, not {value!r}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, not {seed}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder")
    with hold_folder(out_dir, "stepdistill make-pairs"):
        return _write_pairs(model, out_dir, n, solver, nfe, guidance_scale, batch_size, shard_size, seed, labels,
                            prompts, prompt_encoder, device, progress)


def _write_pairs(model, out_dir: Path, n, solver, nfe, guidance_scale, batch_size, shard_size, seed, labels, prompts,
                 prompt_encoder, device, progress) -> Path:
    loaded, source = _load_teacher(model)
    denoiser = loaded.denoiser.eval()  # no_grad below; requires_grad is left as the caller set it
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    denoiser.to(device)
    backbone = unwrap(denoiser.backbone)
    dtype = next(backbone.parameters()).dtype
    schedule = denoiser.schedule
    meta = loaded.meta or {}
    resolution = int(meta.get("resolution") or sample_size(backbone) or 0)
    channels = int(meta.get("channels") or in_channels(backbone))
    if resolution < 1:
        raise DataError("cannot tell the teacher's resolution: add \"resolution\" to its stepdistill.json")

    # conditions
    prompt_list, prompt_cond, num_classes = None, None, None
    if prompts is not None:
        prompt_list = _prompt_list(prompts)
        if prompt_encoder is None:
            folder = pipeline_folder(Path(loaded.folder)) if loaded.folder is not None else None
            if folder is None:
                raise DataError("prompts need a text encoder: give a teacher pipeline folder (model_index.json), a "
                                "run of one or an export, or pass prompt_encoder=PromptEncoder(...)")
            prompt_encoder = PromptEncoder.from_pretrained(folder, device=device)
        prompt_cond = prompt_encoder.encode(prompt_list).to("cpu")
        if guidance_scale != 1 and denoiser.null_cond is None:
            denoiser.null_cond = prompt_encoder.null().to(device)
        num_conditions = len(prompt_list)
    else:
        num_classes = meta.get("num_classes")
        if num_classes is None and backbone.config.get("num_class_embeds"):
            num_classes = int(backbone.config.num_class_embeds)
        num_conditions = num_classes
        if guidance_scale != 1 and num_classes is None:
            raise DataError("guidance needs a conditional teacher (class labels or prompts); this teacher is "
                            "unconditional: use guidance 1")
        if guidance_scale != 1 and denoiser.null_class is None:
            raise DataError("guidance needs the teacher's null class: add \"num_classes\" to its stepdistill.json")
    label_mode = labels if num_conditions else None

    timesteps = pair_timesteps(loaded.scheduler, nfe)
    sched = teacher_scheduler(loaded.scheduler)
    settings = {
        "teacher_weights": module_fingerprint(backbone),
        "teacher_dtype": str(dtype).replace("torch.", ""),
        "prediction_type": denoiser.prediction_type,
        "scheduler": type(sched).__name__,
        "timesteps": timesteps,
        "solver": solver,
        "nfe": nfe,
        "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "labels": label_mode,
        "num_classes": num_classes,
        "prompts_sha256": sha256_json(prompt_list) if prompt_list is not None else None,
        "shard_size": shard_size,
        "resolution": resolution,
        "channels": channels,
    }
    key = settings_key(settings)
    plan = _plan(n, shard_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(out_dir)
    done: dict[int, dict] = {}
    if old is not None:
        diffs = [k for k in SETTINGS_KEYS if old.get(k) != settings[k]]
        if diffs:
            shown = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(settings[k])} here" for k in diffs[:4])
            raise DataError(f"{out_dir} holds pairs made with other settings ({shown}); use another --out, "
                            f"or delete {out_dir} to replace them")
        for shard in old.get("shards", []):
            k = shard["start"] // shard_size
            path = out_dir / shard["file"]
            if (k < len(plan) and (shard["start"], shard["count"]) == plan[k] and shard["file"] == shard_name(k)
                    and path.is_file() and (_shard_metadata(path) or {}).get("settings_key") == key):
                done[k] = shard
    # leftovers: temporary files of interrupted writes, and shards the manifest does not list
    listed = {s["file"] for s in done.values()}
    for path in out_dir.iterdir():
        if TMP_PATTERN.match(path.name) or (SHARD_PATTERN.match(path.name) and path.name not in listed):
            path.unlink()

    import diffusers

    manifest = {
        "format": FORMAT, "version": VERSION,
        "teacher": {"source": source, "folder": str(Path(loaded.folder).resolve()) if loaded.folder else None,
                    "backbone": type(backbone).__name__, "schedule": schedule.kind},
        **settings,
        "steps": nfe,
        "network_evaluations": count_evaluations(schedule, timesteps, solver),
        "backbone_passes_per_evaluation": 2 if guidance_scale != 1 else 1,
        "n": n,
        "num_shards": len(plan),
        "prompts": prompt_list,
        "seeding": "sample i: torch.Generator seeded sample_seed(2**31 + seed, i) (a stream disjoint from "
                   "eval's sample_seed(seed, i)); noise first, then a random label",
        "created_with": {"stepdistill": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "device": str(device)},
        "complete": False,
        "shards": [done[k] for k in sorted(done)],
    }
    if prompt_cond is not None:
        from safetensors.torch import save_file

        tmp = out_dir / f"{PROMPT_EMBEDDINGS}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in prompt_cond.as_dict().items()}, str(tmp))
        os.replace(tmp, out_dir / PROMPT_EMBEDDINGS)
    _write_json(out_dir / MANIFEST, manifest)

    from tqdm.auto import tqdm

    todo = [k for k in range(len(plan)) if k not in done]
    bar = tqdm(total=n, initial=sum(plan[k][1] for k in done), desc="teacher pairs", unit="pair",
               disable=not progress, dynamic_ncols=True)
    try:
        for k in todo:
            start, count = plan[k]
            parts, idx_all, conds_all = [], [], []
            for b in range(start, start + count, batch_size):
                idx = list(range(b, min(b + batch_size, start + count)))
                noise, cond_idx = pair_noise(idx, seed, (channels, resolution, resolution), label_mode,
                                             num_conditions)
                if prompt_cond is not None:
                    cond = prompt_cond[cond_idx]
                elif cond_idx is not None:
                    cond = Cond(class_labels=cond_idx)
                else:
                    cond = Cond()
                image = _generate(denoiser, schedule, timesteps, solver, guidance_scale, noise, cond, device, dtype)
                parts.append((noise, image))
                idx_all.extend(idx)
                if cond_idx is not None:
                    conds_all.append(cond_idx)
                bar.update(len(idx))
            tensors = {"noise": torch.cat([p[0] for p in parts]), "image": torch.cat([p[1] for p in parts]),
                       "index": torch.tensor(idx_all, dtype=torch.int64)}
            if conds_all:
                tensors["prompt_index" if prompt_cond is not None else "class_labels"] = torch.cat(conds_all)
            add_shard(out_dir / shard_name(k), tensors, key, plan, k, done, manifest, out_dir / MANIFEST)
    finally:
        bar.close()
    if not manifest["complete"]:  # every shard was already there
        manifest["complete"] = True
        _write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

def add_cli(sub) -> None:
    p = sub.add_parser("make-pairs", help="generate teacher (noise, image) pairs into sharded safetensors (resumable)")
    p.add_argument("--teacher", default="digits-teacher",
                   help="'digits-teacher', a teacher folder (unet/ + scheduler/), a training run folder (its final/ "
                        "model: the next reflow round from a student run), an exported pipeline, or a Hub id in the "
                        "local cache")
    p.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    p.add_argument("--n", type=int, default=1024, help="number of pairs")
    p.add_argument("--solver", choices=("ddim", "euler", "heun", "dpmpp_2m"), default="ddim",
                   help="teacher ODE solver (dpmpp_2m: DPM-Solver++(2M), the most accurate per evaluation)")
    p.add_argument("--nfe", type=int, default=25,
                   help="teacher steps (timesteps of its scheduler); heun evaluates about twice per step")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale, standard form (1 = none)")
    p.add_argument("--labels", choices=LABEL_MODES, default="balanced",
                   help="balanced: class i %% num_classes; random: drawn per sample")
    p.add_argument("--prompts", default=None, help="prompt file (.txt or .jsonl) for text-to-image teachers")
    p.add_argument("--batch-size", type=int, default=256,
                   help="speed/memory only (the images change by float32 rounding at most)")
    p.add_argument("--shard-size", type=int, default=1024, help="pairs per safetensors file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own); on a busy shared CPU 1 thread can be faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    import time

    if args.threads is not None:
        if args.threads < 1:
            raise DataError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = make_pairs(ModelConfig(source=args.teacher), args.out, args.n, solver=args.solver, nfe=args.nfe,
                      guidance_scale=args.guidance, batch_size=args.batch_size, shard_size=args.shard_size,
                      seed=args.seed, labels=args.labels, prompts=args.prompts, device=args.device,
                      progress=not args.no_progress)
    manifest = json.loads(path.read_text())
    print(f"{manifest['n']} pairs in {path.parent} ({manifest['num_shards']} shards, {args.solver} at "
          f"{manifest['steps']} steps = {manifest['network_evaluations']} teacher evaluations, guidance "
          f"{manifest['guidance_scale']:g}) in {time.perf_counter() - t0:.1f} s")
    return 0
