"""InstaFlow (stepdistill/trainers/instaflow.py): text-conditioned reflow of a VP text-to-image teacher on its
(noise, latent, prompt) triples, then one-step distillation of the 2-RF on its own triples.

The digits-T2I recipes (configs/instaflow_digits_t2i.yaml, instaflow_digits_t2i_1step.yaml) run on the embedded
teacher and the SD 1.5 recipe (configs/instaflow_sd15.yaml) on a tiny model of its architecture: each trains two
steps and exports as a stock StableDiffusionPipeline with stepdistill's FlowMatchEulerUniformScheduler (the stock
flow schedulers lack init_noise_sigma and scale_model_input, which that pipeline calls), whose samples are the
student's own.
"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from flow_digits import logged, recipe, train
from stepdistill.conditioning import Cond
from stepdistill.config import ConfigError
from stepdistill.data import PairDataset
from stepdistill.metrics.samplers import load_eval_model
from stepdistill.metrics.straightness import model_straightness
from stepdistill.pairs import make_pairs
from stepdistill.pipelines import sample_student
from stepdistill.runs import export_run
from stepdistill.trainers import InstaFlowTrainer
from text_teachers import LATENT, PROMPTS

T2I_PROMPTS = ["a bold 3", "a thin 7", "a small 1", "a big 8"]


def pipeline_matches(trainer, folder, prompts, latent: int, channels: int = 4):
    """The exported pipeline (stock StableDiffusionPipeline, our scheduler through its shim) samples the student's
    own latents for these prompts."""
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert info["pipeline"] == "StableDiffusionPipeline" and info["scheduler"] == "FlowMatchEulerUniformScheduler"
    assert info["trust_remote_code"] and (folder / "scheduler" / "scheduler.py").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    o = trainer.objective
    noise = torch.randn(len(prompts), channels, latent, latent, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt=prompts, latents=noise, output_type="latent", **info["call"]["kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == o.timesteps
    cond = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    with trainer.ema_weights():
        ref = sample_student(o.student, o.export_scheduler, noise, o.config.student_steps,
                             Cond(encoder_hidden_states=cond), pipeline="StableDiffusionPipeline")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_digits_t2i_recipes_reflow_then_distill(tmp_path):
    pairs = tmp_path / "pairs"
    make_pairs("digits-t2i", pairs, 4, nfe=2, guidance_scale=3.0, prompts=T2I_PROMPTS, batch_size=4, shard_size=4,
               progress=False)
    run = recipe("instaflow_digits_t2i", tmp_path / "2rf", "digits-t2i", pairs, "train.batch_size=2")
    assert (run.objective.stage, run.objective.t_dist, run.objective.student_steps) == ("reflow", "uniform", 4)
    trainer = train(run)
    o = trainer.objective
    assert o.student.prediction_type == "flow" and o.student.schedule.kind == "flow"  # the VP teacher made a flow
    assert o.timesteps == [1000.0, 750.0, 500.0, 250.0] and logged(trainer)[-1]["student/reflow"] > 0
    folder = export_run(trainer.output_dir, tmp_path / "export_2rf")
    pipeline_matches(trainer, folder, T2I_PROMPTS[:2], 8)
    model = load_eval_model(str(folder), prompts=T2I_PROMPTS)  # our shims only: no trust_remote_code needed here
    assert model_straightness(model, 1, seed=0, n=2) is None  # one step is straight by construction
    assert model_straightness(model, 2, seed=0, n=2) > 0
    # stage 2: the 2-RF's own triples (its run folder as the teacher; prompts through digits-t2i's text encoder)
    pairs2 = tmp_path / "pairs2"
    make_pairs(str(trainer.output_dir), pairs2, 4, nfe=2, prompts=T2I_PROMPTS, batch_size=4, shard_size=4,
               progress=False)
    assert PairDataset(pairs2).manifest["prediction_type"] == "flow"
    make_pairs(str(folder), tmp_path / "from_export", 4, nfe=2, prompts=T2I_PROMPTS, batch_size=4, shard_size=4,
               progress=False)  # the export (our scheduler's folder) is a source too: the same triples
    assert torch.equal(PairDataset(tmp_path / "from_export").images, PairDataset(pairs2).images)
    run = recipe("instaflow_digits_t2i_1step", tmp_path / "1step", trainer.output_dir, pairs2, "train.batch_size=2")
    distilled = InstaFlowTrainer(run).trainer
    distilled.train(resume=None)
    assert distilled.objective.timesteps == [1000.0] and distilled.objective.config.t_dist == "grid"
    pipeline_matches(distilled, export_run(distilled.output_dir, tmp_path / "export_1step"), T2I_PROMPTS[2:], 8)
    with pytest.raises(ConfigError, match="instaflow stage distill distils the 2-RF"):
        InstaFlowTrainer(recipe("instaflow_digits_t2i_1step", tmp_path / "bad", "digits-t2i", pairs))


def test_sd15_recipe_on_a_tiny_model_of_its_architecture(assets, tmp_path):
    root, folders = assets
    pairs = tmp_path / "pairs"
    make_pairs(str(folders["sd"]), pairs, 4, nfe=2, guidance_scale=5.0, prompts=PROMPTS, batch_size=4,
               shard_size=4, progress=False)
    run = recipe("instaflow_sd15", tmp_path / "run", folders["sd"], pairs, f"data.resolution={LATENT}",
                 "train.batch_size=2", "train.gradient_checkpointing=false")
    assert run.optim["student"].lr == 1e-5 and run.train.batch_size == 2 and run.objective.student_steps == 4
    trainer = train(run)
    pipeline_matches(trainer, export_run(trainer.output_dir, tmp_path / "export"), PROMPTS[:2], LATENT)
