"""MSD on a text teacher: keyword partitions of the prompts, per-prompt routing in training, and the exported
pipeline routing each prompt to its student by the same rule (tiny SD-style teacher built offline)."""
import json
from pathlib import Path

import pytest
import torch

from stepdistill.config import ConfigError

from stepdistill.trainers import load_config
from stepdistill.pipelines.routing import prompt_owner, prompt_owners
from stepdistill.trainers import build_trainer
from text_teachers import CONFIGS, LATENT, PROMPTS, sd_folder  # PROMPTS: a cat, zebra, a big dog, the sun

KEYWORDS = [["cat", "big dog"], ["zebra", "sun"]]


def test_prompt_owner_matches_whole_keywords():
    assert prompt_owner("A Cat on a mat", KEYWORDS) == 0
    assert prompt_owner("the SUN, rising", KEYWORDS) == 1
    assert prompt_owner("a big  dog!", KEYWORDS) == 0  # multi-word keywords, punctuation and spacing ignored
    assert prompt_owner("a dog", KEYWORDS, default=1) == 1  # "big dog" is one keyword
    assert prompt_owner("concatenate", KEYWORDS, default=1) == 1  # whole words only
    with pytest.raises(ValueError, match="matches no student's keywords"):
        prompt_owner("a tree", KEYWORDS)
    with pytest.raises(ValueError, match=r"matches the keywords of students \[0, 1\]"):
        prompt_owner("a cat and a zebra", KEYWORDS)
    assert prompt_owners(PROMPTS, KEYWORDS).tolist() == [0, 1, 0, 1]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd_text")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = sd_folder(root / "sd")
    finally:
        torch.set_num_threads(threads)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, folder


def text_run(sd, out, *extra):
    root, folder = sd
    overrides = ["method=msd", f"model.source={folder}", f"data.path={root / 'prompts.txt'}",
                 f"data.resolution={LATENT}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=4",
                 "train.mixed_precision='no'", "train.log_every=1", "train.progress=false", "train.threads=1",
                 "optim.generator.every=1", "objective.num_students=2", *extra]
    return load_config(CONFIGS / "dmd2_sd15.yaml", overrides)


def test_text_students_train_on_their_own_prompts(sd, tmp_path):
    run = text_run(sd, tmp_path / "a", f"objective.prompt_partition={json.dumps(KEYWORDS)}")
    trainer = build_trainer(run)
    o = trainer.objective
    batch = trainer._next_batch()
    cond = o._cond(batch, 4, torch.device("cpu"))
    assert cond.extra["student"].tolist() == prompt_owners(list(batch["prompt"]), KEYWORDS).tolist()
    seen = {0: [], 1: []}
    for k, student in enumerate(o.students):
        student.backbone.register_forward_pre_hook(lambda m, args, k=k: seen[k].append(args[0].shape[0]))
    x = torch.randn(4, 4, LATENT, LATENT)
    with torch.no_grad():
        routed = o.generator(x, torch.full((4,), 999.0), cond)
        for k, student in enumerate(o.students):  # each sample is its own student's prediction
            mine = cond.extra["student"] == k
            torch.testing.assert_close(routed[mine], student(x[mine], torch.full((int(mine.sum()),), 999.0),
                                                              cond[mine]))
    before = [{n: p.detach().clone() for n, p in s.named_parameters()} for s in o.students]
    trainer.train(resume=None)
    for s, b in zip(o.students, before):
        assert any(not torch.equal(p, b[n]) for n, p in s.named_parameters())


def test_prompts_without_a_student_are_refused_before_training(sd, tmp_path):
    with pytest.raises(ConfigError, match=r"prompt_partition: prompt 'the sun' matches no student's keywords"):
        build_trainer(text_run(sd, tmp_path / "b", 'objective.prompt_partition=[["cat", "big dog"], ["zebra"]]'))
    build_trainer(text_run(sd, tmp_path / "c", 'objective.prompt_partition=[["cat", "big dog"], ["zebra"]]',
                           "objective.default_student=1"))
    with pytest.raises(ConfigError, match="routes prompts by keywords: set objective.prompt_partition"):
        build_trainer(text_run(sd, tmp_path / "d"))
    with pytest.raises(ConfigError, match="default_student must name a student 0..1"):
        text_run(sd, tmp_path / "e", f"objective.prompt_partition={json.dumps(KEYWORDS)}", "objective.default_student=2")


def test_export_routes_each_prompt_to_its_student(sd, tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines import MultiStudentTextPipeline

    from stepdistill.runs import export_run
    from stepdistill.models import prompt_encoder_for

    run = text_run(sd, tmp_path / "run", f"objective.prompt_partition={json.dumps(KEYWORDS)}")
    trainer = build_trainer(run)
    trainer.train(resume=None)
    folder = export_run(trainer.output_dir, tmp_path / "export", ema=False)
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["pipeline"] == "MultiStudentTextPipeline" and info["trust_remote_code"]
    assert [s["keywords"] for s in info["students"]] == KEYWORDS
    assert f"| base model | {Path(run.model.source).name} |" in (folder / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(pipe, MultiStudentTextPipeline) and len(pipe.unet.students) == 2
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(4, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt=PROMPTS, latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    o = trainer.objective
    cond = prompt_encoder_for(run.model, run.data.resolution).encode(PROMPTS)
    cond.extra["student"] = prompt_owners(PROMPTS, KEYWORDS)
    with torch.no_grad():
        direct = o._generate(noise, cond, grad=False)
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="matches no student's keywords"):
        pipe(prompt=["a tree"], latents=noise[:1], output_type="latent", **info["call"]["kwargs"])
