"""Variational score distillation (vsd), SwiftBrush and SNOOPI: each loss and gradient against its formula, the real
score of SwiftBrush (the LoRA teacher with its adapters off) against the frozen teacher bit for bit, PG-SB's shared
drawn scale, NASA-T's teacher, every recipe in configs/ trained a few steps (the digits ones on the shipped digits
teachers, digits-teacher and digits-t2i; the SD 1.5 / 2.1 and PixArt-alpha ones on tiny models of the same
architecture) and exported as a stock pipeline that gives the student's own samples, and the bad inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel,
                       StableDiffusionPipeline)

from stepdistill import Cond
from stepdistill.config import ConfigError
from stepdistill.denoiser import Denoiser
from stepdistill.pipelines import ClassConditionalPipeline, NASAAttnProcessor, export_pipeline
from stepdistill.schedule import NoiseSchedule
from stepdistill.trainers import SNOOPITrainer, build_trainer, load_config, resolve
from stepdistill.trainers.snoopi import draw_uniform, negative_guidance
from stepdistill.trainers.vsd import lora_teacher_loss, score_distillation_loss, vsd_gradient, vsd_weight
from text_teachers import CONFIGS, LATENT, PROMPTS
from tiny import t5_model, t5_tokenizer, tiny_teacher_raw, tiny_vae

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ------------------------------------------------------------------------------------------- the formulas
def test_vsd_weight_is_one_minus_abar_which_is_swiftbrushs_sigma_squared():
    sched = DDPMScheduler(**SD_SCHEDULE)
    t = torch.tensor([20, 300, 700, 980])
    w = vsd_weight(NoiseSchedule.from_scheduler(sched), t.float(), torch.zeros(4, 4, 2, 2))
    assert w.shape == (4, 1, 1, 1) and w.dtype == torch.float32
    torch.testing.assert_close(w.flatten(), (1 - sched.alphas_cumprod[t]).float())  # ProlificDreamer's w(t)
    sigma = sched.add_noise(torch.zeros(4), torch.ones(4), t)  # x_t = alpha x0 + sigma eps: sigma_t itself
    torch.testing.assert_close(w.flatten(), sigma.float() ** 2)  # SwiftBrush's sigma_t^2


def test_vsd_gradient_is_w_times_the_eps_difference_and_dmd_shaped_in_x0():
    sched = DDPMScheduler(**SD_SCHEDULE)
    schedule = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([20.0, 400.0, 980.0])
    eps_real, eps_fake, x_t = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    w = vsd_weight(schedule, t, x_t)
    grad = vsd_gradient(eps_real, eps_fake, w)
    for i in range(3):
        expected = (1 - sched.alphas_cumprod[int(t[i])].double()) * (eps_real[i] - eps_fake[i])
        torch.testing.assert_close(grad[i].double(), expected, rtol=1e-5, atol=1e-6)
    # in x0 terms it is DMD's score difference with the weight alpha_t sigma_t: w (eps_r - eps_f) = a s (x0_f - x0_r)
    x0_real = schedule.convert(eps_real, x_t, t, "epsilon", "sample")
    x0_fake = schedule.convert(eps_fake, x_t, t, "epsilon", "sample")
    a, s = schedule.coefficients(t, x_t)
    torch.testing.assert_close(grad.double(), a * s * (x0_fake - x0_real), rtol=1e-4, atol=1e-5)
    eps_real[0, 0, 0, 0] = float("nan")
    assert vsd_gradient(eps_real, eps_fake, w)[0, 0, 0, 0] == 0  # nan_to_num, as both references


@pytest.mark.parametrize("reduction", ["batch", "mean"])
def test_score_distillation_loss_hands_x_exactly_the_gradient(reduction):
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    grad = torch.randn(3, 2, 4, 4)
    loss = score_distillation_loss(x, grad, reduction)
    loss.backward()
    n = 3 if reduction == "batch" else x.numel()  # ProlificDreamer: grad / batch; SwiftBrush: grad / numel
    assert torch.equal(x.grad, grad / n)
    torch.testing.assert_close(loss, 0.5 * grad.pow(2).sum() / n)
    if reduction == "mean":  # SwiftBrush's 0.5 * mse(x, sg(x - grad)): the same value and gradient (up to rounding)
        y = x.detach().clone().requires_grad_(True)
        ref = 0.5 * F.mse_loss(y, (y - grad).detach())
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad, y.grad)
    with pytest.raises(ValueError, match="'batch' or 'mean'"):
        score_distillation_loss(x, grad, "sum")


def test_lora_teacher_loss_is_swiftbrushs_alpha_weighted_mse():
    g = torch.Generator().manual_seed(1)
    eps_lora, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    alpha = torch.rand(4, 1, 1, 1, generator=g)
    torch.testing.assert_close(lora_teacher_loss(eps_lora, eps, alpha), F.mse_loss(alpha * eps_lora, alpha * eps))
    by_sample = torch.stack([(alpha[i] ** 2 * (eps_lora[i] - eps[i]) ** 2).mean() for i in range(4)]).mean()
    torch.testing.assert_close(lora_teacher_loss(eps_lora, eps, alpha), by_sample)


def test_negative_guidance_is_snoopi_eq5_and_draws_are_uniform():
    pos, neg = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(negative_guidance(pos, neg, 2.5), (1 - 2.5) * neg + 2.5 * pos)
    draws = [draw_uniform(0.5, 4.0) for _ in range(200)]
    assert all(0.5 <= d <= 4.0 for d in draws) and len(set(draws)) == 200 and 1.5 < sum(draws) / 200 < 3.0


def test_condition_dropout_makes_the_dropped_rows_unconditional():
    drop = torch.tensor([True, False, True])
    labels = Cond(class_labels=torch.tensor([1, 2, 3])).dropped(drop, null_class=10)
    assert labels.class_labels.tolist() == [10, 2, 10]
    null = Cond(encoder_hidden_states=torch.zeros(1, 4, 2), encoder_attention_mask=torch.tensor([[1, 0, 0, 0]]))
    text = Cond(encoder_hidden_states=torch.ones(3, 4, 2), encoder_attention_mask=torch.ones(3, 4, dtype=torch.long))
    out = text.dropped(drop, null)
    assert out.encoder_hidden_states[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert out.encoder_attention_mask.sum(1).tolist() == [1, 4, 1]
    assert Cond().dropped(drop) == Cond()  # nothing to drop


def test_the_memory_table_counts_the_trainers_own_lora_teacher(tmp_path, teacher_folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vsd_memory", CONFIGS.parent / "benchmarks" / "vsd_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    o = build_trainer(digits_run(tmp_path, teacher_folder, "swiftbrush", fake_score_lora_rank=16)).objective
    trained = sum(p.numel() for p in o.fake_score.parameters() if p.requires_grad)
    base, lora = memory.count(lambda: type(o.teacher.backbone).from_config(o.teacher.backbone.config), 16, None)
    assert (base, lora) == (sum(p.numel() for p in o.teacher.parameters()), trained)


# ------------------------------------------------------------------------------------------- the objectives
def digits_run(tmp_path, teacher_folder, method, **objective):
    """A tiny run of ``method`` on the tiny class-conditional teacher (labels drawn at random: no data)."""
    raw = tiny_teacher_raw(tmp_path / method, max_steps=2)
    raw.update(method=method, model={"source": str(teacher_folder)}, objective=objective)
    raw["data"] = {"dataset": "none", "resolution": 8, "channels": 1}
    raw.pop("optim")
    return resolve(raw)


def test_adapters_disabled_is_the_frozen_teacher_bit_for_bit(tmp_path, teacher_folder):
    o = build_trainer(digits_run(tmp_path, teacher_folder, "swiftbrush", fake_score_lora_rank=4)).objective
    with torch.no_grad():
        for name, p in o.fake_score.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # trained adapters: the LoRA teacher is now another network
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([20.0, 500.0, 980.0])
    cond = Cond(class_labels=torch.tensor([1, 2, 3]))
    with torch.no_grad():
        lora = o.fake_score(x, t, cond)
        with o.frozen_base() as base:
            assert torch.equal(base(x, t, cond), o.teacher(x, t, cond))
            assert torch.equal(base(x, t, cond, output="epsilon"), o.teacher(x, t, cond, output="epsilon"))
        assert torch.equal(o.real_score_x0(x, t, cond, guidance_scale=2.0), o.teacher(x, t, cond, guidance_scale=2.0))
        assert not torch.allclose(lora, o.teacher(x, t, cond))
        assert torch.equal(o.fake_score(x, t, cond), lora)  # the adapters are on again after the context
    # one copy of the teacher's weights: the LoRA teacher's base tensors are the teacher's
    teacher = {p.data_ptr() for p in o.teacher.parameters()}
    assert {p.data_ptr() for n, p in o.fake_score.named_parameters() if "lora_" not in n} == teacher
    assert all("lora_" in n for n, p in o.fake_score.named_parameters() if p.requires_grad)


def test_the_lora_teachers_parameterization_is_a_setting(tmp_path, teacher_folder):
    """Default: the teacher's own (v here), so that the zero-initialised LoRA starts as exactly the teacher; eps (or
    v, ProlificDreamer's) reads the same base output as another parameterization."""
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0]), Cond(class_labels=torch.tensor([3, 4]))
    o = build_trainer(digits_run(tmp_path / "a", teacher_folder, "vsd")).objective
    assert o.fake_score.prediction_type == o.fake_prediction_type == o.teacher.prediction_type == "v_prediction"
    with torch.no_grad():
        assert torch.equal(o.fake_score(x, t, cond), o.teacher(x, t, cond))
    o = build_trainer(digits_run(tmp_path / "b", teacher_folder, "vsd", fake_score_prediction="epsilon")).objective
    assert o.fake_score.prediction_type == o.fake_prediction_type == "epsilon"
    with torch.no_grad():
        assert not torch.allclose(o.fake_score(x, t, cond), o.teacher(x, t, cond))
        assert torch.equal(o.real_score_x0(x, t, cond, guidance_scale=1.0), o.teacher(x, t, cond))


def test_a_conditioning_timestep_is_where_the_one_step_student_is_called(tmp_path, teacher_folder):
    o = build_trainer(digits_run(tmp_path, teacher_folder, "swiftbrush", conditioning_timestep=600)).objective
    calls = []
    hook = o.generator.backbone.register_forward_pre_hook(lambda m, args: calls.append(float(args[1][0])))
    o.loss("generator", {"batch_size": 2}, 0)
    hook.remove()
    assert o.timesteps == [600.0] and calls == [600.0]
    assert o.export_spec().run_timesteps() == [600.0]  # a stock one-step scheduler at t = 600


def test_pg_sb_draws_one_scale_per_iteration_for_the_teacher_and_the_lora_teacher(tmp_path, teacher_folder,
                                                                                 monkeypatch):
    trainer = build_trainer(digits_run(tmp_path, teacher_folder, "snoopi", guidance_range=[0.5, 4.0]))
    o = trainer.objective
    seen = []
    forward = Denoiser.forward

    def spy(self, x_t, t, cond=None, **kw):
        if kw.get("guidance_scale") is not None:
            seen.append(float(kw["guidance_scale"]))
        return forward(self, x_t, t, cond, **kw)

    monkeypatch.setattr(Denoiser, "forward", spy)
    scales = []
    for _ in range(2):
        seen.clear()
        _, logs = o.loss("generator", trainer._next_batch(), 0)
        assert len(seen) == 2 and seen[0] == seen[1], seen  # the real score and the LoRA teacher: one kappa
        assert 0.5 <= seen[0] <= 4.0 and logs["guidance_scale"].item() == pytest.approx(seen[0])
        scales.append(seen[0])
    assert scales[0] != scales[1]  # drawn again each iteration


def test_vsd_generator_loss_is_the_vsd_gradient_of_its_sample(tmp_path, teacher_folder):
    """The generator's loss reaches its sample with exactly w(t) (eps_teacher - eps_phi) / batch."""
    o = build_trainer(digits_run(tmp_path, teacher_folder, "vsd", real_guidance_scale=2.0)).objective
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    cond = Cond(class_labels=torch.tensor([0, 4, 7]))
    torch.manual_seed(5)
    logs = o.distribution_matching(x, cond)
    logs["vsd"].backward()
    torch.manual_seed(5)  # the same t and noise, by hand
    t = o.dm_timesteps(3, x.device)
    x_t = o.schedule.add_noise(x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        eps_real = o.teacher(x_t, t, cond, output="epsilon", guidance_scale=2.0)
        eps_fake = o.fake_score(x_t, t, cond, output="epsilon")
    w = torch.stack([1 - o.schedule.alphas_cumprod[int(ti)] for ti in t]).float().view(-1, 1, 1, 1)
    assert 20 <= t.min() and t.max() <= 980
    torch.testing.assert_close(x.grad, w * (eps_real - eps_fake) / 3, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- the recipes
DIGITS = ["vsd_digits_1step", "swiftbrush_digits_1step", "snoopi_digits_1step"]
QUICK = ["train.max_steps=2", "train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=0",
         "train.log_every=1", "train.progress=false", "train.threads=1"]


def logged(trainer):
    return [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_finite_losses(trainer, method):
    rows = logged(trainer)
    assert [r["step"] for r in rows] == [1, 2]
    keys = {"generator/vsd", "critic/fake_score"} | ({"generator/guidance_scale"} if method == "snoopi" else set())
    values = [r[k] for r in rows for k in keys]
    assert len(values) == 2 * len(keys) and all(math.isfinite(v) for v in values), rows


@pytest.mark.parametrize("name", DIGITS)
def test_digits_recipe_trains_and_its_export_reloads(name, tmp_path):
    run = load_config(CONFIGS / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}", *QUICK])
    assert run.model.source == "digits-teacher" and run.data.dataset == "none"
    trainer = build_trainer(run)
    trainer.train(resume=None)
    assert_finite_losses(trainer, run.method)
    o = trainer.objective
    folder = export_pipeline(o.export_spec(), None, tmp_path / "export")
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 5, 9])
    images = pipe(class_labels=labels, latents=noise, output_type="pt").images
    with torch.no_grad():
        direct = o._generate(noise, Cond(class_labels=labels), grad=False)
    torch.testing.assert_close(images, (direct / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert o.timesteps == [999.0] and "README.md" in {p.name for p in folder.iterdir()}


def pixart_folder(path):
    """PixArt-alpha's layout: T5 text encoder, PixArtTransformer2DModel, DPMSolverMultistepScheduler (linear, eps)."""
    torch.manual_seed(4)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=LATENT, patch_size=2,
                                           cross_attention_dim=8, caption_channels=32)
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_model(), vae=tiny_vae(), transformer=transformer,
                        scheduler=sched).save_pretrained(path)
    return path


#: text recipes -> their teacher: the shipped digits-t2i itself, or a tiny model of the recipe's architecture ("sd":
#: SD 1.5's layout, which SD 2.1 shares)
TEXT = {"vsd_digits_t2i": "digits-t2i", "swiftbrush_digits_t2i": "digits-t2i", "snoopi_digits_t2i": "digits-t2i",
        "swiftbrush_sd21": "sd", "snoopi_sd15": "sd", "snoopi_sd21": "sd", "snoopi_pixart": "pixart"}
DIGIT_PROMPTS = ["the digit 3", "a thick seven", "a left-leaning 4", "the number two"]


def text_prompts(name):
    return DIGIT_PROMPTS if TEXT[name] == "digits-t2i" else PROMPTS


@pytest.fixture(scope="module")
def text_run(assets, tmp_path_factory):
    """Train each text recipe 2 steps once, on demand: name -> (run config, trainer)."""
    root, folders = assets
    done = {}

    def get(name):
        if name not in done:
            kind = TEXT[name]
            if kind == "pixart" and "pixart" not in folders:
                folders["pixart"] = pixart_folder(root / "pixart")
            out = tmp_path_factory.mktemp(name)
            if kind == "digits-t2i":  # the shipped teacher as the recipe names it; a few of its captions as prompts
                prompts = out / "prompts.txt"
                prompts.write_text("\n".join(DIGIT_PROMPTS) + "\n")
                teacher = []
            else:
                prompts, teacher = root / "prompts.txt", [f"model.source={folders[kind]}"]
            run = load_config(CONFIGS / f"{name}.yaml", [
                *teacher, f"data.path={prompts}", f"data.resolution={LATENT}", f"output_dir={out}", *QUICK,
                "train.batch_size=2", "train.mixed_precision='no'"])
            trainer = build_trainer(run)
            trainer.train(resume=None)
            done[name] = (run, trainer)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(TEXT))
def test_text_recipe_trains_on_a_tiny_model_of_its_architecture_and_exports_a_stock_pipeline(text_run, name,
                                                                                            tmp_path):
    from stepdistill.models import prompt_encoder_for

    run, trainer = text_run(name)
    shipped = load_config(CONFIGS / f"{name}.yaml")
    assert shipped.data.dataset == "prompts" and shipped.method == run.method
    assert_finite_losses(trainer, run.method)
    o = trainer.objective
    assert (o.channels, o.resolution, o.timesteps) == (4, LATENT, [999.0])
    pipeline_cls = PixArtAlphaPipeline if TEXT[name] == "pixart" else StableDiffusionPipeline
    folder = export_pipeline(o.export_spec(), None, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert not info["needs_stepdistill"] and info["pipeline"] == pipeline_cls.__name__
    pipe = pipeline_cls.from_pretrained(folder)  # stock Diffusers
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    prompts = text_prompts(name)[:2]
    out = pipe(prompt=prompts, latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    with torch.no_grad():
        direct = o._generate(noise, prompt_encoder_for(run.model, run.data.resolution).encode(prompts), grad=False)
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-4)
    card = (folder / "README.md").read_text()
    if run.method == "snoopi":
        assert "apply_nasa" in card and f"alpha={run.objective.nasa_alpha!r}" in card


def test_swiftbrush_real_score_on_a_text_teacher_is_the_teacher_with_cfg(text_run):
    run, trainer = text_run("swiftbrush_sd21")
    o = trainer.objective
    cond = Cond.from_batch(trainer._next_batch())
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        assert torch.equal(o.real_score_x0(x, t, cond, guidance_scale=4.5), o.teacher(x, t, cond, guidance_scale=4.5))


def test_nasa_t_guides_the_teacher_with_the_negative_and_steers_the_student(text_run):
    run, trainer = text_run("snoopi_sd15")
    o = trainer.objective
    assert o.negatives is not None and o.negatives.batch_size == len(run.objective.negative_prompts)
    assert o.nasa and all(isinstance(p, NASAAttnProcessor) for p in o.nasa)
    cond = Cond.from_batch(trainer._next_batch())
    negative = o.negatives[torch.tensor([0, 3])]
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([100.0, 900.0])
    kappa = 2.5
    o._set_nasa(negative, 0.7)
    try:
        with torch.no_grad():
            x0 = o.real_score_x0(x, t, cond, guidance_scale=kappa)
            eps_pos = o.teacher(x, t, cond, output="epsilon")
            eps_neg = o.teacher(x, t, negative, output="epsilon")
        eps = o.schedule.convert(x0, x, t, "sample", "epsilon")
        torch.testing.assert_close(eps, (1 - kappa) * eps_neg + kappa * eps_pos, rtol=1e-4, atol=1e-5)  # Eq. 5
        assert all(p.alpha == 0.7 and torch.equal(p.negative, negative.encoder_hidden_states) for p in o.nasa)
    finally:
        o._set_nasa(None, 0.0)
    # during a loss the student's NASA layers hold the drawn alpha and per-sample negatives; after it, nothing
    during = []
    hook = o.generator.backbone.register_forward_pre_hook(lambda m, a: during.append((o.nasa[0].alpha,
                                                                                       o.nasa[0].negative)))
    _, logs = o.loss("generator", trainer._next_batch(), 0)
    hook.remove()
    assert during and during[0][0] == pytest.approx(logs["nasa_alpha"].item()) and during[0][1].shape[0] == 2
    assert all(p.alpha == 0.0 and p.negative is None for p in o.nasa) and o._negative is None


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors(tmp_path, teacher_folder, assets):
    root, folders = assets
    run = digits_run(tmp_path, teacher_folder, "swiftbrush")
    run.data.dataset = "digits"
    with pytest.raises(ConfigError, match="image-free.*data.dataset='digits' gives images"):
        build_trainer(run)
    with pytest.raises(ConfigError, match="SwiftBrush is image-free"):  # told to use images
        digits_run(tmp_path, teacher_folder, "swiftbrush", gan_weight_gen=1e-3, gan_weight_disc=1e-2)
    with pytest.raises(ConfigError, match="adapters off"):
        digits_run(tmp_path, teacher_folder, "swiftbrush", fake_score_lora_rank=0)
    with pytest.raises(ConfigError, match=r"guidance_range is \[min, max\] with 0 <= min <= max"):
        digits_run(tmp_path, teacher_folder, "snoopi", guidance_range=[4.0, 0.5])
    with pytest.raises(ConfigError, match="UNet2DModel has none"):  # NASA on a backbone without cross-attention
        build_trainer(digits_run(tmp_path, teacher_folder, "snoopi", negative_prompts=["a blurry digit"]))
    with pytest.raises(ConfigError, match="no regression or GAN term"):
        digits_run(tmp_path, teacher_folder, "vsd", regression_weight=1.0)
    with pytest.raises(ConfigError, match="lora_targets"):
        build_trainer(digits_run(tmp_path, teacher_folder, "vsd", lora_targets=["nothing_here"]))
    text = resolve({"method": "swiftbrush", "output_dir": str(tmp_path / "t"), "model": {"source": str(folders["sd"])},
                    "data": {"dataset": "none", "resolution": LATENT}, "train": {"max_steps": 1, "progress": False}})
    with pytest.raises(ConfigError, match="text-conditioned: set data.dataset=prompts"):  # a text teacher: prompts
        build_trainer(text)
    flow = resolve({"method": "vsd", "output_dir": str(tmp_path / "f"), "model": {"source": str(folders["sd3"])},
                    "data": {"dataset": "prompts", "path": str(root / "prompts.txt"), "resolution": LATENT},
                    "train": {"max_steps": 1, "progress": False}})
    with pytest.raises(ConfigError, match="VP \\(DDPM-type\\) teacher"):
        build_trainer(flow)
    with pytest.raises(ConfigError, match="trains method 'snoopi'"):
        SNOOPITrainer(digits_run(tmp_path, teacher_folder, "vsd"))
