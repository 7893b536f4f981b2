"""Training a text-to-image teacher from a new UNet against a pipeline folder's VAE and text encoders (the recipe of
the shipped digits-t2i teacher, configs/teacher_digits_t2i.yaml), with caption dropout for CFG, exported as a stock
StableDiffusionPipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdistill.conditioning import Cond
from stepdistill.config import ConfigError, read_config
from stepdistill.trainers import build_trainer, resolve

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "teacher_digits_t2i.yaml"


def test_caption_dropout_makes_the_dropped_rows_the_empty_prompt_and_keeps_the_rest():
    torch.manual_seed(0)
    cond = Cond(encoder_hidden_states=torch.randn(5, 3, 4), pooled=torch.randn(5, 4), time_ids=torch.randn(5, 6))
    null = Cond(encoder_hidden_states=torch.randn(1, 3, 4), pooled=torch.randn(1, 4))
    drop = torch.tensor([True, False, True, False, False])
    out = cond.dropped(drop, null)
    for name in ("encoder_hidden_states", "pooled"):
        got, given, empty = getattr(out, name), getattr(cond, name), getattr(null, name)[0]
        assert torch.equal(got[~drop], given[~drop])
        assert all(torch.equal(row, empty) for row in got[drop])
    assert torch.equal(out.time_ids, cond.time_ids)  # it describes the sample, not the prompt
    labels = Cond(class_labels=torch.tensor([1, 2, 3])).dropped(torch.tensor([False, True, False]), null_class=10)
    assert labels.class_labels.tolist() == [1, 10, 3]


def _tiny_run(assets, tmp_path, **data):
    root, folders = assets
    raw = read_config(CONFIG, [f"model.source={folders['sd']}", f"output_dir={tmp_path / 'run'}",
                               "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.progress=false",
                               "train.checkpoint_every=2", "objective.sample_steps=2"])
    raw["model"]["backbone_config"].update(block_out_channels=[8, 16, 16], norm_num_groups=4,
                                           cross_attention_dim=32, attention_head_dim=2)
    raw["data"].update(data)
    return resolve(raw)


def test_a_text_teacher_trains_a_new_unet_with_caption_dropout_and_exports_a_stock_pipeline(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stepdistill.runs import export_run

    run = _tiny_run(assets, tmp_path, path=str(assets[0] / "prompts.jsonl"))
    trainer = build_trainer(run)
    objective = trainer.objective
    assert objective.model.null_cond is not None  # the encoded empty prompt, from the folder's own text encoder
    batch = next(iter(torch.utils.data.DataLoader(trainer.data, batch_size=4)))
    torch.manual_seed(0)
    objective.config.label_dropout = 0.999  # every caption dropped: the loss sees only the empty prompt
    seen = {}
    original = objective.model.forward

    def spy(x, t, cond, **kw):
        seen["cond"] = cond
        return original(x, t, cond, **kw)

    objective.model.forward = spy
    objective.loss("model", batch, 0)
    null = objective.model.null_cond.encoder_hidden_states[0]
    assert all(torch.equal(row, null) for row in seen["cond"].encoder_hidden_states)
    objective.model.forward = original
    objective.config.label_dropout = 0.1
    trainer.train()
    pipe = StableDiffusionPipeline.from_pretrained(export_run(run.output_dir, tmp_path / "pipeline"))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert list(pipe.unet.config.block_out_channels) == [8, 16, 16]  # the new UNet, not the folder's own
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a cat"], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_text_teacher_refuses_data_without_prompts(assets, tmp_path):
    run = _tiny_run(assets, tmp_path, dataset="digits", path=None, resolution=8)
    with pytest.raises(ConfigError, match="text encoders: train it on prompts"):
        build_trainer(run)
