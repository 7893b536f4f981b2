"""Export round trips: every backbone family and recipe is exported from a tiny student, loaded with
``DiffusionPipeline.from_pretrained`` in one fresh process (stock pipelines first, with ``import stepdistill``
blocked), called exactly as its model card says, and compared with sampling the student directly
(``sample_student``: the student Denoiser through the scheduler's updates) — same seed, same pixels, and the
expected number of network calls and rows (CFG doubles the batch).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from stepdistill import Cond, Denoiser, NoiseSchedule
from stepdistill.prompts import PromptEncoder
from stepdistill.pipelines import ExportError, ExportSpec, export_pipeline, get_recipe, sample_student
from stepdistill.pipelines.sampling import student_timesteps

from tiny import clip_model, clip_tokenizer, t5_model, t5_tokenizer, tiny_vae
PROMPTS = ["a cat", "zebra"]
LABELS = [3, 7]
B = 2
SEED = 1234
ATOL = 1e-4  # on images in [0, 1]: far below one uint8 level (0.0039)


# ---------------------------------------------------------------------------------------------- tiny parts
def vp(prediction_type="epsilon", **kw):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, **kw)


def _unet_small(**kw):
    return dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **kw)


CROSS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=2, in_channels=4, out_channels=4)


def _perturb_lora(denoiser, seed=3):
    """LoRA B starts at zero; give the adapters weight so that the student differs from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _student(model, scheduler, prediction_type=None, **kw):
    torch.manual_seed(0)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    ptype = prediction_type or ("flow" if schedule.kind == "flow" else scheduler.config.prediction_type)
    return Denoiser(model, schedule, ptype, **kw).eval()


# ---------------------------------------------------------------------------------------------- decoding
def decode(vae, latents, shift: bool):
    x = latents / vae.config.scaling_factor
    if shift:
        x = x + vae.config.shift_factor
    with torch.no_grad():
        return vae.decode(x).sample


def to_np(images):
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    folder: str
    reference: np.ndarray
    steps: int
    cfg: bool
    pipeline: str
    stock: bool = True
    loader: str = "DiffusionPipeline"
    extra_jobs: dict = field(default_factory=dict)  # job name -> overrides (lora / fused loads)


def _job(case: Case, name=None, **over):
    info = json.loads(open(os.path.join(case.folder, "stepdistill.json")).read())["export"]
    job = {"name": name or case.name, "folder": case.folder, "trust": info["trust_remote_code"],
           "stock": case.stock, "loader": case.loader, "input": info["call"]["input"],
           "kwargs": info["call"]["kwargs"], "prompts": PROMPTS, "labels": LABELS, "batch": B, "seed": SEED,
           "lora_from": None}
    job.update(over)
    return job


def _generator():
    return torch.Generator().manual_seed(SEED)


def _text_reference(student, scheduler_folder, vae, enc, steps, shape, pipeline, guidance=None, embedded=None,
                    shift=False, flux=False, eta=None):
    sched = _load_scheduler(scheduler_folder)
    cond = enc.encode(PROMPTS)
    if embedded is not None:
        cond.guidance = torch.full((B,), float(embedded))
    g = _generator()
    noise = torch.randn(shape, generator=g)
    lat = sample_student(student, sched, noise, steps, cond, guidance_scale=guidance, generator=g, pipeline=pipeline,
                         eta=eta)
    return to_np(decode(vae, lat, shift))


def _load_scheduler(folder):
    config = json.loads(open(os.path.join(folder, "scheduler", "scheduler_config.json")).read())
    import diffusers

    from stepdistill.pipelines import schedulers

    cls = getattr(schedulers, config["_class_name"], None) or getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(os.path.join(folder, "scheduler"))


def _pixel_reference(student, folder, steps, shape, cond=None, guidance=None, eta=None):
    sched = _load_scheduler(folder)
    g = _generator()
    noise = torch.randn(shape, generator=g)
    return to_np(sample_student(student, sched, noise, steps, cond, guidance_scale=guidance, generator=g, eta=eta))


def build_cases(tmp) -> list[Case]:
    cases = []
    out = lambda name: str(tmp / name)  # noqa: E731

    # 1-2. unconditional pixel UNet -> DDPMPipeline (stock): one-step LCM, and two-step DDIM trailing
    torch.manual_seed(1)
    unet = UNet2DModel(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, **_unet_small())
    s = _student(unet, vp("sample"))
    export_pipeline(s, get_recipe("lcm", 1), out("ddpm_lcm1"), base_scheduler=vp("sample"))
    cases.append(Case("ddpm_lcm1", out("ddpm_lcm1"), _pixel_reference(s, out("ddpm_lcm1"), 1, (B, 3, 8, 8)), 1,
                      False, "DDPMPipeline"))
    s = _student(unet, vp("v_prediction"))
    export_pipeline(s, get_recipe("ddim_trailing", 2), out("ddpm_ddim2"), base_scheduler=vp("v_prediction"))
    cases.append(Case("ddpm_ddim2", out("ddpm_ddim2"), _pixel_reference(s, out("ddpm_ddim2"), 2, (B, 3, 8, 8)),
                      2, False, "DDPMPipeline"))

    # 3-4. class-conditional pixel UNet -> ClassConditionalPipeline (stepdistill): LoRA, two-step uniform LCM,
    # both LoRA formats; and a one-step generator at t=399 (a stock DDIM config: leading spacing, steps_offset 399)
    torch.manual_seed(2)
    cunet = UNet2DModel(in_channels=1, out_channels=1, num_class_embeds=11, down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2, **_unet_small())
    base = vp("v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s = _student(copy.deepcopy(cunet), base, null_class=10).with_lora(rank=2, alpha=4)
    _perturb_lora(s)
    labels = Cond(class_labels=torch.tensor(LABELS))
    export_pipeline(s, get_recipe("lcm_uniform", 2), out("cc_lora"), base_scheduler=base, lora_format="both",
                    method="dmd2", num_classes=10)
    ref = _pixel_reference(s, out("cc_lora"), 2, (B, 1, 8, 8), labels)
    cases.append(Case("cc_lora", out("cc_lora"), ref, 2, False, "ClassConditionalPipeline", stock=False,
                      extra_jobs={"cc_lora": {"lora_from": out("cc_lora")},
                                  "cc_lora_fused": {"folder": out("cc_lora/fused")}}))
    # TCD, three steps at gamma 0.4 on the zero-terminal-SNR schedule; the pipeline's saved eta is its default
    s = _student(copy.deepcopy(cunet), base, "sample", null_class=10)
    export_pipeline(s, get_recipe("tcd", 3, eta=0.4), out("cc_tcd"), base_scheduler=base, num_classes=10)
    card_kwargs = json.loads((tmp / "cc_tcd" / "stepdistill.json").read_text())["export"]["call"]["kwargs"]
    assert card_kwargs["eta"] == 0.4
    cases.append(Case("cc_tcd", out("cc_tcd"), _pixel_reference(s, out("cc_tcd"), 3, (B, 1, 8, 8), labels, eta=0.4),
                      3, False, "ClassConditionalPipeline", stock=False, loader="ClassConditionalPipeline",
                      extra_jobs={"cc_tcd": {}, "cc_tcd_saved_eta": {
                          "kwargs": {k: v for k, v in card_kwargs.items() if k != "eta"}}}))
    s = _student(cunet, base, "sample", null_class=10)
    export_pipeline(s, get_recipe("lcm", timesteps=[399], guidance_scale=3.0), out("cc_t399"), base_scheduler=base)
    cases.append(Case("cc_t399", out("cc_t399"), _pixel_reference(s, out("cc_t399"), 1, (B, 1, 8, 8), labels, 3.0),
                      1, True, "ClassConditionalPipeline", stock=False, loader="ClassConditionalPipeline"))

    # 5-6. SD 1.x-style UNet2DConditionModel -> StableDiffusionPipeline: LoRA student (both formats) with LCM;
    # a one-step generator at t=399, which SD's pipeline cannot run with a stock config -> StudentLCMScheduler
    tok, te = clip_tokenizer(), clip_model()
    vae = tiny_vae()
    sd_enc = PromptEncoder("sd", tokenizer=tok, text_encoder=te)
    sd_parts = {"tokenizer": tok, "text_encoder": te, "vae": vae}
    torch.manual_seed(3)
    sd_unet = UNet2DConditionModel(cross_attention_dim=32, **CROSS, **_unet_small())
    s = _student(copy.deepcopy(sd_unet), vp("epsilon")).with_lora(rank=2)
    _perturb_lora(s, seed=4)
    export_pipeline(s, get_recipe("lcm", 2), out("sd_lora"), base_scheduler=vp("epsilon"), components=sd_parts,
                    lora_format="both")
    ref = _text_reference(s, out("sd_lora"), vae, sd_enc, 2, (B, 4, 8, 8), "StableDiffusionPipeline")
    cases.append(Case("sd_lora", out("sd_lora"), ref, 2, False, "StableDiffusionPipeline",
                      extra_jobs={"sd_lora": {"lora_from": out("sd_lora")},
                                  "sd_lora_fused": {"folder": out("sd_lora/fused")}, "sd_lora_base": {}}))
    s = _student(sd_unet, vp("sample"))
    export_pipeline(s, get_recipe("lcm", timesteps=[399], custom_scheduler=True), out("sd_t399"),
                    base_scheduler=vp("sample"), components=sd_parts)
    ref = _text_reference(s, out("sd_t399"), vae, sd_enc, 1, (B, 4, 8, 8), "StableDiffusionPipeline")
    cases.append(Case("sd_t399", out("sd_t399"), ref, 1, False, "StableDiffusionPipeline", stock=False))
    # TCD on the stock pipeline: the card's call passes eta (gamma 0.4) to TCDScheduler.step
    s = _student(sd_unet, vp("epsilon"))
    export_pipeline(s, get_recipe("tcd", 3, eta=0.4), out("sd_tcd"), base_scheduler=vp("epsilon"), components=sd_parts)
    ref = _text_reference(s, out("sd_tcd"), vae, sd_enc, 3, (B, 4, 8, 8), "StableDiffusionPipeline", eta=0.4)
    cases.append(Case("sd_tcd", out("sd_tcd"), ref, 3, False, "StableDiffusionPipeline"))

    # 7. guidance-embedded (LCM, time_cond_proj_dim) -> LatentConsistencyModelPipeline, w = s - 1
    torch.manual_seed(4)
    lcm_unet = UNet2DConditionModel(cross_attention_dim=32, time_cond_proj_dim=8, **CROSS, **_unet_small())
    s = _student(lcm_unet, vp("epsilon"))
    export_pipeline(s, get_recipe("lcm", 2, guidance_scale=3.0), out("lcm_embedded"), base_scheduler=vp("epsilon"),
                    components=sd_parts)
    ref = _text_reference(s, out("lcm_embedded"), vae, sd_enc, 2, (B, 4, 8, 8), "LatentConsistencyModelPipeline",
                          embedded=3.0)
    cases.append(Case("lcm_embedded", out("lcm_embedded"), ref, 2, False, "LatentConsistencyModelPipeline"))

    # 8. SDXL with CFG (s = 2, null = zeros as force_zeros_for_empty_prompt), components linked from a base folder
    from diffusers import StableDiffusionXLPipeline

    tok2, te2 = clip_tokenizer(), clip_model(1, hidden=48, projection=True)
    xl_base = tmp / "sdxl_base"
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                              unet=None, scheduler=vp("epsilon"), add_watermarker=False).save_pretrained(xl_base)
    torch.manual_seed(5)
    xl_unet = UNet2DConditionModel(**{**CROSS, "cross_attention_dim": 80}, addition_embed_type="text_time",
                                   addition_time_embed_dim=4, projection_class_embeddings_input_dim=48 + 6 * 4,
                                   **_unet_small())
    xl_enc = PromptEncoder("sdxl", tokenizer=tok, text_encoder=te, tokenizer_2=tok2, text_encoder_2=te2, size=16)
    s = _student(xl_unet, vp("v_prediction"), null_cond=xl_enc.null())
    export_pipeline(s, get_recipe("ddim_trailing", 2, guidance_scale=2.0), out("sdxl_cfg"),
                    base_scheduler=vp("v_prediction"), base_folder=xl_base)
    ref = _text_reference(s, out("sdxl_cfg"), vae, xl_enc, 2, (B, 4, 8, 8), "StableDiffusionXLPipeline", guidance=2.0)
    cases.append(Case("sdxl_cfg", out("sdxl_cfg"), ref, 2, True, "StableDiffusionXLPipeline"))

    # 9. PixArt (T5) -> PixArtAlphaPipeline, two-step LCM
    t5tok, t5 = t5_tokenizer(), t5_model()
    torch.manual_seed(6)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=8,
                                      caption_channels=32)
    px_enc = PromptEncoder("pixart", tokenizer=t5tok, text_encoder=t5)
    s = _student(pixart, vp("v_prediction"))
    export_pipeline(s, get_recipe("lcm", 2), out("pixart"), base_scheduler=vp("v_prediction"),
                    components={"tokenizer": t5tok, "text_encoder": t5, "vae": vae})
    ref = _text_reference(s, out("pixart"), vae, px_enc, 2, (B, 4, 8, 8), "PixArtAlphaPipeline")
    cases.append(Case("pixart", out("pixart"), ref, 2, False, "PixArtAlphaPipeline"))

    # 10. DiT -> DiTPipeline, two-step DDIM trailing, with an fp16 variant
    torch.manual_seed(7)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    s = _student(dit, vp("v_prediction"), null_class=10)
    export_pipeline(s, get_recipe("ddim_trailing", 2), out("dit"), base_scheduler=vp("v_prediction"),
                    components={"vae": vae}, variants=("fp16",))
    sched = _load_scheduler(out("dit"))
    g = _generator()
    lat = sample_student(s, sched, torch.randn(B, 4, 8, 8, generator=g), 2, Cond(class_labels=torch.tensor(LABELS)))
    cases.append(Case("dit", out("dit"), to_np(decode(vae, lat, False)), 2, False, "DiTPipeline"))

    # 11. SD3 (flow) -> StableDiffusion3Pipeline, two-step flow Euler, LoRA in Diffusers format
    svae = tiny_vae(shift_factor=0.1)
    l1, l2 = clip_model(2, projection=True), clip_model(3, projection=True)
    sd3_parts = {"tokenizer": tok, "text_encoder": l1, "tokenizer_2": tok, "text_encoder_2": l2,
                 "tokenizer_3": t5tok, "text_encoder_3": t5, "vae": svae}
    torch.manual_seed(8)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=4, num_attention_heads=2, joint_attention_dim=32,
                                caption_projection_dim=8, pooled_projection_dim=64, pos_embed_max_size=8)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3_enc = PromptEncoder("sd3", **{k: v for k, v in sd3_parts.items() if k != "vae"})
    s = _student(sd3, flow).with_lora(rank=2)
    _perturb_lora(s, seed=6)
    export_pipeline(s, get_recipe("flow_euler", 2), out("sd3_lora"), base_scheduler=flow, components=sd3_parts)
    ref = _text_reference(s, out("sd3_lora"), svae, sd3_enc, 2, (B, 4, 8, 8), "StableDiffusion3Pipeline", shift=True)
    cases.append(Case("sd3_lora", out("sd3_lora"), ref, 2, False, "StableDiffusion3Pipeline",
                      extra_jobs={"sd3_lora": {"lora_from": out("sd3_lora")}}))

    # 12. Flux, guidance-embedded -> FluxPipeline (raw guidance), two-step flow Euler on its sigma grid
    fl_parts = {"tokenizer": tok, "text_encoder": te, "tokenizer_2": t5tok, "text_encoder_2": t5, "vae": svae}
    torch.manual_seed(9)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    fl_enc = PromptEncoder("flux", **{k: v for k, v in fl_parts.items() if k != "vae"})
    s = _student(flux, flow)
    export_pipeline(s, get_recipe("flow_euler", 2, guidance_scale=3.5), out("flux"), base_scheduler=flow,
                    components=fl_parts, image_size=16)
    ref = _text_reference(s, out("flux"), svae, fl_enc, 2, (B, 4, 8, 8), "FluxPipeline", embedded=3.5, shift=True)
    cases.append(Case("flux", out("flux"), ref, 2, False, "FluxPipeline"))
    return cases


WORKER = textwrap.dedent('''
    import importlib.abc, json, os, sys, traceback

    class BlockStepdistill(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "stepdistill" or name.startswith("stepdistill."):
                raise ImportError("stepdistill is blocked in this process: " + name)
            return None

    jobs, out_dir = json.load(open(sys.argv[1])), sys.argv[2]
    blocker = BlockStepdistill()
    sys.meta_path.insert(0, blocker)
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()
    results = {}

    def loaded_stepdistill():
        return sorted(m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill."))

    def run(job):
        if job["loader"] == "ClassConditionalPipeline":
            from stepdistill.pipelines import ClassConditionalPipeline
            pipe = ClassConditionalPipeline.from_pretrained(job["folder"])
        else:
            pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=job["trust"])
        pipe.set_progress_bar_config(disable=True)
        if job["lora_from"]:
            pipe.load_lora_weights(job["lora_from"])
        net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        rows = []
        def count(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            rows.append(int(x.shape[0]))
        net.register_forward_pre_hook(count, with_kwargs=True)
        inputs = {"prompt": {"prompt": job["prompts"]}, "class_labels": {"class_labels": job["labels"]},
                  "batch_size": {"batch_size": job["batch"]}}[job["input"]]
        images = pipe(**inputs, **job["kwargs"], generator=torch.Generator().manual_seed(job["seed"]),
                      output_type="np").images
        np.save(os.path.join(out_dir, job["name"] + ".npy"), np.asarray(images, dtype=np.float32))
        return {"calls": len(rows), "rows": sum(rows), "pipeline": type(pipe).__name__,
                "scheduler": type(pipe.scheduler).__name__, "stepdistill_modules": loaded_stepdistill()[:3]}

    for phase in ("stock", "stepdistill"):
        if phase == "stepdistill":
            sys.meta_path.remove(blocker)
        for job in jobs:
            if job["stock"] == (phase == "stock"):
                try:
                    results[job["name"]] = {"phase": phase, **run(job)}
                except Exception:
                    results[job["name"]] = {"phase": phase, "error": traceback.format_exc()}
    json.dump(results, open(os.path.join(out_dir, "results.json"), "w"))
''')


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny class-conditional teacher run (2 steps, EMA, CFG 2 at 2 DDIM steps) and its trainer."""
    from tiny import tiny_teacher_raw

    from stepdistill.trainers import resolve
    from stepdistill.trainers import build_trainer

    root = tmp_path_factory.mktemp("teacher")
    raw = tiny_teacher_raw(root / "run", max_steps=2, ema_decay=0.9, batch_size=8)
    raw["objective"]["sample_guidance"] = 2.0
    trainer = build_trainer(resolve(raw))
    trainer.train()
    return root / "run", trainer


def teacher_case(run_dir, trainer, out) -> Case:
    """``stepdistill export RUN --out DIR``; the reference is the teacher's own sampler (solvers.sample, DDIM)."""
    from stepdistill.cli import main

    metrics = out.parent / "eval_results.json"
    metrics.write_text(json.dumps({"fid": 41.5, "protocol": {"n": 1000, "features": "digits-cnn"}}))
    assert main(["export", str(run_dir), "--out", str(out), "--variant", "fp16", "--metrics", str(metrics)]) == 0
    with trainer.ema_weights():
        images = trainer.objective.sample({"batch_size": B, "class_label": torch.tensor(LABELS)},
                                          generator=_generator())
    return Case("teacher_cli", str(out), to_np(images), 2, True, "ClassConditionalPipeline", stock=False)


@pytest.fixture(scope="module")
def roundtrips(tmp_path_factory, teacher_run):
    """Export every case, then load and generate them all in one fresh process; returns (cases, results, dir)."""
    tmp = tmp_path_factory.mktemp("exports")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = build_cases(tmp) + [teacher_case(*teacher_run, tmp / "teacher_cli")]
    finally:
        torch.set_num_threads(threads)
    jobs = []
    for case in cases:
        if case.name not in case.extra_jobs:
            jobs.append(_job(case))
        jobs += [_job(case, name, **over) for name, over in case.extra_jobs.items()]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "worker.py").write_text(WORKER)
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "hf_modules"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp / "worker.py"), str(tmp / "jobs.json"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    return {c.name: c for c in cases}, results, out, jobs


CASES = ["ddpm_lcm1", "ddpm_ddim2", "cc_lora", "cc_tcd", "cc_t399", "sd_lora", "sd_t399", "sd_tcd", "lcm_embedded",
         "sdxl_cfg", "pixart", "dit", "sd3_lora", "flux", "teacher_cli"]


def _check_job(case, results, out, job_name):
    res = results[job_name]
    assert "error" not in res, res.get("error")
    assert res["pipeline"] == case.pipeline
    images = np.load(out / f"{job_name}.npy")
    assert images.shape == case.reference.shape, (images.shape, case.reference.shape)
    diff = np.abs(images - case.reference).max()
    assert diff < ATOL, f"{job_name}: pipeline and direct sampling differ by {diff}"
    inside = ((case.reference > 0.002) & (case.reference < 0.998)).mean()
    assert inside > 0.3, f"{job_name}: the reference saturates ({inside:.0%} of pixels inside (0, 1))"
    assert res["calls"] == case.steps, f"{job_name}: {res['calls']} network calls, expected {case.steps}"
    assert res["rows"] == case.steps * B * (2 if case.cfg else 1)
    return images


@pytest.mark.parametrize("name", CASES)
def test_roundtrip_same_pixels_and_nfe(roundtrips, name):
    cases, results, out, jobs = roundtrips
    case = cases[name]
    names = [n for n in dict.fromkeys([name, *case.extra_jobs]) if not n.endswith("_base")]
    assert set(names) <= {j["name"] for j in jobs}
    for job_name in names:
        _check_job(case, results, out, job_name)
        if case.stock:
            assert results[job_name]["phase"] == "stock"
            assert results[job_name]["stepdistill_modules"] == [], "a stock export must not need stepdistill"


def test_lora_fused_equals_unfused(roundtrips):
    cases, results, out, _ = roundtrips
    for lora, fused in (("cc_lora", "cc_lora_fused"), ("sd_lora", "sd_lora_fused")):
        a, b = np.load(out / f"{lora}.npy"), np.load(out / f"{fused}.npy")
        assert np.abs(a - b).max() < ATOL
    # the LoRA really changes the output (the comparisons are not vacuous): the base alone differs
    assert "error" not in results["sd_lora_base"], results["sd_lora_base"].get("error")
    assert np.abs(np.load(out / "sd_lora_base.npy") - cases["sd_lora"].reference).max() > 0.01
    info = json.loads(open(os.path.join(cases["sd_lora"].folder, "stepdistill.json")).read())["export"]
    assert info["lora"]["format"] == "both" and info["lora"]["rank"] == 2
    assert os.path.isfile(os.path.join(cases["sd_lora"].folder, "pytorch_lora_weights.safetensors"))


def test_export_folders_and_cards(roundtrips):
    cases, results, _, _ = roundtrips
    for name, case in cases.items():
        folder = case.folder
        files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))], "safetensors only"
        meta = json.loads(open(os.path.join(folder, "stepdistill.json")).read())
        info = meta["export"]
        card = open(os.path.join(folder, "README.md")).read()
        kwargs = ", ".join(f"{k}={v!r}" for k, v in info["call"]["kwargs"].items())
        assert kwargs in card, f"{name}: the card's call must carry the exact arguments"
        assert f"num_inference_steps={case.steps}" in card and "guidance" in card and "base model" in card
        assert info["num_inference_steps"] == case.steps and meta["num_inference_steps"] == case.steps
        assert info["nfe_per_image"] == case.steps * (2 if case.cfg else 1)
        assert (info["needs_stepdistill"] is (not case.stock)), name
    # a consistency student's card also says what other step counts run (LCMScheduler on its 50-point grid)
    info = json.loads(open(os.path.join(cases["ddpm_lcm1"].folder, "stepdistill.json")).read())["export"]
    assert info["other_steps"]["4"] == [999.0, 759.0, 499.0, 259.0] and "1" not in info["other_steps"]
    assert "| other step counts | 2: 999, 499; 4: 999, 759, 499, 259; 8: " in open(
        os.path.join(cases["ddpm_lcm1"].folder, "README.md")).read()
    assert "other step counts" not in open(os.path.join(cases["ddpm_ddim2"].folder, "README.md")).read()
    # what the examples need
    assert json.loads(open(os.path.join(cases["cc_t399"].folder, "stepdistill.json")).read())["export"][
        "timesteps"] == [399.0]
    sched = json.loads(open(os.path.join(cases["cc_t399"].folder, "scheduler", "scheduler_config.json")).read())
    assert sched["_class_name"] == "DDIMScheduler" and sched["steps_offset"] == 399
    index = json.loads(open(os.path.join(cases["sd_t399"].folder, "model_index.json")).read())
    assert index["scheduler"] == ["scheduler", "StudentLCMScheduler"]
    index = json.loads(open(os.path.join(cases["cc_lora"].folder, "model_index.json")).read())
    assert index["_class_name"] == ["pipeline", "ClassConditionalPipeline"]
    assert open(os.path.join(cases["cc_lora"].folder, "pipeline.py")).read().startswith(
        "from stepdistill.pipelines import ClassConditionalPipeline")
    # components linked from the base folder are listed as the base lists them
    index = json.loads(open(os.path.join(cases["sdxl_cfg"].folder, "model_index.json")).read())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert os.path.isfile(os.path.join(cases["sdxl_cfg"].folder, "text_encoder_2", "model.safetensors"))


def test_fp16_variant_loads(roundtrips):
    cases, *_ = roundtrips
    folder = os.path.join(cases["dit"].folder, "transformer")
    full = DiTTransformer2DModel.from_pretrained(folder)
    half = DiTTransformer2DModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    a, b = full.state_dict(), half.state_dict()
    assert all(torch.equal(a[k].half(), b[k]) for k in a)


def test_teacher_export_loads_back_as_a_teacher(roundtrips, teacher_run):
    """The export of a teacher run is also a teacher folder: load_model reads its stepdistill.json and weights."""
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model

    cases, *_ = roundtrips
    _, trainer = teacher_run
    folder = cases["teacher_cli"].folder
    loaded = load_model(ModelConfig(source=folder))
    assert loaded.meta["num_classes"] == 10 and loaded.denoiser.null_class == 10
    assert loaded.denoiser.prediction_type == "v_prediction"
    with trainer.ema_weights():
        ema = {k: v.clone() for k, v in trainer.objective.model.backbone.state_dict().items()}
    assert all(torch.equal(loaded.denoiser.backbone.state_dict()[k], v) for k, v in ema.items())
    meta = json.loads(open(os.path.join(folder, "stepdistill.json")).read())
    assert meta["export"]["method"] == "teacher" and meta["export"]["ema"] is True
    assert meta["export"]["training_steps"] == 2 and meta["export"]["checkpoint"].endswith("step_0000002")
    assert meta["timesteps"] == [999, 499] and meta["guidance_scale"] == 2.0
    assert os.path.isfile(os.path.join(folder, "training_config.yaml"))
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    card = open(os.path.join(folder, "README.md")).read()
    assert "| fid | 41.5 |" in card and "protocol.features" in card and "training steps | 2" in card


def test_a_run_export_card_names_no_path_of_the_machine_and_says_class_conditional(roundtrips, teacher_run):
    """The checkpoint is named relative to its run and the teacher by its folder name; a class-conditional export
    is tagged as such (the Hub has no pipeline tag for it), not as an unconditional generator."""
    cases, *_ = roundtrips
    run_dir, _ = teacher_run
    folder = cases["teacher_cli"].folder
    meta = json.loads(open(os.path.join(folder, "stepdistill.json")).read())
    assert meta["export"]["checkpoint"] == "checkpoints/step_0000002"
    card = open(os.path.join(folder, "README.md")).read()
    assert str(run_dir) not in card and "/tmp" not in card and os.path.expanduser("~") + "/" not in card
    front = card.split("---")[1]
    assert "pipeline_tag" not in front and "- class-conditional" in front


def test_bare_teacher_folder_as_base(tmp_path):
    """A teacher folder without model_index.json (like the shipped digits teacher) is a fine base folder."""
    from stepdistill.models import save_model

    student, base = _pixel_student(classes=True)
    save_model(student, base, tmp_path / "teacher", {"num_classes": 10})
    export_pipeline(student, get_recipe("lcm", 1), tmp_path / "out", base_scheduler=base,
                    base_folder=tmp_path / "teacher")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"][1] == "ClassConditionalPipeline"
    with pytest.raises(ExportError, match="does not exist"):
        export_pipeline(student, "lcm", tmp_path / "out2", base_scheduler=base, base_folder=tmp_path / "missing")


def test_overwrite_replaces_only_a_stepdistill_export_never_a_teacher(teacher_run, tmp_path):
    """--overwrite onto a teacher folder (it has stepdistill.json and weights, but no export entry) or onto the
    run's own model source refuses and names what it would have deleted; an earlier export is replaced."""
    import shutil

    from stepdistill.cli import main
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model, save_model
    from stepdistill.runs import export_run

    run_dir, trainer = teacher_run
    loaded = load_model(ModelConfig(source="digits-teacher"))
    teacher = save_model(loaded.denoiser, loaded.scheduler, tmp_path / "teacher_copy", loaded.meta)
    before = sorted(p.name for p in teacher.iterdir())
    with pytest.raises(ExportError, match="not a folder stepdistill exported.*unet"):
        export_run(run_dir, teacher, overwrite=True)
    assert sorted(p.name for p in teacher.iterdir()) == before  # nothing deleted
    export_run(run_dir, tmp_path / "export")
    export_run(run_dir, tmp_path / "export", overwrite=True)  # an export of ours is replaced
    assert main(["export", str(run_dir), "--out", str(tmp_path), "--overwrite"]) == 2  # holds the teacher copy
    assert sorted(p.name for p in teacher.iterdir()) == before
    distilled = tmp_path / "distilled"
    shutil.copytree(run_dir, distilled)
    with pytest.raises(ExportError, match="run's teacher"):
        export_run(distilled, teacher, overwrite=True, overrides=[f"model.source={teacher}", "model.backbone=null"])


# ---------------------------------------------------------------------------------------------- bad input
def test_export_run_without_checkpoint_or_config(teacher_run, tmp_path, capsys):
    from stepdistill.cli import main
    from stepdistill.config import ConfigError
    from stepdistill.runs import export_run
    from stepdistill.trainers.checkpoint import CheckpointError

    run_dir, _ = teacher_run
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="has no checkpoint.*train it first.*--checkpoint"):
        export_run(empty, tmp_path / "out")
    assert main(["export", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a training run"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_run_with_a_checkpoint_that_does_not_fit(teacher_run, tmp_path):
    import yaml

    from stepdistill.runs import export_run
    from stepdistill.trainers.checkpoint import CheckpointError

    run_dir, _ = teacher_run
    other = tmp_path / "other"
    other.mkdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["backbone_config"]["layers_per_block"] = 2  # another architecture than the checkpoint's
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    with pytest.raises(CheckpointError, match="does not match the module built from the config.*from this run"):
        export_run(other, tmp_path / "out", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="no EMA"):
        config["train"]["ema_decay"] = 0.0
        config["model"]["backbone_config"]["layers_per_block"] = 1
        (other / "config.yaml").write_text(yaml.safe_dump(config))
        export_run(other, tmp_path / "out", checkpoint=ckpt, ema=True)
    assert not (tmp_path / "out").exists()


def _pixel_student(prediction_type="v_prediction", classes=False, **sched):
    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=1, out_channels=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, num_class_embeds=11 if classes else None, **_unet_small())
    base = vp(prediction_type, **sched)
    return Denoiser(unet, NoiseSchedule.from_scheduler(base), prediction_type,
                    null_class=10 if classes else None).eval(), base


@pytest.mark.parametrize("kwargs, match", [
    (dict(recipe="flow_euler"), "needs a flow-matching student"),
    (dict(recipe="lcm", steps=60), "cannot run 60 step"),
    (dict(recipe="lcm", guidance_scale=2.0), "DDPMPipeline has no classifier-free guidance"),
    (dict(recipe="lcm", guidance_scale=0.5), "guidance_scale 0.5 < 1"),
    (dict(recipe=get_recipe("lcm", timesteps=[999, 600, 300])), "nearest stock option is LCMScheduler"),
    (dict(recipe="ddim_trailing", steps=2, timesteps=[999, 500]), "trained at timesteps .* runs"),
    (dict(recipe="lcm", pipeline="StableDiffusionPipeline"), "does not fit this UNet2DModel"),
    (dict(recipe="nope"), "unknown export recipe"),
    (dict(recipe="ddim"), "starts 1-step sampling at t=0.*ddim_trailing"),
])
def test_recipe_that_does_not_fit_is_a_clear_error(tmp_path, kwargs, match):
    student, base = _pixel_student()
    with pytest.raises(ExportError, match=match):
        export_pipeline(student, out_dir=tmp_path / "out", base_scheduler=base, **kwargs)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*exporting"))


def test_more_fit_errors(tmp_path):
    # epsilon at a zero-SNR t = 999 has no x0
    student, base = _pixel_student("epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(ExportError, match="zero signal"):
        export_pipeline(student, "ddim_trailing", tmp_path / "a", base_scheduler=base)
    # a LoRA student on a pipeline without a LoRA loader: fused only
    student, base = _pixel_student()
    student.with_lora(rank=2)
    with pytest.raises(ExportError, match="cannot load LoRA weights.*fused"):
        export_pipeline(student, "lcm", tmp_path / "b", base_scheduler=base, lora_format="diffusers")
    export_pipeline(student, "lcm", tmp_path / "b", base_scheduler=base)  # default for DDPMPipeline: fused
    info = json.loads((tmp_path / "b" / "stepdistill.json").read_text())["export"]
    assert info["lora"]["format"] == "fused" and not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_pipeline(student, "lcm", tmp_path / "b", base_scheduler=base)
    export_pipeline(student, "lcm", tmp_path / "b", base_scheduler=base, overwrite=True)
    # text pipelines need their VAE and text encoders
    torch.manual_seed(0)
    sd = Denoiser(UNet2DConditionModel(cross_attention_dim=32, **CROSS, **_unet_small()),
                  NoiseSchedule.from_scheduler(vp()), "epsilon")
    with pytest.raises(ExportError, match="needs vae, tokenizer, text_encoder.*base_folder"):
        export_pipeline(sd, "lcm", tmp_path / "c", base_scheduler=vp())
    # guidance embeddings need the guidance they were trained for
    torch.manual_seed(0)
    lcm = Denoiser(UNet2DConditionModel(cross_attention_dim=32, time_cond_proj_dim=8, **CROSS, **_unet_small()),
                   NoiseSchedule.from_scheduler(vp()), "epsilon")
    with pytest.raises(ExportError, match="guidance embedding"):
        export_pipeline(lcm, "lcm", tmp_path / "d", base_scheduler=vp())
    # DiTPipeline's CFG hard-codes the null class 1000
    torch.manual_seed(0)
    dit = Denoiser(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                         num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
                   NoiseSchedule.from_scheduler(vp()), "epsilon", null_class=10)
    with pytest.raises(ExportError, match="null class 1000"):
        export_pipeline(dit, get_recipe("ddim_trailing", 2, guidance_scale=3.0), tmp_path / "e",
                        base_scheduler=vp(), components={"vae": tiny_vae()})
    # a flow student needs the flow recipe
    torch.manual_seed(0)
    sd3 = Denoiser(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                         attention_head_dim=4, num_attention_heads=2, joint_attention_dim=32,
                                         caption_projection_dim=8, pooled_projection_dim=64, pos_embed_max_size=8),
                   NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler()), "flow")
    with pytest.raises(ExportError, match="VP .*flow_euler"):
        export_pipeline(sd3, "lcm", tmp_path / "f", base_scheduler=FlowMatchEulerDiscreteScheduler())
    assert not [p for p in tmp_path.iterdir() if p.name not in ("b",)]


# ---------------------------------------------------------------------------------------------- timesteps
def test_student_timesteps_of_the_recipes():
    base = vp()
    assert get_recipe("lcm", 4).timesteps_for(base, "epsilon") == [999, 759, 499, 259]
    assert get_recipe("lcm_uniform", 4).timesteps_for(base, "epsilon") == [999, 749, 499, 249]
    assert get_recipe("ddim_trailing", 4).timesteps_for(base, "epsilon") == [999, 749, 499, 249]
    assert get_recipe("ddim_trailing", 1).timesteps_for(base, "epsilon") == [999]
    # DMD2's four steps are a stock LCMScheduler config
    sched = get_recipe("lcm", timesteps=[999, 749, 499, 249]).make_scheduler(base, "epsilon")
    assert type(sched).__name__ == "LCMScheduler" and sched.config.original_inference_steps == 4
    # the one-step generator at t=399: a stock DDIM config, except under StableDiffusionPipeline (steps_offset -> 1)
    r = get_recipe("lcm", timesteps=[399])
    assert r.timesteps_for(base, "epsilon", "StableDiffusionXLPipeline") == [399]
    with pytest.raises(ExportError, match="steps_offset=399.*-> \\[1\\] under StableDiffusionPipeline.*custom_sch"):
        r.make_scheduler(base, "epsilon", "StableDiffusionPipeline")
    r = get_recipe("lcm", timesteps=[399], custom_scheduler=True)
    assert r.timesteps_for(base, "epsilon", "StableDiffusionPipeline") == [399]
    from stepdistill.pipelines import StudentLCMScheduler

    s = StudentLCMScheduler(trained_timesteps=[399])
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        s.set_timesteps(4)
    # flow: Flux hands the scheduler linspace(1, 1/K, K); shift_terminal = 1/K gives SD3 the same grid at shift 1
    flow = FlowMatchEulerDiscreteScheduler(shift=1.0)
    for pipe in ("StableDiffusion3Pipeline", "FluxPipeline"):
        assert get_recipe("flow_euler", 4).timesteps_for(flow, "flow", pipe) == pytest.approx([1000, 750, 500, 250])
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert get_recipe("flow_euler", 1).timesteps_for(shifted, "flow", "FluxPipeline") == [1000.0]


def test_tcd_recipe_gamma_grid_and_errors(tmp_path):
    base = vp()
    r = get_recipe("tcd", 4)
    assert r.eta == 0.3 and r.timesteps_for(base, "epsilon") == [999, 759, 499, 259]  # LCMScheduler's grid
    sched = get_recipe("tcd", timesteps=[999, 749, 499, 249], eta=0.7).make_scheduler(base, "epsilon")
    assert type(sched).__name__ == "TCDScheduler" and sched.config.original_inference_steps == 4
    for bad in (-0.1, 1.5):
        with pytest.raises(ExportError, match="gamma and must be in \\[0, 1\\]"):
            get_recipe("tcd", 2, eta=bad)
    with pytest.raises(ExportError, match="takes no eta"):
        get_recipe("lcm", 2, eta=0.5)
    # DDPMPipeline's call takes no eta, so it cannot run a TCD student's gamma
    student, base = _pixel_student()
    with pytest.raises(ExportError, match="DDPMPipeline's call takes no eta"):
        export_pipeline(student, "tcd", tmp_path / "out", base_scheduler=base, steps=2)
    assert not (tmp_path / "out").exists()


def test_sample_student_tcd_at_gamma_0_and_1():
    """gamma 0: a DDIM jump to each next timestep (the last to alphas_cumprod[0]); gamma 1: a jump to s = 0, then
    fresh noise up to the next timestep (LCM's sampling, up to abar_0 < 1)."""
    from diffusers import TCDScheduler

    student, base = _pixel_student("sample")
    sched = TCDScheduler.from_config({**dict(base.config), "original_inference_steps": 4})
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = [999, 749, 499, 249]
    abar = sched.alphas_cumprod.double()

    def x0_eps(x, t):
        x0 = student(x, torch.full((2,), float(t)), None, output="sample").double()
        return x0, (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()

    x = noise.double()
    for i, t in enumerate(ts):
        x0, eps = x0_eps(x.float(), t)
        nxt = ts[i + 1] if i + 1 < len(ts) else 0
        x = abar[nxt].sqrt() * x0 + (1 - abar[nxt]).sqrt() * eps
    got = sample_student(student, sched, noise, 4, eta=0.0)
    assert torch.allclose(got.double(), x, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    x = noise
    for i, t in enumerate(ts):
        x0, eps = x0_eps(x, t)
        x_s = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps
        if i + 1 < len(ts):
            ratio = abar[ts[i + 1]] / abar[0]
            x_s = ratio.sqrt() * x_s + (1 - ratio).sqrt() * torch.randn(x.shape, generator=g)
        x = x_s.float()
    got = sample_student(student, sched, noise, 4, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(got, x, atol=1e-4)


def test_sample_student_is_the_teacher_solver_on_even_grids():
    """On grids where DDIM's own step (t - T/K) is the next listed timestep, sample_student is solvers.sample."""
    from stepdistill.solvers import sample as solve

    student, base = _pixel_student("v_prediction", rescale_betas_zero_snr=True)
    sched = get_recipe("ddim_trailing", 4).make_scheduler(base, "v_prediction")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = student_timesteps(sched, 4)
    ours = sample_student(student, sched, noise, 4)
    ref = solve(lambda x, t: student(x, t), student.schedule, noise, ts)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    flux_like = Denoiser(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                               attention_head_dim=4, num_attention_heads=2, joint_attention_dim=8,
                                               caption_projection_dim=8, pooled_projection_dim=8, pos_embed_max_size=8),
                         NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler()), "flow").eval()
    cond = Cond(encoder_hidden_states=torch.randn(2, 3, 8), pooled=torch.randn(2, 8))
    fsched = get_recipe("flow_euler", 2).make_scheduler(FlowMatchEulerDiscreteScheduler(), "flow")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample_student(flux_like, fsched, noise, 2, cond)
    ref = solve(lambda x, t: flux_like(x, t, cond), flux_like.schedule, noise, student_timesteps(fsched, 2),
                solver="euler")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_export_timesteps_is_what_the_export_runs(tmp_path):
    from stepdistill.pipelines import export_timesteps

    student, base = _pixel_student("sample", classes=True)
    recipe = get_recipe("lcm", timesteps=[399])
    ts = export_timesteps(student, recipe, base)
    assert ts == [399.0]
    export_pipeline(student, recipe, tmp_path / "out", base_scheduler=base, timesteps=ts)
    assert json.loads((tmp_path / "out" / "stepdistill.json").read_text())["export"]["timesteps"] == ts
    spec = ExportSpec(student=student, recipe=get_recipe("lcm_uniform", 4), base_scheduler=base)
    assert spec.pipeline_name == "ClassConditionalPipeline" and spec.run_timesteps() == [999, 749, 499, 249]
    # without the teacher's scheduler, the Denoiser's own schedule is written as trained_betas
    from stepdistill.pipelines import export_scheduler

    own = export_scheduler(student, get_recipe("lcm_uniform", 4))
    assert export_timesteps(student, get_recipe("lcm_uniform", 4)) == [999, 749, 499, 249]
    torch.testing.assert_close(own.alphas_cumprod, spec.scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_export_spec_of_the_teacher_method(teacher_run):
    _, trainer = teacher_run
    spec = trainer.objective.export_spec()
    assert isinstance(spec, ExportSpec) and spec.method == "teacher"
    assert spec.recipe.sampler == "ddim" and spec.recipe.num_inference_steps == 2
    assert spec.recipe.guidance_scale == 2.0 and spec.timesteps == [999.0, 499.0]
    assert spec.student is trainer.objective.model
    assert type(spec.scheduler).__name__ == "DDIMScheduler"
