import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError, OptimConfig, RunConfig, TrainConfig, decay_updates

from stepdistill.trainers import resolve
from stepdistill.data import TensorImages
from stepdistill.trainers import Callback, build_trainer, DistillTrainer, NonFiniteLoss, Objective, Phase
from stepdistill.trainers.teacher import DenoisingObjective
from stepdistill.trainers.checkpoint import CheckpointError, step_dirs


def teacher_trainer(run, callbacks=()):
    return build_trainer(run, callbacks)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class SignalAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_teacher_trains_saves_and_logs(tiny_teacher_config):
    run = tiny_teacher_config(max_steps=6, ema_decay=0.9, sample_every=3, num_samples=4)
    trainer = teacher_trainer(run)
    trainer.train()
    out = trainer.output_dir
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert all("model/loss" in l and "images_per_s" in l and "lr/model" in l for l in lines)
    assert (out / "samples" / "step_0000003.png").is_file() and (out / "config.yaml").is_file()
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_0000006"]
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model

    loaded = load_model(ModelConfig(source=str(out / "final")))
    assert loaded.meta["num_classes"] == 10 and loaded.denoiser.null_class == 10
    assert loaded.denoiser.prediction_type == "v_prediction"
    # the final model is the EMA, not the raw weights
    with trainer.ema_weights():
        ema = weights(trainer.objective.model.backbone)
    final = loaded.denoiser.backbone.state_dict()
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["wall_seconds"] > 0 and summary["peak_cpu_rss_mb"] > 50
    assert summary["trainable_parameters"] == {"model": sum(p.numel() for p in trainer.objective.model.parameters())}


def test_teacher_loss_falls(tiny_teacher_config):
    run = tiny_teacher_config(max_steps=40, batch_size=32, log_every=1)
    trainer = teacher_trainer(run)
    trainer.train()
    losses = [json.loads(l)["model/loss"] for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


@pytest.mark.parametrize("optimizer", ["adamw", "radam"])
def test_resume_equals_uninterrupted(tiny_teacher_config, tmp_path, optimizer):
    straight = tiny_teacher_config(max_steps=6, ema_decay=0.9)
    straight.output_dir = str(tmp_path / "straight")
    straight.optim["model"].optimizer = optimizer
    a = teacher_trainer(straight)
    assert type(a.optimizers["model"].optimizer) is {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optimizer]
    a.train()

    run = tiny_teacher_config(max_steps=6, ema_decay=0.9, checkpoint_every=2)
    run.output_dir = str(tmp_path / "interrupted")
    run.optim["model"].optimizer = optimizer
    b = teacher_trainer(run, [SignalAt(3)])
    b.train()  # SIGTERM after step 3: saves a checkpoint and returns
    assert b.step == 3 and (b.checkpoint_root / "step_0000003").is_dir()
    c = teacher_trainer(run)
    c.train(resume="latest")
    assert c.step == 6
    wa, wc = weights(a.objective.model), weights(c.objective.model)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    ea, ec = a.ema.state_dict()["shadow_params"], c.ema.state_dict()["shadow_params"]
    assert all(torch.equal(x, y) for x, y in zip(ea, ec))


def test_checkpoints_are_atomic_and_pruned(tiny_teacher_config):
    run = tiny_teacher_config(max_steps=6, checkpoint_every=1, keep_checkpoints=2)
    trainer = teacher_trainer(run)
    trainer.train()
    root = trainer.checkpoint_root
    assert [p.name for p in step_dirs(root)] == ["step_0000005", "step_0000006"]
    files = sorted(p.name for p in (root / "step_0000006").iterdir())
    assert "model.safetensors" in files and "trainer.json" in files and "rng_rank0.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    # a half-written checkpoint (crash during save) is never resumed from
    (root / ".tmp-step_0000007").mkdir()
    again = teacher_trainer(run)
    assert again.load_checkpoint("latest") and again.step == 6


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tiny_teacher_config, tmp_path):
    run = tiny_teacher_config(max_steps=2)
    trainer = teacher_trainer(run)
    trainer.train()
    good = trainer.checkpoint_root / "step_0000002"

    other = tiny_teacher_config(max_steps=2)
    other.model.backbone_config["num_class_embeds"] = 12
    with pytest.raises(CheckpointError, match="class_embedding.weight has shape"):
        teacher_trainer(other).load_checkpoint(str(good))
    lora = teacher_trainer(run)
    lora.trainable["model"] = lora.trainable["model"][:-1]
    with pytest.raises(CheckpointError, match="does not match the module built from the config"):
        lora.load_checkpoint(str(good))

    (good / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt.*delete"):
        teacher_trainer(run).load_checkpoint()
    (good / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="trainer.json"):
        teacher_trainer(run).load_checkpoint()


# ---------------------------------------------------------------------------- a two-phase toy method
class Toy(Objective):
    """A generator and a critic whose losses both read both modules (as a GAN's do)."""

    name = "toy"
    ema_module = "gen"

    def __init__(self, nan_at=None):
        super().__init__(None)
        torch.manual_seed(0)
        self.gen = torch.nn.Linear(4, 4)
        self.critic = torch.nn.Linear(4, 1)
        self.nan_at = nan_at

    @classmethod
    def phases(cls, config):
        return [Phase("gen", ("gen",)), Phase("critic", ("critic",))]

    def loss(self, phase, batch, step):
        x = batch["image"].flatten(1)[:, :4]
        fake = self.gen(x)
        score = self.critic(fake).mean()
        loss = -score if phase == "gen" else score + (fake.detach() ** 2).mean() * 0 + self.critic.weight.pow(2).sum()
        if self.nan_at is not None and step == self.nan_at and phase == "critic":
            return loss * float("nan"), {"adv": loss * float("nan"), "ok": loss.detach()}
        return loss, {"adv": loss.detach()}

    def sample(self, batch, generator=None):
        return torch.zeros(batch["batch_size"], 1, 2, 2)


def toy_run(tmp_path, gen_every=2, **train):
    return RunConfig(method="toy", output_dir=str(tmp_path / "toy"),
                     train=TrainConfig(**{"max_steps": 4, "batch_size": 4, "progress": False, "log_every": 1,
                                          "checkpoint_every": 0, **train}),
                     optim={"gen": OptimConfig(lr=0.1, every=gen_every, lr_schedule="constant"),
                            "critic": OptimConfig(lr=0.1, lr_schedule="constant")})


def toy_data():
    return TensorImages(torch.randn(64, 1, 2, 2))


class Record(Callback):
    def __init__(self):
        self.history = []

    def on_step_end(self, trainer, step):
        self.history.append((step, weights(trainer.objective.gen), weights(trainer.objective.critic)))


def test_ttur_and_phase_isolation(tmp_path):
    rec = Record()
    trainer = DistillTrainer(Toy(), toy_data(), toy_run(tmp_path, gen_every=2), [rec])
    gen0, critic0 = weights(trainer.objective.gen), weights(trainer.objective.critic)
    trainer.train(resume=None)
    prev_gen, prev_critic = gen0, critic0
    for step, gen, critic in rec.history:
        ran_gen = (step - 1) % 2 == 0
        assert any(not torch.equal(gen[k], prev_gen[k]) for k in gen) == ran_gen, step
        assert any(not torch.equal(critic[k], prev_critic[k]) for k in critic)
        prev_gen, prev_critic = gen, critic


def test_gradients_reach_only_the_current_phase(tmp_path):
    trainer = DistillTrainer(Toy(), toy_data(), toy_run(tmp_path), [])
    batch = {"image": torch.randn(4, 1, 2, 2), "batch_size": 4}
    for phase, other in (("gen", "critic"), ("critic", "gen")):
        trainer._enter_phase(phase)
        loss, _ = trainer.objective.loss(phase, batch, 0)
        loss.backward()
        assert all(p.grad is not None for p in getattr(trainer.objective, phase).parameters())
        assert all(p.grad is None for p in getattr(trainer.objective, other).parameters())
        trainer.objective.zero_grad(set_to_none=True)
    trainer._restore_modules()


def test_nan_stops_with_step_phase_and_term_and_keeps_last_good_checkpoint(tmp_path):
    trainer = DistillTrainer(Toy(nan_at=2), toy_data(), toy_run(tmp_path, gen_every=1, checkpoint_every=1), [])
    with pytest.raises(NonFiniteLoss) as err:
        trainer.train(resume=None)
    assert "step 2" in str(err.value) and "'critic'" in str(err.value) and "adv" in str(err.value)
    assert "ok" not in str(err.value).split("term(s)")[1].split(";")[0]
    assert [p.name for p in step_dirs(trainer.checkpoint_root)] == ["step_0000001", "step_0000002"][:1] or \
        [p.name for p in step_dirs(trainer.checkpoint_root)][-1] == "step_0000002"


def test_gradient_accumulation_consumes_micro_batches(tmp_path):
    trainer = DistillTrainer(Toy(), toy_data(), toy_run(tmp_path, gen_every=1, grad_accum=3, max_steps=2), [])
    trainer.train(resume=None)
    # 2 steps x 2 phases x 3 micro-batches = 12 batches of 4 from 64 items (16 per epoch)
    assert trainer.batches.state_dict() == {"epoch": 0, "position": 12}


def test_bf16_autocast_runs_on_cpu(tiny_teacher_config):
    run = tiny_teacher_config(max_steps=2, mixed_precision="bf16")
    trainer = teacher_trainer(run)
    trainer.train()
    losses = [json.loads(l)["model/loss"] for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(l == l and l < 10 for l in losses)


def test_lora_module_checkpoints_only_adapters(tiny_teacher_config):
    run = tiny_teacher_config(max_steps=2)
    from stepdistill.data import build_dataset

    data = build_dataset(run.data)
    objective = DenoisingObjective.from_config(run, data)
    objective.model.with_lora(rank=2)
    trainer = DistillTrainer(objective, data, run)
    trainer.train()
    saved = load_file(str(trainer.checkpoint_root / "step_0000002" / "model.safetensors"))
    assert saved and all("lora" in k for k in saved)


def test_periodic_eval_and_tensorboard_tracker(tiny_teacher_config):
    from stepdistill.trainers import PeriodicEval

    run = tiny_teacher_config(max_steps=4, trackers=["tensorboard"])
    calls = []

    def evaluate(trainer, step):
        calls.append(step)
        return {"score": float(step)}

    trainer = teacher_trainer(run, [PeriodicEval(2, evaluate)])
    trainer.train()
    assert calls == [2, 4]
    lines = [json.loads(l) for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["eval/score"] for l in lines if "eval/score" in l] == [2.0, 4.0]
    assert list(trainer.output_dir.rglob("events.out.tfevents.*"))


def test_gradient_checkpointing_trains_the_same_weights(tiny_teacher_config, tmp_path):
    runs = {}
    for on in (False, True):
        run = tiny_teacher_config(max_steps=2, gradient_checkpointing=on)
        run.output_dir = str(tmp_path / f"checkpointing_{on}")
        trainer = teacher_trainer(run)
        assert trainer.objective.model.backbone.is_gradient_checkpointing is on
        trainer.train(resume=None)
        runs[on] = weights(trainer.objective.model)
    assert all(torch.allclose(runs[True][k], runs[False][k], rtol=0, atol=1e-6) for k in runs[False])


def test_gradient_checkpointing_needs_a_backbone_that_supports_it(tmp_path):
    with pytest.raises(ConfigError, match="gradient_checkpointing: none of the trained modules"):
        DistillTrainer(Toy(), toy_data(), toy_run(tmp_path, gradient_checkpointing=True), [])


def test_warmup_stable_decay_holds_the_lr_then_falls_to_zero_and_follows_a_longer_resumed_run(tmp_path):
    from stepdistill.trainers.engine import warmup_stable_decay
    from tiny import tiny_teacher_raw

    factor = warmup_stable_decay(2, 4, 10)
    assert [factor(u) for u in range(10)] == [0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    # a fraction of the run: the last quarter of 8000 updates is 2000 of them, of 4 updates one
    assert decay_updates(OptimConfig(decay_steps=0.25), 8000) == 2000
    assert decay_updates(OptimConfig(decay_steps=2000), 8000) == 2000
    assert decay_updates(OptimConfig(decay_steps=0.25), 4) == 1 == decay_updates(OptimConfig(decay_steps=0.01), 4)

    def trainer(max_steps):
        raw = tiny_teacher_raw(tmp_path / "run", max_steps=max_steps, checkpoint_every=max_steps)
        raw["optim"]["model"].update(lr_schedule="warmup_stable_decay", decay_steps=4)
        return build_trainer(resolve(raw))

    def logged_lrs(trainer):
        return [json.loads(l)["lr/model"] for l in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]

    first = trainer(6)
    first.train()
    # metrics log the lr after each update's scheduler step: the lr of the next update
    assert logged_lrs(first) == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    # resumed with more steps, the lr goes back to its held value at once and the decay moves to the new end
    longer = trainer(10)
    longer.load_checkpoint("latest")
    assert longer.optimizers["model"].param_groups[0]["lr"] == pytest.approx(1e-3)
    longer.train()
    assert logged_lrs(longer)[6:] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])


@pytest.mark.parametrize("optim, message", [
    ({"lr_schedule": "warmup_stable_decay"}, "needs decay_steps > 0"),
    ({"lr_schedule": "warmup_stable_decay", "decay_steps": 3, "warmup_steps": 2}, "exceed the run's 4 updates"),
    ({"lr_schedule": "warmup_stable_decay", "decay_steps": 2.5}, "neither a whole number of updates nor a fraction"),
])
def test_warmup_stable_decay_settings_are_checked(tmp_path, optim, message):
    from tiny import tiny_teacher_raw

    raw = tiny_teacher_raw(tmp_path / "run")
    raw["optim"]["model"].update(optim)
    with pytest.raises(ConfigError, match=message):
        resolve(raw)
