"""Consistency distillation (LCM) and LCM-LoRA: the formulas against LCMScheduler and their definitions, the loss
against a hand computation, the EMA target update and its checkpointing, and the bad inputs."""
import pytest
import torch
from diffusers import LCMScheduler

from stepdistill import Cond
from stepdistill.config import ConfigError
from stepdistill.trainers import resolve
from stepdistill.trainers import build_trainer
from stepdistill.trainers.consistency import (ConsistencyObjective, boundary_scalings, consistency_function,
                                              consistency_loss, ema_update, lcm_grid)
from tiny import TINY_SCHEDULER, tiny_teacher_raw


def test_grid_and_boundary_scalings_are_lcm_schedulers():
    sched = LCMScheduler(**{k: v for k, v in TINY_SCHEDULER.items() if k != "variance_type"})
    sched.set_timesteps(50, original_inference_steps=50)
    assert lcm_grid(1000, 50) == sorted(sched.timesteps.tolist()) == list(range(19, 1000, 20))
    t = torch.tensor([0.0, 1.0, 19.0, 259.0, 999.0])
    c_skip, c_out = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(int(ti))
        assert float(c_skip[i]) == pytest.approx(float(ref_skip), rel=1e-6)
        assert float(c_out[i]) == pytest.approx(float(ref_out), rel=1e-6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # the boundary condition f(x, 0) = x
    x, x0 = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    torch.testing.assert_close(consistency_function(x, x0, t), c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0)


def test_losses_and_ema_match_their_formulas():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert float(consistency_loss(a, b, "l2")) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    c = 0.001
    assert float(consistency_loss(a, b, "huber", c)) == pytest.approx(
        float((torch.sqrt((a - b) ** 2 + c * c) - c).mean()), rel=1e-6)
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.95 * t.detach() + 0.05 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    ema_update(target, online, 0.95)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach(), e)


def lcm_run(tmp_path, teacher_folder, method="lcm", max_steps=2, **objective):
    raw = tiny_teacher_raw(tmp_path / method, max_steps=max_steps)
    raw["method"] = method
    raw["model"] = {"source": str(teacher_folder)}
    raw["optim"] = {"student": {"lr": 1e-3, "warmup_steps": 0}}
    raw["objective"] = {"num_ddim_timesteps": 50, "student_steps": 4, **objective}
    return resolve(raw)


def test_loss_is_the_consistency_of_two_trajectory_points(tmp_path, teacher_folder):
    from stepdistill.solvers import ddim_step

    trainer = build_trainer(lcm_run(tmp_path, teacher_folder, guidance_scale=1.5))
    o = trainer.objective
    batch = trainer._next_batch()
    torch.manual_seed(7)
    loss, _ = o.loss("student", batch, 0)
    torch.manual_seed(7)  # the same draws, by hand: grid index, then noise
    x0, cond, n = batch["image"], Cond.from_batch(batch), batch["image"].shape[0]
    t = torch.tensor(o.grid, dtype=torch.float32)[torch.randint(0, 50, (n,))]
    t_prev = (t - 20).clamp(min=0)
    x_t = o.schedule.add_noise(x0, torch.randn_like(x0), t)
    with torch.no_grad():
        pred = consistency_function(x_t, o.student(x_t, t, cond), t)
        x_prev = ddim_step(lambda x, tt: o.teacher(x, tt, cond, guidance_scale=1.5), o.schedule, x_t, t, t_prev)
        target = consistency_function(x_prev, o.target(x_prev, t_prev, cond), t_prev)
    assert float(loss) == pytest.approx(float((torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3).mean()), rel=1e-5)


def test_target_is_the_students_ema_and_resumes_exactly(tmp_path, teacher_folder):
    from stepdistill.trainers import Callback

    seen = []

    class Record(Callback):
        def on_step_end(self, trainer, step):
            o = trainer.objective
            seen.append(([p.detach().clone() for p in o.student.parameters()],
                         [p.detach().clone() for p in o.target.parameters()]))

    trainer = build_trainer(lcm_run(tmp_path / "a", teacher_folder, max_steps=4), [Record()])
    first_target = [p.detach().clone() for p in trainer.objective.target.parameters()]
    trainer.train(resume=None)
    prev = first_target
    for student, target in seen:  # target_k = 0.95 target_{k-1} + 0.05 student_k
        for s, t, p in zip(student, target, prev):
            torch.testing.assert_close(t, 0.95 * p + 0.05 * s, rtol=1e-5, atol=1e-6)
        prev = target
    # 2 steps + resume 2 steps == 4 straight steps, target network included
    run = lcm_run(tmp_path / "b", teacher_folder, max_steps=2)
    run.train.checkpoint_every = 2
    build_trainer(run).train(resume=None)
    run.train.max_steps = 4
    resumed = build_trainer(run)
    resumed.train(resume="latest")
    for a, b in zip(resumed.objective.target.parameters(), trainer.objective.target.parameters()):
        assert torch.equal(a, b)


def test_lcm_lora_trains_adapters_on_the_shared_teacher_without_a_target(tmp_path, teacher_folder):
    trainer = build_trainer(lcm_run(tmp_path, teacher_folder, method="lcm_lora", lora_rank=4))
    o = trainer.objective
    assert o.target is None
    teacher_storage = {p.data_ptr() for p in o.teacher.parameters()}
    assert all("lora_" in n for n, p in o.student.named_parameters() if p.requires_grad)
    assert {p.data_ptr() for n, p in o.student.named_parameters() if "lora_" not in n} <= teacher_storage
    before = {n: p.detach().clone() for n, p in o.student.named_parameters() if "lora_B" in n}
    trainer.train(resume=None)
    assert any(not torch.equal(p, before[n]) for n, p in o.student.named_parameters() if n in before)
    with pytest.raises(ConfigError, match="needs objective.lora_rank"):
        build_trainer(lcm_run(tmp_path / "x", teacher_folder, method="lcm_lora", lora_rank=0))


def test_lcm_lora_targets_choose_the_adapted_modules_and_export_for_load_lora_weights(tmp_path, teacher_folder):
    from stepdistill.pipelines import ClassConditionalPipeline
    from stepdistill.runs import export_run

    targets = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
    trainer = build_trainer(lcm_run(tmp_path, teacher_folder, method="lcm_lora", lora_rank=4, lora_targets=targets))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in trainer.objective.student.named_parameters() if ".lora_A" in n}
    assert any(n.endswith("conv_shortcut") for n in adapted) and any("downsamplers.0.conv" in n for n in adapted)
    assert not any("to_q" in n or "time_emb_proj" in n for n in adapted)
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")  # the LoRA file on the base weights
    fused = ClassConditionalPipeline.from_pretrained(export_run(trainer.output_dir, tmp_path / "fused",
                                                                lora_format="fused"))
    plain = ClassConditionalPipeline.from_pretrained(folder)
    lora = ClassConditionalPipeline.from_pretrained(folder)
    lora.load_lora_weights(folder)

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(class_labels=torch.tensor([1, 2]), num_inference_steps=4, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(sample(lora), sample(fused), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sample(lora), sample(plain))
    with pytest.raises(ConfigError, match="objective.lora_targets.*nope"):
        build_trainer(lcm_run(tmp_path / "x", teacher_folder, method="lcm_lora", lora_rank=4, lora_targets=["nope"]))
    with pytest.raises(ConfigError, match="lora_targets are for a LoRA student"):
        build_trainer(lcm_run(tmp_path / "y", teacher_folder, lora_targets=["conv1"]))


def test_lcm_lora_with_train_ema_exports_the_ema_of_the_adapters(tmp_path, teacher_folder):
    from stepdistill.pipelines import ClassConditionalPipeline
    from stepdistill.runs import export_run

    r = lcm_run(tmp_path, teacher_folder, method="lcm_lora", lora_rank=4, target_ema=0.95)
    r.train.ema_decay = 0.5
    trainer = build_trainer(r)
    trainer.train(resume=None)
    unet = trainer.objective.student.backbone
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor(499), torch.tensor([1, 2])

    def exported(ema=None):
        folder = export_run(trainer.output_dir, tmp_path / f"export_{ema}", ema=ema)
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        pipe.load_lora_weights(folder)
        with torch.no_grad():
            return pipe.unet(x, t, class_labels=labels).sample

    with torch.no_grad():
        raw = unet(x, t, class_labels=labels).sample
        with trainer.ema_weights():
            ema = unet(x, t, class_labels=labels).sample
    assert not torch.allclose(raw, ema, atol=1e-4)
    torch.testing.assert_close(exported(), ema, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exported(ema=False), raw, rtol=1e-4, atol=1e-5)


def test_lcm_lora_target_ema_is_an_ema_of_the_adapters_on_the_shared_base(tmp_path, teacher_folder):
    def run(folder, max_steps):
        r = lcm_run(tmp_path / folder, teacher_folder, method="lcm_lora", lora_rank=4, target_ema=0.9,
                    max_steps=max_steps)
        r.train.checkpoint_every = 1
        return r

    o = build_trainer(run("unit", 2)).objective
    base = {n: p.data_ptr() for n, p in o.student.named_parameters() if "lora_" not in n}
    assert {n: p.data_ptr() for n, p in o.target.named_parameters() if "lora_" not in n} == base
    adapters = {n: p for n, p in o.student.named_parameters() if "lora_" in n}
    target = dict(o.target.named_parameters())
    with torch.no_grad():
        for p in adapters.values():
            p.add_(torch.randn_like(p))
    prev = {n: target[n].detach().clone() for n in adapters}
    o.after_step("discriminator", 0)  # only the student's step moves the target
    o.after_step("student", 0)
    for n, p in adapters.items():
        torch.testing.assert_close(target[n], 0.9 * prev[n] + 0.1 * p.detach())
    # 1 step + resume 1 step == 2 straight steps, the adapters' target included
    straight = build_trainer(run("a", 2))
    straight.train(resume=None)
    build_trainer(run("b", 1)).train(resume=None)
    resumed = build_trainer(run("b", 2))
    resumed.train(resume="latest")
    ours = dict(straight.objective.target.named_parameters())
    for n, p in resumed.objective.target.named_parameters():
        assert torch.equal(p, ours[n]), n


def test_exports_with_lcm_scheduler_and_samples_in_1_2_4_steps(tmp_path, teacher_folder):
    from stepdistill.pipelines import ClassConditionalPipeline
    from stepdistill.runs import export_run

    trainer = build_trainer(lcm_run(tmp_path, teacher_folder))
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export")
    assert f"| base model | {teacher_folder.name} |" in (folder / "README.md").read_text()  # the teacher (by name)
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for steps in (1, 2, 4):
        images = pipe(class_labels=torch.tensor([1, 2]), num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == trainer.objective.sample_timesteps() == [999, 759, 499, 259]

    # other sampling timesteps on the grid, chosen at export: stock LCMScheduler where one runs them, else
    # StudentLCMScheduler; the default call, the card and stepdistill.json all run / name them
    import json

    from stepdistill.pipelines.export import META_FILE

    def export_at(timesteps, name):
        return export_run(trainer.output_dir, tmp_path / name,
                          overrides=[f"objective.student_steps={len(timesteps)}", f"objective.sample_timesteps={timesteps}"])

    stock = export_at([999, 759, 499, 259], "stock")
    assert json.loads((stock / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    tuned = [999, 899, 799, 699]
    folder = export_at(tuned, "tuned")
    info = json.loads((folder / META_FILE).read_text())
    assert info["timesteps"] == tuned and info["export"]["scheduler"] == "StudentLCMScheduler"
    assert info["export"]["needs_stepdistill"] and "timesteps 999, 899, 799, 699" in (folder / "README.md").read_text()
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == tuned
    with torch.no_grad():
        images = pipe(class_labels=torch.tensor([1, 2]), num_inference_steps=4, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()

    # TCDScheduler instead (objective.sampler=tcd): the same grid, the gamma saved as the call's (and the
    # pipeline's default) eta; the run's own preview samples the same way
    folder = export_run(trainer.output_dir, tmp_path / "tcd", overrides=["objective.sampler=tcd",
                                                                         "objective.tcd_gamma=0.5"])
    info = json.loads((folder / META_FILE).read_text())
    assert info["export"]["scheduler"] == "TCDScheduler" and info["export"]["call"]["kwargs"]["eta"] == 0.5
    assert info["timesteps"] == [999, 759, 499, 259] and info["eta"] == 0.5
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        return pipe(class_labels=torch.tensor([1, 2]), output_type="pt", generator=torch.Generator().manual_seed(0),
                    **kwargs).images

    torch.testing.assert_close(run(), run(eta=0.5))
    assert not torch.allclose(run(), run(eta=1.0))
    tcd = build_trainer(lcm_run(tmp_path, teacher_folder, sampler="tcd", tcd_gamma=0.5)).objective
    assert tcd.recipe.sampler == "tcd" and tcd.recipe.eta == 0.5
    assert tcd.sample({"batch_size": 2}, torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_bad_inputs_are_clear_errors(tmp_path, teacher_folder):
    # the digits UNet2DModel gets a guidance input (stepdistill.guided.GuidedUNet2DModel); a DiT has none
    embedded = build_trainer(lcm_run(tmp_path / "embedded", teacher_folder, guidance_range=[2.0, 8.0])).objective
    assert type(embedded.student.backbone).__name__ == "GuidedUNet2DModel"
    with pytest.raises(ConfigError, match="does not divide the teacher's 1000 training timesteps"):
        build_trainer(lcm_run(tmp_path, teacher_folder, num_ddim_timesteps=30))
    with pytest.raises(ConfigError, match="guidance_range is \\[s_min, s_max\\]"):
        lcm_run(tmp_path, teacher_folder, guidance_range=[8.0, 2.0])
    with pytest.raises(ConfigError, match="sample_timesteps must be objective.student_steps=4 decreasing"):
        lcm_run(tmp_path, teacher_folder, sample_timesteps=[999, 899])
    with pytest.raises(ConfigError, match=r"sample_timesteps \[900\] are not on the solver grid .*19, 39, \.\.\., 999"):
        build_trainer(lcm_run(tmp_path, teacher_folder, sample_timesteps=[999, 900, 799, 699]))
    with pytest.raises(ConfigError, match="tcd_gamma is TCD's gamma and must be in \\[0, 1\\]"):
        lcm_run(tmp_path, teacher_folder, sampler="tcd", tcd_gamma=1.5)
    with pytest.raises(ConfigError, match="sample_timesteps is not for tscd"):
        lcm_run(tmp_path, teacher_folder, method="tscd", num_ddim_timesteps=40, sample_timesteps=[999, 749, 499, 249])
    run = lcm_run(tmp_path, teacher_folder)
    run.data.dataset = "none"
    with pytest.raises(ConfigError, match="noises data samples"):
        build_trainer(run)


def test_guidance_range_adds_a_zeroed_guidance_embedding_to_a_text_unet(tmp_path):
    from text_teachers import LATENT, PROMPTS, sd_folder

    from stepdistill.models import prompt_encoder_for

    teacher = sd_folder(tmp_path / "sd")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    raw = {"method": "lcm", "output_dir": str(tmp_path / "run"), "model": {"source": str(teacher)},
           "data": {"dataset": "prompts", "path": str(tmp_path / "p.txt"), "resolution": LATENT},
           "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "progress": False},
           "objective": {"guidance_range": [2.0, 8.0], "guidance_embedding_dim": 16}}
    with pytest.raises(ConfigError, match="noises data samples"):  # prompts without images
        build_trainer(resolve(raw))
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model, text_null_cond

    run = resolve(raw)
    loaded = load_model(ModelConfig(source=str(teacher)))
    loaded.denoiser.null_cond = text_null_cond(run.model, tmp_path / "cache", LATENT)
    objective = ConsistencyObjective(run.objective, loaded.denoiser, loaded.scheduler, None, LATENT, 4)
    assert objective.student.backbone.config.time_cond_proj_dim == 16
    cond = prompt_encoder_for(run.model, LATENT).encode(PROMPTS[:2])
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([999.0, 500.0])
    guided = Cond(encoder_hidden_states=cond.encoder_hidden_states, guidance=torch.tensor([2.0, 7.0]))
    with torch.no_grad():  # the new projection starts at zero: the student starts as the teacher at any scale
        torch.testing.assert_close(objective.student(x, t, guided), objective.teacher(x, t, cond))
    loss, _ = objective.loss("student", {"image": x, "encoder_hidden_states": cond.encoder_hidden_states,
                                         "batch_size": 2}, 0)
    assert torch.isfinite(loss)


def test_scott_teacher_is_a_stochastic_multistep_ddim(tmp_path, teacher_folder):
    from stepdistill.solvers import ddim_from_x0

    o = build_trainer(lcm_run(tmp_path, teacher_folder, method="scott", solver_eta=0.7, solver_substeps=2)).objective
    assert o.name == "scott"
    x, cond = torch.randn(3, 1, 8, 8), Cond(class_labels=torch.tensor([1, 2, 3]))
    t, t_prev = torch.tensor([999.0, 519.0, 39.0]), torch.tensor([979.0, 499.0, 19.0])
    torch.manual_seed(3)
    with torch.no_grad():
        out = o.teacher_step(x, t, t_prev, cond, 1.0)
    torch.manual_seed(3)  # by hand: two DDIM(eta 0.7) sub-steps, t -> midpoint -> t_prev, fresh noise in each
    mid = (t + t_prev) / 2
    with torch.no_grad():
        y = ddim_from_x0(o.teacher(x, t, cond), x, o.schedule, t, mid, 0.7, torch.randn_like(x))
        y = ddim_from_x0(o.teacher(y, mid, cond), y, o.schedule, mid, t_prev, 0.7, torch.randn_like(y))
    torch.testing.assert_close(out, y)
    with pytest.raises(ConfigError, match="use solver ddim with it"):
        lcm_run(tmp_path, teacher_folder, method="scott", solver="heun")


# ------------------------------------------------------------------------------------------- TSCD
def test_segment_boundaries_are_the_trailing_ddim_timesteps():
    from diffusers import DDIMScheduler

    from stepdistill.trainers.tscd import segment_boundary, stage_of, to_boundary

    t = torch.tensor([999.0, 750.0, 749.0, 500.0, 499.0, 250.0, 249.0, 24.0])
    assert segment_boundary(t, 4).tolist() == [749, 749, 499, 499, 249, 249, 0, 0]
    assert segment_boundary(t, 1).tolist() == [0] * 8
    grid = torch.tensor(lcm_grid(1000, 40), dtype=torch.float32)
    for k in (8, 4, 2):
        sched = DDIMScheduler(timestep_spacing="trailing")
        sched.set_timesteps(k)
        edges = {int(b) for b in segment_boundary(grid, k).tolist()} - {0}  # the k - 1 inner boundaries
        assert set(sched.timesteps.tolist()) == {999} | edges
    assert [stage_of(s, [0, 10, 20]) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    from stepdistill.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler(DDIMScheduler())
    x, x0 = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    tt = torch.tensor([499.0, 499.0])
    torch.testing.assert_close(to_boundary(x, x0, tt, tt, schedule), x)  # at its boundary a point maps to itself


def test_tscd_trains_stage_by_stage_and_exports_ddim_trailing(tmp_path, teacher_folder):
    import json

    from stepdistill.pipelines import ClassConditionalPipeline

    from stepdistill.runs import export_run

    run = lcm_run(tmp_path, teacher_folder, method="tscd", max_steps=4, num_ddim_timesteps=40)
    run.train.checkpoint_every, run.train.keep_checkpoints = 1, 4
    trainer = build_trainer(run)
    assert trainer.objective.stage_starts == [0, 1, 2, 3]
    trainer.train(resume=None)
    logs = [json.loads(l) for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["student/segments"] for l in logs] == [8, 4, 2, 1]
    folder = export_run(trainer.output_dir, tmp_path / "export")
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert trainer.objective.sample_timesteps() == [999, 749, 499, 249]  # k = 1: student_steps
    # each stage's last checkpoint is that stage's model (Hyper-SD's per-step-count models): k steps, trailing
    for step, timesteps in [(2, [999, 749, 499, 249]), (3, [999, 499])]:
        stage = export_run(trainer.output_dir, tmp_path / f"stage{step}",
                           checkpoint=trainer.output_dir / "checkpoints" / f"step_{step:07d}")
        recipe = json.loads((stage / "stepdistill.json").read_text())["export"]["recipe"]
        assert recipe["num_inference_steps"] == len(timesteps)
        pipe = ClassConditionalPipeline.from_pretrained(stage)
        pipe.scheduler.set_timesteps(len(timesteps))
        assert pipe.scheduler.timesteps.tolist() == timesteps
    # sampler: tcd exports TCDScheduler on the same trailing timesteps (Hyper-SD samples with TCD)
    stage = export_run(trainer.output_dir, tmp_path / "stage2_tcd", overrides=["objective.sampler=tcd"],
                       checkpoint=trainer.output_dir / "checkpoints" / "step_0000002")
    info = json.loads((stage / "stepdistill.json").read_text())["export"]
    assert info["scheduler"] == "TCDScheduler" and info["timesteps"] == [999, 749, 499, 249]
    assert info["call"]["kwargs"]["eta"] == 0.3
    with pytest.raises(ConfigError, match=r"segments \[8, 4\] do not divide the solver grid"):
        lcm_run(tmp_path, teacher_folder, method="tscd", num_ddim_timesteps=50)


def test_student_init_starts_student_and_target_from_another_run(tmp_path, teacher_folder):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model, save_model

    loaded = load_model(ModelConfig(source=str(teacher_folder)))
    with torch.no_grad():
        for p in loaded.denoiser.backbone.parameters():
            p.add_(0.01)
    warm = save_model(loaded.denoiser, loaded.scheduler, tmp_path / "warm", loaded.meta)
    o = build_trainer(lcm_run(tmp_path, teacher_folder, student_init=str(warm))).objective
    for name, w in loaded.denoiser.backbone.state_dict().items():
        assert torch.equal(o.student.backbone.state_dict()[name], w)
        assert torch.equal(o.target.backbone.state_dict()[name], w)
    teacher = load_model(ModelConfig(source=str(teacher_folder))).denoiser.backbone.state_dict()
    assert all(torch.equal(o.teacher.backbone.state_dict()[k], v) for k, v in teacher.items())  # teacher untouched
    with pytest.raises(ConfigError, match="a LoRA student starts from the teacher"):
        build_trainer(lcm_run(tmp_path, teacher_folder, method="lcm_lora", lora_rank=4, student_init=str(warm)))


@pytest.mark.parametrize("recipe", ["lcm_digits", "lcm_digits_1step", "lcm_lora_digits", "lcm_lora_digits_1step",
                                    "scott_digits", "tscd_digits", "ict_digits"])
def test_digits_recipes_train_on_the_shipped_teacher(tmp_path, recipe):
    import json
    import math
    from pathlib import Path

    from stepdistill.trainers import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml"
    trainer = build_trainer(load_config(path, [
        "train.max_steps=1", "train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=0",
        "train.progress=false", "train.log_every=1", f"output_dir={tmp_path}"]))
    trainer.train(resume=None)
    logs = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    losses = {k: v for k, v in logs.items() if k.split("/")[-1] in ("consistency", "ict", "adv", "disc")}
    assert losses and all(math.isfinite(v) for v in losses.values())
