"""Two processes on CPU (gloo): the same code under torchrun and `accelerate launch --multi_gpu`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny import tiny_teacher_raw

SCRIPT = textwrap.dedent('''
    import sys, torch
    from safetensors.torch import save_file
    from stepdistill.trainers import load_config
    from stepdistill.trainers import build_trainer

    run = load_config(sys.argv[1], sys.argv[3:])
    trainer = build_trainer(run)
    trainer.train()
    rank = trainer.accelerator.process_index
    state = {k: v.contiguous() for k, v in trainer.objective.model.state_dict().items()}
    save_file(state, f"{sys.argv[2]}/rank{rank}.safetensors")
''')


def env():
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, HF_HUB_OFFLINE="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return {**e, "CUDA_VISIBLE_DEVICES": ""}


def write_config(tmp_path, **train):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_teacher_raw(tmp_path / "run", **train)))
    return path


@pytest.mark.slow
def test_torchrun_two_processes_hold_identical_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    config = write_config(tmp_path, max_steps=3, checkpoint_every=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(script), str(config), str(tmp_path)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000003" / "trainer.json").read_text())
    assert meta["world"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step_0000003" / "rng_rank1.json").is_file()
    # each rank saw different data: 3 steps x 16 per rank; resume needs the same world size
    from stepdistill.trainers import load_config
    from stepdistill.trainers import build_trainer
    from stepdistill.trainers.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="written by 2 processes"):
        build_trainer(load_config(config)).load_checkpoint()


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_flag_runs_two_cpu_processes(tmp_path):
    config = write_config(tmp_path, max_steps=2, checkpoint_every=0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29532", "-m", "stepdistill", "train-teacher", str(config)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer.json").read_text())
    assert meta["world"] == 2
