"""Runs under faults and mistakes: one run per folder, resumes that refuse changed settings, divergence and signals
that end with a clear status, checkpoints whose integrity is checked, seeds for every generator, and a teacher
that must match what pairs and warm starts were made with."""
from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch
import yaml

from contract_helpers import StopAt
from stepdistill.cli import DIVERGED, main
from stepdistill.config import ConfigError
from stepdistill.locks import FolderInUse, hold_folder
from stepdistill.trainers import build_trainer, resolve
from stepdistill.trainers.checkpoint import CheckpointError, step_dirs
from tiny import tiny_dmd_raw, tiny_teacher_raw


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------------ one run per folder
def test_a_second_run_into_a_folder_in_use_fails_at_once_and_leaves_its_config_alone(tmp_path, capsys):
    raw = tiny_teacher_raw(tmp_path / "run")
    first = build_trainer(resolve(raw))
    with hold_folder(first.output_dir, "a test"):  # as a run in another process holds it
        with pytest.raises(FolderInUse, match=f"{first.output_dir} is in use"):
            build_trainer(resolve({**raw, "train": {**raw["train"], "seed": 5}})).train()
        assert not (first.output_dir / "config.yaml").exists()
        assert main(["train-teacher", str(write(tmp_path / "c.yaml", raw))]) == 2
        assert "in use" in capsys.readouterr().err
    first.train()  # released: the folder is free again
    assert first.step == raw["train"]["max_steps"]


# ------------------------------------------------------------------------------------------------ resume
def test_resume_refuses_changed_run_settings_and_allows_the_length_and_logging(tmp_path):
    raw = tiny_teacher_raw(tmp_path / "run", max_steps=2, checkpoint_every=1)
    build_trainer(resolve(raw)).train()
    for key, value in (("seed", 1), ("batch_size", 8)):
        changed = {**raw, "train": {**raw["train"], key: value, "max_steps": 3}}
        with pytest.raises(ConfigError, match=f"train.{key}: .* -> {value}"):
            build_trainer(resolve(changed)).train()
    with pytest.raises(ConfigError, match="optim.model.lr"):
        build_trainer(resolve({**raw, "optim": {"model": {"lr": 5e-3}}})).train()
    longer = {**raw, "train": {**raw["train"], "max_steps": 3, "log_every": 2, "threads": 1}}
    trainer = build_trainer(resolve(longer))
    trainer.train()
    assert trainer.step == 3
    on_purpose = {**raw, "train": {**raw["train"], "max_steps": 4, "batch_size": 8,
                                   "allow_changed": ["train.batch_size"]}}
    trainer = build_trainer(resolve(on_purpose))
    trainer.train()
    assert trainer.step == 4


def test_an_incomplete_trainer_json_is_a_clear_error(tmp_path, capsys):
    raw = tiny_teacher_raw(tmp_path / "run", max_steps=1)
    trainer = build_trainer(resolve(raw))
    trainer.train()
    (step_dirs(trainer.checkpoint_root)[-1] / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="trainer.json lacks step, world"):
        build_trainer(resolve(raw)).load_checkpoint()
    assert main(["train-teacher", str(write(tmp_path / "c.yaml", raw))]) == 2
    assert "lacks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ divergence, signals
def test_a_diverging_run_publishes_no_checkpoint_of_broken_weights_and_exits_with_its_own_status(tmp_path, capsys):
    raw = tiny_teacher_raw(tmp_path / "run", max_steps=40, checkpoint_every=1, keep_checkpoints=0)
    raw["optim"] = {"model": {"lr": 1e12, "max_grad_norm": None, "lr_schedule": "constant"}}
    code = main(["train-teacher", str(write(tmp_path / "c.yaml", raw))])
    err = capsys.readouterr().err
    assert code == DIVERGED and err.startswith("stepdistill: diverged:") and err.count("\n") == 1
    published = step_dirs(tmp_path / "run" / "checkpoints")
    for path in published:  # every published checkpoint is finite, weights and optimizer state alike
        trainer = build_trainer(resolve(raw))
        assert trainer.load_checkpoint(str(path), quiet=True)
        assert all(torch.isfinite(p).all() for p in trainer.objective.parameters())
        state = trainer.optimizers["model"].optimizer.state
        assert all(torch.isfinite(v).all() for s in state.values() for v in s.values() if torch.is_tensor(v))


def test_a_run_stopped_by_a_signal_exits_non_zero_and_does_not_say_done(tmp_path, capsys, monkeypatch):
    import stepdistill.trainers as trainers

    build = trainers.build_trainer
    monkeypatch.setattr(trainers, "build_trainer", lambda run, callbacks=(): build(run, [StopAt(2)]))
    raw = tiny_teacher_raw(tmp_path / "run", max_steps=4)
    assert main(["train-teacher", str(write(tmp_path / "c.yaml", raw))]) == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "stopped by signal at step 2 of 4" in out and "done" not in out
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------------------ integrity, seeds
def test_a_damaged_checkpoint_is_refused_and_the_last_good_one_kept(tmp_path):
    raw = tiny_teacher_raw(tmp_path / "run", max_steps=2, checkpoint_every=1, ema_decay=0.9)
    trainer = build_trainer(resolve(raw))
    trainer.train()
    first, last = step_dirs(trainer.checkpoint_root)
    hashes = json.loads((last / "files.json").read_text())
    assert {"model.safetensors", "trainer.json", "ema.safetensors"} <= set(hashes)
    data = bytearray((last / "ema.safetensors").read_bytes())
    data[-8:] = b"\xff\xff\xc0\x7f" * 2  # NaN bytes in the EMA
    (last / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ema.safetensors is not what was written"):
        build_trainer(resolve(raw)).load_checkpoint()
    assert first.is_dir()  # the earlier checkpoint is still there to resume from
    assert build_trainer(resolve(raw)).load_checkpoint(str(first))


def test_python_and_numpy_are_seeded_per_run(tmp_path):
    draws = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_trainer(resolve(tiny_teacher_raw(tmp_path / name, seed=seed)))
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1] and draws[0] != draws[2]


# ------------------------------------------------------------------------------------------------ the right teacher
def test_pairs_and_warm_starts_from_another_teacher_are_refused(tmp_path, teacher_folder):
    from stepdistill.pairs import make_pairs

    make_pairs("digits-teacher", tmp_path / "pairs", 16, nfe=2, shard_size=16, batch_size=16, progress=False)
    raw = tiny_dmd_raw(tmp_path / "reg", teacher_folder, "regression")
    raw["data"] = {"dataset": "pairs", "path": str(tmp_path / "pairs"), "resolution": 8, "channels": 1}
    raw["optim"] = {"generator": {"lr": 1e-3}}
    raw["objective"] = {}
    with pytest.raises(ConfigError, match="pairs in .*: made by another teacher \\('digits-teacher'"):
        build_trainer(resolve(raw))
    warm = build_trainer(resolve(tiny_dmd_raw(tmp_path / "warm", teacher_folder, "dmd2")))
    warm.train()
    assert json.loads((warm.output_dir / "teacher.json").read_text())["fingerprint"] == warm.objective.teacher_fingerprint
    other = tmp_path / "other_teacher"
    import shutil

    shutil.copytree(teacher_folder, other)
    from safetensors.torch import load_file, save_file

    path = next((other / "unet").glob("*.safetensors"))
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1  # another teacher of the same architecture
    save_file(tensors, str(path))
    again = tiny_dmd_raw(tmp_path / "again", other, "dmd2", generator_init=str(warm.output_dir))
    with pytest.raises(ConfigError, match="generator_init=.*: made by another teacher"):
        build_trainer(resolve(again))
    same = tiny_dmd_raw(tmp_path / "same", teacher_folder, "dmd2", generator_init=str(warm.output_dir))
    build_trainer(resolve(same))  # the teacher it was made with: accepted
