"""The README's "Your own images" commands, run as written on a small generated image folder (with settings added
that make each a few steps): train-teacher on the folder, make-pairs from that teacher, a regression warm start, a
DMD2 run, export, and a benchmark against the same folder."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stepdistill.cli import main
from stepdistill.data import digits_tensors, to_uint8

README = Path(__file__).resolve().parents[1] / "README.md"
#: class folder -> the digit its images show; "10" sorts after "2" by value, so label 2 is the digit 0
FOLDERS = {"1": 1, "2": 2, "10": 0}
QUICK = {
    "train-teacher": ["train.max_steps=2", "train.batch_size=8", "train.sample_every=0", "train.checkpoint_every=0",
                      "train.progress=false", "train.mixed_precision=no"],
    "train": ["train.max_steps=2", "train.batch_size=8", "train.sample_every=0", "train.checkpoint_every=0",
              "train.progress=false"],
    "make-pairs": ["--n", "16", "--nfe", "2", "--batch-size", "16", "--shard-size", "16", "--no-progress"],
    "bench": ["--n", "20", "--teacher-nfe", "1,2", "--batch-size", "20", "--kid-subsets", "2", "--floor-splits", "2",
              "--no-progress"],
}


def readme_commands() -> list[str]:
    section = README.read_text().split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("stepdistill ")]


def write_images(root: Path) -> None:
    images, labels = digits_tensors(16)
    for folder, digit in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels.numpy() == digit)[:24]):
            Image.fromarray(to_uint8(images[i])[0].numpy(), "L").resize((20, 20)).save(root / folder / f"{k}.png")


def test_the_readme_own_images_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the commands run from the repository's root: its configs/, a runs/ of their own
    (tmp_path / "configs").symlink_to(README.parent / "configs")
    write_images(tmp_path / "images")
    commands = readme_commands()
    assert [shlex.split(c)[1] for c in commands] == ["train-teacher", "make-pairs", "train", "train", "export",
                                                     "bench"]
    for command in commands:
        argv = shlex.split(command.replace("path/to/images", str(tmp_path / "images")))[1:]
        assert main(argv + QUICK.get(argv[0], [])) == 0, command
        if argv[0] == "train-teacher":  # the run said which classes it found and which label each has
            assert "3 classes, label: folder = 0: 1, 1: 2, 2: 10" in capsys.readouterr().out
    teacher = json.loads((tmp_path / "runs/my_teacher/final/stepdistill.json").read_text())
    assert teacher["class_names"] == ["1", "2", "10"] and teacher["num_classes"] == 3
    student = tmp_path / "runs/my_student"
    assert json.loads((student / "stepdistill.json").read_text())["class_names"] == ["1", "2", "10"]
    assert "class_labels=i asks for 0: 1, 1: 2, 2: 10" in (student / "README.md").read_text()
    results = json.loads((tmp_path / "runs/my_bench/results.json").read_text())
    assert results["protocol"]["reference"]["name"].startswith("folder")
    assert {m["kind"] for m in results["models"]} == {"teacher", "student"}


def test_a_class_conditional_teacher_on_a_folder_without_classes_is_a_clear_error(tmp_path, capsys):
    write_images(tmp_path / "images")
    write_images(tmp_path / "nested")
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (tmp_path / "nested").rglob("*.png"):
        path.rename(flat / f"{path.parent.name}_{path.name}")
    code = main(["train-teacher", str(README.parent / "configs" / "teacher_digits.yaml"),
                 f"output_dir={tmp_path}/run", "data.dataset=folder", f"data.path={flat}", *QUICK["train-teacher"]])
    err = capsys.readouterr().err
    assert code == 2 and "no class labels" in err and "num_class_embeds=null" in err and "Traceback" not in err
    code = main(["train-teacher", str(README.parent / "configs" / "teacher_digits.yaml"),
                 f"output_dir={tmp_path}/run2", "data.dataset=folder", f"data.path={tmp_path / 'images'}",
                 "model.backbone_config.num_class_embeds=3", *QUICK["train-teacher"]])
    assert code == 2 and "num_class_embeds=4" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
