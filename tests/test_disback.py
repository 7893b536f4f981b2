"""DisBack: stage 1 records the degradation path (count, files, frozen student); stage 2 walks it backwards
(target at each step: last recorded first, then earlier ones, then the teacher), switching at the interval, and
resumes exactly mid-path."""
import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError

from stepdistill.trainers import resolve
from stepdistill.trainers import DisBackTrainer, build_trainer
from stepdistill.trainers.disback import path_files, record_due, target_index
from tiny import tiny_teacher_raw


def record_run(tmp_path, teacher_folder, max_steps=4, **objective):
    raw = tiny_teacher_raw(tmp_path / "record", max_steps=max_steps)
    raw.update(method="disback_record", model={"source": str(teacher_folder)})
    raw["optim"] = {"critic": {"lr": 1e-3}}
    raw["objective"] = {"record_every": 2, **objective}
    return resolve(raw)


def backtrack_run(tmp_path, teacher_folder, path, name="disback", max_steps=6, **objective):
    raw = tiny_teacher_raw(tmp_path / name, max_steps=max_steps)
    raw.update(method="disback", model={"source": str(teacher_folder)})
    raw["optim"] = {"generator": {"lr": 1e-3, "every": 1}, "critic": {"lr": 1e-3}}
    raw["objective"] = {"path": str(path), "interval": 2, "gan_weight_gen": 1e-2, "gan_weight_disc": 1e-2,
                        **objective}
    return resolve(raw)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------- the pure functions
def test_record_and_target_schedules():
    assert [s for s in range(10) if record_due(s, 3)] == [2, 5, 8]  # after 3, 6, 9 updates
    # N = 3 recorded scores, interval 2: s_3, s_3, s_2, s_2, s_1, s_1, then the teacher
    assert [target_index(s, 2, 3) for s in range(8)] == [2, 2, 1, 1, 0, 0, None, None]
    assert [target_index(s, 1000, 2) for s in (0, 999, 1000, 1999, 2000, 10**6)] == [1, 1, 0, 0, None, None]
    assert target_index(0, 5, 0) is None  # no path: the teacher (plain DMD2)


def test_path_files_are_in_recording_order(tmp_path):
    for n in (10, 2, 100):
        (tmp_path / "path").mkdir(exist_ok=True)
        (tmp_path / "path" / f"score_{n:07d}.safetensors").write_bytes(b"")
    assert [p.name for p in path_files(tmp_path)] == [f"score_{n:07d}.safetensors" for n in (2, 10, 100)]
    assert path_files(tmp_path / "path") == path_files(tmp_path)


# ------------------------------------------------------------------------------------------- both stages
@pytest.fixture
def recorded(tmp_path, teacher_folder):
    trainer = build_trainer(record_run(tmp_path, teacher_folder, max_steps=5))
    o = trainer.objective
    generator0, teacher0 = weights(o.generator), weights(o.teacher)
    assert [p.name for p in trainer.phases] == ["critic"] and trainer.ema is None
    trainer.train(resume=None)
    assert weights(o.generator).keys() == generator0.keys()
    assert all(torch.equal(v, generator0[k]) for k, v in weights(o.generator).items())  # the student is frozen
    assert all(torch.equal(v, teacher0[k]) for k, v in weights(o.teacher).items())
    return trainer


def test_stage1_records_the_path(recorded):
    files = path_files(recorded.output_dir)
    assert [p.name for p in files] == ["score_0000002.safetensors", "score_0000004.safetensors"]  # 5 // 2
    info = json.loads((files[0].parent / "record.json").read_text())
    assert info["record_every"] == 2 and info["student_steps"] == 1
    first, last = (load_file(str(p)) for p in files)
    teacher = recorded.objective.teacher.backbone.state_dict()
    assert first.keys() == teacher.keys()
    assert any(not torch.equal(first[k], teacher[k]) for k in first)  # the score moved away from the teacher
    assert any(not torch.equal(first[k], last[k]) for k in first)  # ... and on along the path
    with pytest.raises(NotImplementedError, match="disback stage"):
        recorded.objective.export_spec()


def test_stage2_walks_the_path_backwards_then_the_teacher(tmp_path, teacher_folder, recorded):
    files = path_files(recorded.output_dir)
    trainer = DisBackTrainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir)).trainer
    o = trainer.objective
    held = []
    original = o.set_target

    def spy(step):
        index = original(step)
        real = o.real_score.backbone.state_dict()
        expected = o.teacher.backbone.state_dict() if index is None else load_file(str(files[index]))
        held.append((step, index, all(torch.equal(real[k], expected[k]) for k in expected)))
        return index

    o.set_target = spy
    teacher0 = weights(o.teacher)
    trainer.train(resume=None)
    per_step = {step: (index, ok) for step, index, ok in held}
    assert [per_step[s][0] for s in range(6)] == [1, 1, 0, 0, None, None]  # s_4, s_4, s_2, s_2, teacher, teacher
    assert all(ok for _, ok in per_step.values())  # the real score holds exactly that checkpoint
    assert all(torch.equal(v, teacher0[k]) for k, v in weights(o.teacher).items())
    logs = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["generator/target_updates"] for row in logs] == [4, 4, 2, 2, 0, 0]
    assert {"generator/dm", "generator/gan", "critic/fake_score", "critic/disc"} <= set(logs[-1])


def test_stage2_resumes_mid_path_exactly(tmp_path, teacher_folder, recorded):
    whole = build_trainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir, "whole", max_steps=5))
    whole.train(resume=None)
    part = build_trainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir, "part", max_steps=3))
    part.train(resume=None)  # stops inside the second target's interval, with a checkpoint
    resumed = build_trainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir, "part", max_steps=5))
    assert resumed.load_checkpoint("latest") and resumed.step == 3
    resumed.train(resume=None)
    for name in ("generator", "fake_score", "disc_head"):
        a, b = weights(getattr(whole.objective, name)), weights(getattr(resumed.objective, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_fake_score_can_start_at_the_path_end(tmp_path, teacher_folder, recorded):
    run = backtrack_run(tmp_path, teacher_folder, recorded.output_dir, fake_score_init="path_end")
    o = build_trainer(run).objective
    last = load_file(str(path_files(recorded.output_dir)[-1]))
    fake = o.fake_score.backbone.state_dict()
    assert all(torch.equal(fake[k], last[k]) for k in last)


def test_bad_inputs_are_clear_errors(tmp_path, teacher_folder, recorded):
    with pytest.raises(ConfigError, match="objective.path: give the output_dir of a disback_record run"):
        backtrack_run(tmp_path, teacher_folder, "")
    with pytest.raises(ConfigError, match="holds no recorded path"):
        build_trainer(backtrack_run(tmp_path, teacher_folder, tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="recorded for 1: the path belongs to another initial student"):
        build_trainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir, student_steps=4))
    with pytest.raises(ConfigError, match="generator_init is .* the path belongs to another initial student"):
        build_trainer(backtrack_run(tmp_path, teacher_folder, recorded.output_dir, generator_init=str(teacher_folder)))
    with pytest.raises(ConfigError, match="trains only the score model"):
        record_run(tmp_path, teacher_folder, gan_weight_gen=1e-2, gan_weight_disc=1e-2)
    with pytest.raises(ConfigError, match="record_every must be >= 1"):
        record_run(tmp_path, teacher_folder, record_every=0)


def test_digits_recipes_run_on_the_shipped_teacher(tmp_path):
    """configs/disback_digits_record.yaml then configs/disback_digits_1step.yaml on its path, a few steps each."""
    from pathlib import Path

    from stepdistill.trainers import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    quick = ["train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=0", "train.progress=false"]
    record = build_trainer(load_config(configs / "disback_digits_record.yaml", quick + [
        "train.max_steps=2", "objective.record_every=1", f"output_dir={tmp_path}/record"]))
    record.train(resume=None)
    assert len(path_files(tmp_path / "record")) == 2
    trainer = build_trainer(load_config(configs / "disback_digits_1step.yaml", quick + [
        "train.max_steps=1", f"output_dir={tmp_path}/back", f"objective.path={tmp_path}/record"]))
    trainer.train(resume=None)
    logs = json.loads((trainer.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert logs["generator/target_updates"] == 2
