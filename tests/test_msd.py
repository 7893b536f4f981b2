"""MSD (multi-student distillation): partitions, per-sample routing, TTUR over routed students, smaller students
with TSM pretraining, and the one exported pipeline that routes each class to its student."""
import json

import pytest
import torch

from stepdistill import Cond
from stepdistill.config import ConfigError
from stepdistill.trainers import resolve
from stepdistill.pipelines.routing import merge, owners, route, route_call
from stepdistill.trainers import MSDTrainer, build_trainer
from stepdistill.trainers.msd import even_partition, owner_table, tsm_loss
from tiny import tiny_teacher_raw

SMALL = {"block_out_channels": [8, 16]}  # a student with half the teacher's channels


def msd_run(tmp_path, teacher_folder, name="msd", method="msd", max_steps=4, **objective):
    raw = tiny_teacher_raw(tmp_path / name, max_steps=max_steps)
    raw["method"] = method
    raw["model"] = {"source": str(teacher_folder)}
    if method == "msd":
        raw["optim"] = {"generator": {"lr": 1e-3, "every": 2}, "critic": {"lr": 1e-3}}
        objective = {"gan_weight_gen": 1e-2, "gan_weight_disc": 1e-2, **objective}
    else:
        raw["optim"] = {"generator": {"lr": 1e-3}}
    raw["objective"] = objective
    return resolve(raw)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- the pure functions
def test_even_partition_and_owner_table():
    assert even_partition(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert even_partition(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert even_partition(10, 10) == [[c] for c in range(10)]
    assert owner_table([[0, 3], [1, 2]], 4) == [0, 1, 1, 0]
    with pytest.raises(ConfigError, match=r"leaves class\(es\) \[7, 9\] without a student"):
        owner_table([[0, 1, 2, 3, 4], [5, 6, 8]], 10)
    with pytest.raises(ConfigError, match=r"class\(es\) \[4\] to more than one student.*class 4: students \[0, 1\]"):
        owner_table([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]], 10)
    with pytest.raises(ConfigError, match=r"class\(es\) \[12\] that do not exist"):
        owner_table([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 12]], 10)
    with pytest.raises(ConfigError, match="student 1 owns no class"):
        owner_table([list(range(10)), []], 10)
    with pytest.raises(ConfigError, match="num_students"):
        even_partition(3, 4)


def test_routing_runs_each_sample_on_its_owner_and_keeps_batch_order():
    labels = torch.tensor([7, 0, 5, 2, 9, 4])
    student = owners(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert student.tolist() == [1, 0, 1, 0, 1, 0]
    assert [i.tolist() for i in route(student, 3)] == [[1, 3, 5], [0, 2, 4], []]  # student 2: nothing to do
    x = torch.randn(6, 3, requires_grad=True)
    scale = torch.tensor([1.0, 10.0, 100.0])
    out = route_call(student, 3, lambda k, idx: x[idx] * scale[k])
    torch.testing.assert_close(out, x * scale[student][:, None])
    out.sum().backward()  # the permutation keeps the gradient of every student's outputs
    torch.testing.assert_close(x.grad, scale[student][:, None].expand(6, 3))
    pair = route_call(student, 2, lambda k, idx: (x[idx] + k, labels[idx]))
    assert isinstance(pair, tuple) and torch.equal(pair[1], labels)
    with pytest.raises(ValueError, match=r"class label\(s\) \[10\] have no student"):
        owners(torch.tensor([1, 10]), [0] * 10)
    with pytest.raises(ValueError, match="covered 1 of 2"):
        merge([(torch.tensor([0]), torch.zeros(1))], 2)


def test_tsm_loss_is_the_mse_to_the_teachers_prediction():
    s, t = torch.randn(4, 1, 8, 8, requires_grad=True), torch.randn(4, 1, 8, 8, requires_grad=True)
    loss = tsm_loss(s, t)
    torch.testing.assert_close(loss, ((s - t) ** 2).mean())
    loss.backward()
    assert t.grad is None  # the teacher's prediction is a fixed target


# ------------------------------------------------------------------------------------------- the objective
def test_msd_routes_per_sample_and_keeps_ttur(tmp_path, teacher_folder):
    from stepdistill.trainers import Callback

    seen = []

    class Record(Callback):
        def on_step_end(self, trainer, step):
            o = trainer.objective
            seen.append((step, [weights(s) for s in o.students], weights(o.fake_score), weights(o.disc_head)))

    trainer = MSDTrainer(msd_run(tmp_path, teacher_folder), [Record()]).trainer
    o = trainer.objective
    assert o.partition == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and len(o.students) == 2
    assert len(o.fake_score.members) == 2 and len(o.disc_head.heads) == 2  # per-student fake scores and heads
    assert [p.name for p in o.phases(o.config)] == ["generator", "critic"]
    labels_seen = {0: [], 1: []}
    hooks = [s.backbone.register_forward_pre_hook(
        lambda m, args, kwargs, k=k: labels_seen[k].extend(kwargs["class_labels"].tolist()), with_kwargs=True)
        for k, s in enumerate(o.students)]
    teacher0 = weights(o.teacher)
    prev = ([weights(s) for s in o.students], weights(o.fake_score))
    trainer.train(resume=None)
    for h in hooks:
        h.remove()
    assert set(labels_seen[0]) <= {0, 1, 2, 3, 4} and set(labels_seen[1]) <= {5, 6, 7, 8, 9}
    assert labels_seen[0] and labels_seen[1]  # batches mix both students
    for step, students, fake, head in seen:
        gen_step = (step - 1) % 2 == 0
        assert [changed(s, p) for s, p in zip(students, prev[0])] == [gen_step, gen_step], step  # TTUR
        assert changed(fake, prev[1])  # the critic every step
        prev = (students, fake)
    assert not changed(weights(o.teacher), teacher0)
    logs = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"generator/dm", "generator/gan", "critic/fake_score", "critic/disc"} <= set(logs[-1])
    saved = json.loads((trainer.output_dir / "final" / "multi_student.json").read_text())
    assert saved["partition"] == o.partition
    assert (trainer.output_dir / "final" / "student_1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_each_student_only_learns_from_its_classes(tmp_path, teacher_folder):
    """A batch of one student's classes changes that student (and its fake score), never the other."""
    o = build_trainer(msd_run(tmp_path, teacher_folder, gan_weight_gen=0.0, gan_weight_disc=0.0)).objective
    batch = {"batch_size": 4, "class_label": torch.tensor([5, 6, 9, 7])}
    with torch.no_grad():  # fake scores = teacher give a zero DM gradient: move them off the teacher first
        for p in o.fake_score.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    for phase, module in (("generator", o.generator), ("critic", o.fake_score)):
        loss, _ = o.loss(phase, batch, 0)
        loss.backward()
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in module.members]
        assert grads == [False, True], phase
        module.zero_grad(set_to_none=True)


def test_shared_fake_score_option(tmp_path, teacher_folder):
    o = build_trainer(msd_run(tmp_path, teacher_folder, fake_score="shared", max_steps=1)).objective
    from stepdistill.denoiser import Denoiser
    from stepdistill.trainers.dmd import DiscriminatorHead

    assert isinstance(o.fake_score, Denoiser) and isinstance(o.disc_head, DiscriminatorHead)
    loss, logs = o.loss("critic", {"batch_size": 4, "class_label": torch.tensor([0, 9, 3, 5]),
                                   "image": torch.zeros(4, 1, 8, 8)}, 0)
    assert torch.isfinite(loss) and "disc" in logs


def test_smaller_students_pretrained_by_tsm_then_distilled(tmp_path, teacher_folder):
    tsm = build_trainer(msd_run(tmp_path, teacher_folder, "tsm", "msd_tsm", max_steps=3,
                                student_backbone_config=SMALL))
    small = sum(p.numel() for p in tsm.objective.students[0].parameters())
    big = sum(p.numel() for p in tsm.objective.teacher.parameters())
    assert small < big / 2
    first = [weights(s) for s in tsm.objective.students]
    tsm.train(resume=None)
    assert all(changed(weights(s), w) for s, w in zip(tsm.objective.students, first))
    logs = [json.loads(line) for line in (tsm.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert "generator/tsm" in logs[-1]
    o = build_trainer(msd_run(tmp_path, teacher_folder, student_backbone_config=SMALL,
                              student_init=str(tsm.output_dir))).objective
    for s, t in zip(o.students, tsm.objective.students):
        assert not changed(weights(s), weights(t))  # starts from the TSM students
    assert sum(p.numel() for p in o.fake_score.members[0].parameters()) == big  # teacher-sized fake scores
    with pytest.raises(ConfigError, match="another architecture"):
        build_trainer(msd_run(tmp_path, teacher_folder, student_init=str(tsm.output_dir)))
    with pytest.raises(ConfigError, match="partition"):
        build_trainer(msd_run(tmp_path, teacher_folder, student_backbone_config=SMALL,
                              partition=[[0, 1], list(range(2, 10))], student_init=str(tsm.output_dir)))


def test_bad_inputs_are_clear_errors(tmp_path, teacher_folder):
    with pytest.raises(ConfigError, match=r"leaves class\(es\) \[9\] without a student"):
        build_trainer(msd_run(tmp_path, teacher_folder, partition=[[0, 1, 2, 3, 4], [5, 6, 7, 8]]))
    with pytest.raises(ConfigError, match=r"class\(es\) \[3\] to more than one student"):
        build_trainer(msd_run(tmp_path, teacher_folder, partition=[[0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]]))
    with pytest.raises(ConfigError, match="3 groups but objective.num_students is 2"):
        msd_run(tmp_path, teacher_folder, partition=[[0], [1], list(range(2, 10))])
    with pytest.raises(ConfigError, match=r"output has shape \(2, 2, 8, 8\) but the teacher's has \(2, 1, 8, 8\)"):
        build_trainer(msd_run(tmp_path, teacher_folder, student_backbone_config={"out_channels": 2}))
    with pytest.raises(ConfigError, match="has no key"):
        build_trainer(msd_run(tmp_path, teacher_folder, student_backbone_config={"channels": 2}))
    with pytest.raises(ConfigError, match="label_dropout"):
        msd_run(tmp_path, teacher_folder, label_dropout=0.1)
    with pytest.raises(ConfigError, match="no saved students"):
        build_trainer(msd_run(tmp_path, teacher_folder, student_init=str(tmp_path / "nowhere")))


# ------------------------------------------------------------------------------------------- export
def test_export_routes_each_class_to_its_student(tmp_path, teacher_folder):
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines import MultiStudentPipeline, export_pipeline

    with pytest.warns(UserWarning, match="msd_tsm"):  # small students without TSM: allowed, with a warning
        trainer = build_trainer(msd_run(tmp_path, teacher_folder, max_steps=2, student_backbone_config=SMALL))
    trainer.train(resume=None)  # students that differ from each other
    o = trainer.objective
    folder = export_pipeline(o.export_spec(), out_dir=tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["pipeline"] == "MultiStudentPipeline" and info["needs_stepdistill"]
    assert [s["classes"] for s in info["students"]] == o.partition
    pipe = MultiStudentPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.partition == o.partition
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([9, 0, 4, 5, 2, 7])
    images = pipe(class_labels=labels, latents=noise, output_type="pt").images
    with torch.no_grad():
        routed = o._generate(noise, Cond(class_labels=labels), grad=False)
        direct = torch.cat([one_student(o, k, noise[i:i + 1], labels[i:i + 1])
                            for i, k in enumerate(owners(labels, o.owner).tolist())])
    torch.testing.assert_close(routed, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images, (direct / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    again = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(again).__name__ == "MultiStudentPipeline"
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again(class_labels=labels, latents=noise, output_type="pt").images, images)
    with pytest.raises(ValueError, match="without CFG"):
        pipe(class_labels=labels, latents=noise, guidance_scale=2.0)
    # `stepdistill eval` / `bench` load it as a class-conditional student
    from stepdistill.metrics.samplers import load_eval_model

    model = load_eval_model(str(folder))
    assert model.num_classes == 10 and model.default_nfe == [1] and model.timesteps == [999]
    assert model.sample(range(4), nfe=1, seed=0).shape == (4, 1, 8, 8)
    # `stepdistill export RUN`: the run's latest checkpoint, rebuilt from its config, gives the same pipeline
    from stepdistill.runs import export_run

    with pytest.warns(UserWarning, match="msd_tsm"):
        from_run = export_run(trainer.output_dir, tmp_path / "from_run")
    pipe2 = MultiStudentPipeline.from_pretrained(from_run)
    pipe2.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe2(class_labels=labels, latents=noise, output_type="pt").images, images)


def one_student(objective, k, noise, labels):
    """DMD's ``_generate`` run by student ``k`` alone (no routing)."""
    routed = objective.generator
    objective.generator = objective.students[k]
    try:
        return objective._generate(noise, Cond(class_labels=labels), grad=False)
    finally:
        objective.generator = routed


# ------------------------------------------------------------------------------------------- the recipes
def test_digits_recipes_run_on_the_shipped_teacher(tmp_path):
    """configs/msd_tsm_digits.yaml then configs/msd_digits_1step.yaml with its smaller students, a step each."""
    from pathlib import Path

    from stepdistill.trainers import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    quick = ["train.max_steps=1", "train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=0",
             "train.progress=false"]
    tsm = build_trainer(load_config(configs / "msd_tsm_digits.yaml", quick + [f"output_dir={tmp_path}/tsm"]))
    tsm.train(resume=None)
    small = tsm.objective.config.student_backbone_config
    run = load_config(configs / "msd_digits_1step.yaml", quick + [
        f"output_dir={tmp_path}/msd", f"objective.student_init={tmp_path}/tsm",
        f"objective.student_backbone_config={json.dumps(small)}"])
    assert run.objective.partition == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    trainer = build_trainer(run)
    trainer.train(resume=None)
    logs = json.loads((trainer.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"generator/dm", "critic/fake_score"} <= set(logs)


def test_generator_init_starts_every_student_from_a_warm_start(tmp_path, teacher_folder):
    warm = build_trainer(msd_run(tmp_path, teacher_folder, name="warm", max_steps=1, fake_score="shared"))
    warm.objective.generator.members[0].backbone.conv_in.weight.data.add_(1.0)  # a distinct first student
    warm.objective.save_pretrained(tmp_path / "warm_students")
    from stepdistill.models import save_model

    first = warm.objective.generator.members[0]
    save_model(first, warm.objective.teacher_scheduler, tmp_path / "warm_model", {"num_classes": 10})
    o = build_trainer(msd_run(tmp_path, teacher_folder, generator_init=str(tmp_path / "warm_model"))).objective
    for student in o.students:
        assert torch.equal(student.backbone.conv_in.weight, first.backbone.conv_in.weight)
    with pytest.raises(ConfigError, match="students of the teacher's size"):
        build_trainer(msd_run(tmp_path, teacher_folder, name="small", student_backbone_config=SMALL,
                              generator_init=str(tmp_path / "warm_model")))
