import os
import subprocess
import sys

import pytest
import yaml

from stepdistill.cli import main
from stepdistill.config import ConfigError, ModelConfig
from stepdistill.trainers import load_config
from stepdistill.models import ModelLoadError, check_resolution, load_model
from tiny import tiny_teacher_raw


def write(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_teacher_cli_runs_and_writes_a_model(tmp_path):
    config = write(tmp_path, tiny_teacher_raw(tmp_path / "run"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "stepdistill", "train-teacher", str(config),
                             "train.max_steps=2", f"output_dir={tmp_path}/cli"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli" / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["train"]["max_steps"] == 2


@pytest.mark.parametrize("override, message", [
    (["train.batch_sise=3"], "unknown key 'train.batch_sise'"),
    (["data.dataset=folder", "data.path=/nonexistent/x"], "does not exist"),
    (["data.dataset=folder"], "needs data.path"),
    (["model.source=org/not-cached", "model.backbone=null"], "huggingface-cli download org/not-cached"),
    (["data.resolution=6", "model.backbone_config.block_out_channels=[16,32,32]",
      "model.backbone_config.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
      "model.backbone_config.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]"], "multiple of 4"),
    (["train.batch_size=4000"], "fewer than one global batch"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, override, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write(tmp_path, tiny_teacher_raw(tmp_path / "run"))
    assert main(["train-teacher", str(config), *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepdistill: error:") and message in err and "Traceback" not in err


def test_overrides_may_follow_options(monkeypatch, capsys):
    from stepdistill import runs as export

    seen = {}
    monkeypatch.setattr(export, "run_cli", lambda args: seen.update(vars(args)) or 0)
    assert main(["export", "runs/x", "a.b=1", "--out", "o", "objective.student_steps=4", "c=[1,2]"]) == 0
    assert seen["run_dir"] == "runs/x" and seen["out"] == "o"
    assert seen["overrides"] == ["a.b=1", "objective.student_steps=4", "c=[1,2]"]
    with pytest.raises(SystemExit) as exc:
        main(["export", "runs/x", "--out", "o", "--bogus", "a=1"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus a=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quickstart", "a=1"])  # a command without overrides
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_too_few_images_in_a_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    raw = tiny_teacher_raw(tmp_path / "run")
    raw["data"] = {"dataset": "folder", "path": str(folder), "resolution": 8, "channels": 1}
    raw["model"]["backbone_config"]["num_class_embeds"] = None
    raw["objective"]["label_dropout"] = 0.0
    assert main(["train-teacher", str(write(tmp_path, raw))]) == 2
    assert "has 3 items, fewer than one global batch (16" in capsys.readouterr().err


def test_model_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(source=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model(ModelConfig(source="someone/some-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no Diffusers denoiser"):
        load_model(ModelConfig(source=str(tmp_path / "empty")))


def test_xformers_attention_without_xformers_or_a_gpu_is_a_clear_error(tiny_teacher_config):
    from stepdistill.trainers import build_trainer

    run = tiny_teacher_config()
    run.model.attention = "xformers"
    # this suite runs on the CPU (conftest), so xformers is refused whether or not it is installed
    with pytest.raises(ModelLoadError, match="model.attention=xformers (needs xformers|runs on CUDA GPUs only)"):
        build_trainer(run)
    with pytest.raises(ConfigError, match="model.attention: 'flash' is not allowed"):
        load_config(None, ["model.attention=flash"])



def test_local_pipeline_folder_and_hub_cache_layout(tmp_path, monkeypatch):
    """A Diffusers pipeline folder (model_index.json, unet/, scheduler/) loads, from disk and from the Hub cache."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.models import save_model
    from stepdistill.denoiser import Denoiser
    from stepdistill.schedule import NoiseSchedule
    from tiny import TINY_SCHEDULER, TINY_UNET

    unet, sched = UNet2DModel(**TINY_UNET), DDPMScheduler(**TINY_SCHEDULER)
    d = Denoiser(unet, NoiseSchedule.from_scheduler(sched), "v_prediction")
    folder = save_model(d, sched, tmp_path / "pipe", {"num_classes": 10})
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    loaded = load_model(ModelConfig(source=str(folder)))
    assert loaded.denoiser.prediction_type == "v_prediction" and loaded.denoiser.null_class == 10
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(),
                                                  loaded.denoiser.backbone.state_dict().values()))
    # the same folder as a snapshot in a Hugging Face cache, read offline
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(folder, snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    loaded = load_model(ModelConfig(source="org/tiny"))
    assert loaded.folder == snap


def test_check_resolution():
    from diffusers import UNet2DModel

    from tiny import TINY_UNET

    check_resolution(UNet2DModel(**TINY_UNET), 8)
    with pytest.raises(ModelLoadError, match="multiple of 2"):
        check_resolution(UNet2DModel(**TINY_UNET), 7)
