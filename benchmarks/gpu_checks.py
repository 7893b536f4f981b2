"""GPU checks: mixed precision (fp16, bf16, fp32), attention kernels (PyTorch SDPA, xformers), CUDA peak memory
and training throughput, through the project's own trainer.

A — the LCM recipe at Stable Diffusion 1.5 size. ``configs/lcm_sd15.yaml`` runs with only the overrides a benchmark
needs (teacher folder, prompt file, output folder, step count; no periodic checkpoints, samples or logs) on a
pipeline folder of SD 1.5's architecture built here offline with random weights (UNet2DConditionModel
with SD 1.5's config, ~860M parameters; SD's AutoencoderKL; a 12-layer, 768-wide CLIPTextModel with the tests'
character-level tokenizer at 77 tokens; SD 1.5's PNDMScheduler) and 64 prompts, each naming a random-noise
512 px PNG. Weights, prompts and images are random, so only time and memory mean anything. Variants, each in
a fresh process (so ``torch.cuda.max_memory_allocated`` is its own), batch 12 (the recipe's per-GPU batch):
fp16 (the recipe), bf16, bf16 + ``model.attention=xformers``, bf16 + ``train.gradient_checkpointing=true``, fp32.
The prompt encodings and VAE latents are cached once by the project's own ``prompt_dataset`` and the cache is
copied into each variant's run folder, where the same cache keys find it.

B — attention micro-check on the same UNet: batch 8, latents 4x64x64, text states 8x77x768, random timesteps.
The fp32 forward with Diffusers' default processors (SDPA) and TF32 off is the reference; fp32 (PyTorch's default
flags: cuDNN convolutions in TF32), bf16 SDPA, fp16 SDPA and bf16 xformers run, the last three under autocast on
the fp32 weights, as mixed-precision training does. Reported: ||out - ref|| / ||ref|| of the forward, the median
forward+backward time (3 warm-ups, 10 repeats; CUDA events) and the peak CUDA memory of those passes (weights and
inputs included).

C — the digits recipes (``configs/ict_digits.yaml``, ``configs/lcm_lora_digits_1step.yaml``,
``configs/dmd2_digits_1step.yaml``) at fp32 and bf16, 10 warm-up + 100 timed steps each.

Timing (A and C): a callback added to the trainer synchronises the device and takes ``time.perf_counter()`` at
the end of every step; s/step is the mean over the timed steps (after the warm-up steps: allocator growth, cuDNN
and kernel selection), the median per-step time is given beside it. ``train_summary.json``'s own s/step also
counts the warm-up steps and the final checkpoint and export, so it is not used for speed; its
``peak_cuda_allocated_mb`` is the memory figure. In A only the recipe row writes the final checkpoint and
export (timed, reported as a note): the other rows skip those writes (~17 GB each), which follow the last step.

With ``--tiny`` the same code runs on small models (A and B: the tiny SD-layout folder of
tests/test_dmd_recipes.py, latent 8) for a few steps, on the CPU; what needs CUDA or xformers is reported as
skipped with the reason (as is a variant the project's config or model loading rejects: ConfigError,
ModelLoadError). Every variant is guarded: a failure is recorded with its message and the run goes on;
``--budget`` seconds bound the whole run (variants that would start after it are skipped). results.json is
rewritten after every variant.

    python benchmarks/gpu_checks.py [--parts A,B,C] [--tiny] [--out benchmarks/results/gpu] [--budget 450]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
WORDS = (["a", "the", "one", "big", "small", "red", "blue", "old"],
         ["cat", "dog", "zebra", "house", "tree", "car", "boat", "horse"])
N_PROMPTS = 64
A_VARIANTS = [
    ("fp16 (recipe)", ["train.mixed_precision=fp16"]),
    ("bf16", ["train.mixed_precision=bf16"]),
    ("bf16 + xformers", ["train.mixed_precision=bf16", "model.attention=xformers"]),
    ("bf16 + grad ckpt", ["train.mixed_precision=bf16", "train.gradient_checkpointing=true"]),
    ("fp32", ["train.mixed_precision=no"]),
]
C_CONFIGS = ["configs/ict_digits.yaml", "configs/lcm_lora_digits_1step.yaml", "configs/dmd2_digits_1step.yaml"]
C_PRECISIONS = ["no", "bf16"]
STEPS = {  # (warm-up, timed)
    "A": (3, 10), "A_fp32": (2, 5), "C": (10, 100),
    "tiny": (1, 2),
}
PROCESSORS = {"AttnProcessor2_0": "SDPA", "XFormersAttnProcessor": "xformers", "AttnProcessor": "eager"}
RANDOM_WEIGHTS = ("Random weights, prompts and images (Part A/B): only time and memory are meaningful; losses and "
                  "outputs are not.")


# ---------------------------------------------------------------------------------------------- environment
def environment() -> dict:
    import accelerate
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "xformers": _xformers_version(), "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain"))}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_memory_mb=round(props.total_memory / 2**20),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def _xformers_version() -> str | None:
    try:
        import xformers
    except Exception:
        return None
    return xformers.__version__


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


# ---------------------------------------------------------------------------------------------- inputs
def sd15_folder(path: Path) -> Path:
    """SD 1.5's architecture, random weights: UNet, VAE, 12-layer CLIP text encoder, PNDMScheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from test_dmd_recipes import SCALED
    from tiny import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = SD15_CLIP["max_position_embeddings"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=PNDMScheduler(**SCALED, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def prompt_file(root: Path, pixels: int) -> Path:
    """``N_PROMPTS`` prompts (letters only: the tokenizer is character-level), each naming a random-noise PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(N_PROMPTS):
        prompt = f"{WORDS[0][i % 8]} {WORDS[1][(i // 8) % 8]}"
        Image.fromarray(rng.integers(0, 255, (pixels, pixels, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"images/{i}.png"}))
    path = root / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- worker side
def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from stepdistill.config import ConfigError
    from stepdistill.models import ModelLoadError

    try:
        result = {"train": train_variant, "prepare": prepare_cache, "attention": attention_check}[spec["kind"]](spec)
    except (ConfigError, ModelLoadError) as exc:
        result = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    Path(spec["result"]).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cache_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")} if folder.is_dir() else set()


def prepare_cache(spec: dict) -> dict:
    """Fill the run's cache (encoded prompts, the null prompt, VAE latents) with the project's own code."""
    import stepdistill.models as models
    from stepdistill.trainers import load_config
    from stepdistill.data import build_dataset

    run = load_config(spec["config"], spec["overrides"])
    t0 = time.perf_counter()
    data = build_dataset(run.data, run.model, cache_dir=run.cache_dir)
    models.text_null_cond(run.model, run.cache_dir, run.data.resolution)
    return {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), "items": len(data),
            "latent_shape": list(data[0]["image"].shape), "files": sorted(_cache_files(run.cache_dir))}


def _backbones(objective) -> dict:
    from stepdistill.backbones import unwrap

    out = {}
    for name, child in objective.named_children():
        backbone = getattr(child, "backbone", None)
        if backbone is None:
            continue
        model = unwrap(backbone)
        processors = getattr(model, "attn_processors", None)
        out[name] = {"attention": sorted({type(p).__name__ for p in processors.values()}) if processors else [],
                     "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}
    return out


def train_variant(spec: dict) -> dict:
    """Build the run with the project's trainer, time every step with a callback, read train_summary.json."""
    from stepdistill.trainers import load_config
    from stepdistill.trainers import build_trainer
    from stepdistill.trainers.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.times, self.peak_allocated, self.peak_reserved = [], None, None

        def on_step_end(self, trainer, step):
            _sync()
            self.times.append(time.perf_counter())
            if torch.cuda.is_available():
                self.peak_allocated = torch.cuda.max_memory_allocated() / 2**20
                self.peak_reserved = torch.cuda.max_memory_reserved() / 2**20

    out = Path(spec["output_dir"])
    if spec.get("cache"):
        shutil.copytree(spec["cache"], out / "cache", dirs_exist_ok=True)
    cached = _cache_files(out / "cache")
    run = load_config(spec["config"], spec["overrides"])
    t0 = time.perf_counter()
    trainer = build_trainer(run)
    setup = time.perf_counter() - t0
    timer, writes = StepTimer(), {}
    trainer.callbacks.append(timer)
    if spec["save"]:
        _time_calls(trainer, "save_checkpoint", writes)
        _time_calls(trainer.objective, "save_pretrained", writes)
    else:
        trainer.save_checkpoint = lambda: None
        trainer.objective.save_pretrained = lambda directory: None
    _sync()
    timer.times.append(time.perf_counter())
    trainer.train(resume=None)
    summary = json.loads((out / "train_summary.json").read_text())
    warm = spec["warmup"]
    steps = np.diff(timer.times)
    timed = steps[warm:]
    mean = (timer.times[-1] - timer.times[warm]) / len(timed)
    return {"status": "ok", "setup_seconds": round(setup, 2), "warmup_steps": warm, "timed_steps": len(timed),
            "seconds_per_step": round(mean, 4), "median_step_seconds": round(float(np.median(timed)), 4),
            "warmup_step_seconds": [round(float(s), 3) for s in steps[:warm]],
            "samples_per_second": round(run.train.batch_size / mean, 2), "batch_size": run.train.batch_size,
            "peak_cuda_allocated_mb": summary.get("peak_cuda_allocated_mb"),
            "peak_cuda_allocated_mb_at_last_step": _round(timer.peak_allocated),
            "peak_cuda_reserved_mb": _round(timer.peak_reserved), "peak_cpu_rss_mb": summary.get("peak_cpu_rss_mb"),
            "final_writes_seconds": {k: round(v, 2) for k, v in writes.items()} or None,
            "cache_miss": sorted(_cache_files(out / "cache") - cached) if spec.get("cache") else None,
            "modules": _backbones(trainer.objective), "trainable_parameters": summary.get("trainable_parameters"),
            "summary": summary}


def _time_calls(obj, name: str, seconds: dict) -> None:
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)


def _round(x, digits=1):
    return None if x is None else round(float(x), digits)


def attention_check(spec: dict) -> dict:
    """Part B in one process: the fp32 SDPA reference, then each (precision, attention) variant on the same UNet."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if spec["tiny"]:
        from test_dmd_recipes import UNET

        unet, tokens, width = UNet2DConditionModel(cross_attention_dim=32, **UNET), 16, 32
    else:
        unet, tokens, width = UNet2DConditionModel(**SD15_UNET), 77, 768
    unet = unet.to(device).train()
    size, n = unet.config.sample_size, spec["batch"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    states = torch.randn(n, tokens, width, generator=g).to(device)

    def forward(dtype):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return unet(x, t, states).sample

    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = forward(torch.float32).float()
    rows = []
    variants = [("fp32", torch.float32, "sdpa"), ("bf16", torch.bfloat16, "sdpa"), ("fp16", torch.float16, "sdpa"),
                ("bf16", torch.bfloat16, "xformers")]
    for precision, dtype, attention in variants:
        row = {"precision": precision, "attention": attention}
        rows.append(row)
        if device == "cpu" and precision == "fp16":
            row.update(status="skipped", reason="CPU run: fp16 autocast is checked on CUDA only")
            continue
        try:
            if attention == "xformers":
                unet.enable_xformers_memory_efficient_attention()
            else:
                unet.set_attn_processor(AttnProcessor2_0())
        except Exception as exc:
            missing = " (xformers is not installed)" if _xformers_version() is None else ""
            row.update(status="skipped", reason=f"{type(exc).__name__}{missing}: {exc}"[:500])
            continue
        try:
            row.update(status="ok", processors=sorted({type(p).__name__ for p in unet.attn_processors.values()}),
                       **_attention_timing(unet, forward, dtype, ref, spec["warmup"], spec["repeats"]))
        except Exception as exc:
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    unet.set_attn_processor(AttnProcessor2_0())
    return {"status": "ok", "device": device, "batch": n, "latents": [4, size, size], "text_states": [tokens, width],
            "parameters": sum(p.numel() for p in unet.parameters()), "rows": rows}


def _attention_timing(unet, forward, dtype, ref, warmup: int, repeats: int) -> dict:
    cuda = ref.is_cuda
    with torch.no_grad():
        out = forward(dtype).float()
    err = float((out - ref).norm() / ref.norm())
    del out

    def step():
        forward(dtype).float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"relative_error": err, "median_fwd_bwd_seconds": round(statistics.median(times), 5),
            "peak_cuda_allocated_mb": _round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


# ---------------------------------------------------------------------------------------------- parent side
class Runner:
    """Runs workers in fresh processes under the overall time budget and keeps results.json current."""

    def __init__(self, out: Path, work: Path, budget: float, doc: dict):
        self.out, self.work, self.doc = out, work, doc
        self.deadline = time.monotonic() + budget
        self.log = out / "log.txt"
        self.count = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, spec: dict, name: str) -> dict:
        if self.left() < 20:
            return {"status": "skipped", "reason": "out of the time budget (--budget)"}
        self.count += 1
        spec_path = self.work / f"spec{self.count}.json"
        spec["result"] = str(self.work / f"result{self.count}.json")
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        with open(self.log, "a") as log:
            log.write(f"\n==== {name}\n")
            log.flush()
            try:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=max(10.0, self.left() - 5))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = round(time.perf_counter() - t0, 1)
        result_path = Path(spec["result"])
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        else:
            result = {"status": "failed", "error": f"worker exited ({code}) without a result; see log.txt",
                      "log_tail": _tail(self.log)}
        result["process_seconds"] = wall
        print(f"[{name}] {result['status']} in {wall:.0f} s"
              + (f": {result.get('reason') or result.get('error')}" if result["status"] != "ok" else ""), flush=True)
        return result

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        (self.out / "table.md").write_text(markdown(self.doc))


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def guarded(fn, runner: Runner, part: dict, *args) -> None:
    try:
        fn(runner, part, *args)
    except Exception as exc:
        part.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    runner.save()


def part_a(runner: Runner, part: dict, tiny: bool) -> None:
    root = runner.work / "A"
    t0 = time.perf_counter()
    if tiny:
        from test_dmd_recipes import LATENT, sd_folder
        from tiny import tiny_vae

        folder, latent, pixels = sd_folder(root / "sd"), LATENT, tiny_vae().config.sample_size
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            folder, latent, pixels = sd15_folder(root / "sd15"), SD15_UNET["sample_size"], SD15_VAE["sample_size"]
        finally:
            torch.set_num_threads(threads)
    prompts = prompt_file(root, pixels)
    part.update(status="ok", note=RANDOM_WEIGHTS, config="configs/lcm_sd15.yaml",
                folder_seconds=round(time.perf_counter() - t0, 1),
                model={"unet": "SD 1.5 config" if not tiny else "tiny sd_folder (tests/test_dmd_recipes.py)",
                       "latent": latent, "pixels": pixels, "prompts": N_PROMPTS}, variants=[])
    common = [f"model.source={folder}", f"data.path={prompts}", f"data.resolution={latent}",
              "train.checkpoint_every=0", "train.sample_every=0", "train.progress=false", "train.log_every=1000000"]
    prep_dir = root / "prepare"
    part["prepare"] = runner.call({"kind": "prepare", "config": str(ROOT / part["config"]),
                                   "overrides": common + [f"output_dir={prep_dir}"]}, "A: cache")
    runner.save()
    cache = str(prep_dir / "cache") if part["prepare"]["status"] == "ok" else None
    for i, (name, overrides) in enumerate(A_VARIANTS):
        warm, timed = STEPS["tiny"] if tiny else STEPS["A_fp32" if name == "fp32" else "A"]
        row = {"variant": name, "overrides": overrides}
        if "model.attention=xformers" in overrides and torch.cuda.is_available() and _xformers_version() is None:
            row.update(status="skipped", reason='xformers is not installed (pip install -e ".[xformers]")')
        else:
            out = root / f"run{i}"
            row.update(runner.call({"kind": "train", "config": str(ROOT / part["config"]), "output_dir": str(out),
                                    "overrides": [*common, f"output_dir={out}", f"train.max_steps={warm + timed}",
                                                  *overrides],
                                    "cache": cache, "save": i == 0, "warmup": warm}, f"A: {name}"))
            shutil.rmtree(out, ignore_errors=True)
        part["variants"].append(row)
        runner.save()
    shutil.rmtree(folder, ignore_errors=True)


def part_b(runner: Runner, part: dict, tiny: bool) -> None:
    part.update(runner.call({"kind": "attention", "tiny": tiny, "batch": 8, "warmup": 3, "repeats": 10},
                            "B: attention"))
    part["note"] = RANDOM_WEIGHTS


def part_c(runner: Runner, part: dict, tiny: bool) -> None:
    warm, timed = STEPS["tiny" if tiny else "C"]
    part.update(status="ok", warmup_steps=warm, timed_steps=timed, variants=[])
    for config in C_CONFIGS:
        for precision in C_PRECISIONS:
            out = runner.work / "C" / f"{Path(config).stem}-{precision}"
            overrides = [f"output_dir={out}", f"train.max_steps={warm + timed}", "train.checkpoint_every=0",
                         "train.sample_every=0", "train.progress=false", "train.log_every=1000000",
                         f"train.mixed_precision={precision}"]
            row = {"config": config, "precision": "fp32" if precision == "no" else precision}
            row.update(runner.call({"kind": "train", "config": str(ROOT / config), "output_dir": str(out),
                                    "overrides": overrides, "save": True, "warmup": warm},
                                   f"C: {Path(config).stem} {row['precision']}"))
            part["variants"].append(row)
            shutil.rmtree(out, ignore_errors=True)
            runner.save()


# ---------------------------------------------------------------------------------------------- tables
def _mb(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _status(row: dict) -> str:
    if row.get("status") == "ok":
        return "ok"
    text = (row.get("reason") or row.get("error") or "").strip()
    return f"{row.get('status')}: {text.splitlines()[0][:160] if text else '?'}"


def markdown(doc: dict) -> str:
    env, parts = doc["environment"], doc["parts"]
    lines = [f"# GPU checks ({'tiny, ' if doc['settings']['tiny'] else ''}{env.get('device')})", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), diffusers {env['diffusers']}, "
             f"xformers {env['xformers'] or 'not installed'}; TF32 matmul {env['tf32_matmul']}, "
             f"TF32 cuDNN {env['tf32_cudnn']}; commit {env['git_commit'][:10]}{' (dirty)' if env['git_dirty'] else ''}",
             "", RANDOM_WEIGHTS, ""]
    if "A" in parts:
        a = parts["A"]
        lines += ["## A — LCM recipe (configs/lcm_sd15.yaml) at SD 1.5 size", ""]
        if a.get("status") != "ok":
            lines += [_status(a), ""]
        else:
            model = a["model"]
            lines += [f"{model['unet']}, latent {model['latent']} ({model['pixels']} px images), {model['prompts']} "
                      f"prompts; cache fill: {_status(a['prepare'])} ({a['prepare'].get('seconds', '—')} s).", "",
                      "| variant | status | s/step (mean) | s/step (median) | samples/s | peak CUDA alloc MB | "
                      "peak CUDA reserved MB | peak RSS MB | attention (student / teacher) | grad ckpt | setup s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in a["variants"]:
                ok = r.get("status") == "ok"
                mods = r.get("modules") or {}
                attn = " / ".join(",".join(PROCESSORS.get(a, a) for a in mods[m]["attention"])
                                  for m in ("student", "teacher") if m in mods) or "—"
                ckpt = ",".join(m for m, v in mods.items() if v["gradient_checkpointing"]) or "—"
                lines.append(f"| {r['variant']} | {_status(r)} | "
                             + (f"{r['seconds_per_step']:.3f} | {r['median_step_seconds']:.3f} | "
                                f"{r['samples_per_second']:.1f} | {_mb(r['peak_cuda_allocated_mb'])} | "
                                f"{_mb(r['peak_cuda_reserved_mb'])} | {_mb(r['peak_cpu_rss_mb'])} | {attn} | {ckpt} | "
                                f"{r['setup_seconds']:.0f} |" if ok else " | ".join(["—"] * 9) + " |"))
            writes = next((r["final_writes_seconds"] for r in a["variants"] if r.get("final_writes_seconds")), None)
            if writes:
                lines += ["", "Final checkpoint + export (recipe row only): "
                          + ", ".join(f"{k} {v:.1f} s" for k, v in writes.items()) + "."]
            misses = [r["variant"] for r in a["variants"] if r.get("cache_miss")]
            if misses:
                lines += ["", f"Cache miss (re-encoded in the timed process): {', '.join(misses)}."]
            lines.append("")
    if "B" in parts:
        b = parts["B"]
        lines += ["## B — attention micro-check (UNet forward+backward, autocast on fp32 weights)", ""]
        if b.get("status") != "ok":
            lines += [_status(b), ""]
        else:
            lines += [f"{b['device']}, {b['parameters'] / 1e6:.2f}M-parameter UNet, batch {b['batch']}, latents "
                      f"{'x'.join(map(str, b['latents']))}, text states {'x'.join(map(str, b['text_states']))}. "
                      "Reference: the fp32 forward with TF32 off (matmul and cuDNN); the fp32 row runs PyTorch's "
                      "default flags (cuDNN convolutions in TF32 on CUDA).", "",
                      "| precision | attention | status | rel. error vs fp32 | median fwd+bwd s | peak CUDA alloc MB |",
                      "|---|---|---|---|---|---|"]
            for r in b["rows"]:
                ok = r.get("status") == "ok"
                err = f"{r['relative_error']:.2e}" if ok else "—"
                lines.append(f"| {r['precision']} | {r['attention']} | {_status(r)} | {err} | "
                             + (f"{r['median_fwd_bwd_seconds']:.4f} | {_mb(r['peak_cuda_allocated_mb'])} |" if ok
                                else " | ".join(["—"] * 2) + " |"))
            lines.append("")
    if "C" in parts:
        c = parts["C"]
        lines += [f"## C — digits recipes ({c.get('warmup_steps')} warm-up + {c.get('timed_steps')} timed steps)", ""]
        if c.get("status") != "ok":
            lines += [_status(c), ""]
        else:
            lines += ["| config | precision | status | s/step (mean) | s/step (median) | samples/s | "
                      "peak CUDA alloc MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
            for r in c["variants"]:
                ok = r.get("status") == "ok"
                lines.append(f"| {r['config']} | {r['precision']} | {_status(r)} | "
                             + (f"{r['seconds_per_step']:.4f} | {r['median_step_seconds']:.4f} | "
                                f"{r['samples_per_second']:.0f} | {_mb(r['peak_cuda_allocated_mb'])} | "
                                f"{_mb(r['peak_cpu_rss_mb'])} |" if ok else " | ".join(["—"] * 5) + " |"))
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="A,B,C", help="comma-separated parts to run (A, B, C)")
    p.add_argument("--tiny", action="store_true", help="small models, a few steps (runs on the CPU)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    p.add_argument("--work", default=None, help="scratch folder for models and runs (default: a temporary one)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    parts = [s.strip().upper() for s in args.parts.split(",") if s.strip()]
    unknown = set(parts) - {"A", "B", "C"}
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from A, B, C")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").unlink(missing_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_checks_"))
    work.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(), "settings": {"tiny": args.tiny, "parts": parts, "budget_s": args.budget,
                                                      "steps": STEPS}, "parts": {}}
    runner = Runner(out, work, args.budget, doc)
    started = time.perf_counter()
    for name, fn in (("A", part_a), ("B", part_b), ("C", part_c)):
        if name in parts:
            t0 = time.perf_counter()
            doc["parts"][name] = {}
            guarded(fn, runner, doc["parts"][name], args.tiny)
            doc["parts"][name]["part_seconds"] = round(time.perf_counter() - t0, 1)
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    runner.save()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
