"""make_pairs / PairDataset / `stepdistill make-pairs` on a tiny 8x8 teacher."""
import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill import pairs as P
from stepdistill.cli import main
from stepdistill.conditioning import Cond
from stepdistill.config import ModelConfig
from stepdistill.data import DataError, collate
from stepdistill.models import build_model, load_model, save_model
from stepdistill.data import PairDataset
from stepdistill.pairs import make_pairs, pair_timesteps
from stepdistill.solvers import sample
from tiny import TINY_SCHEDULER, TINY_UNET

FAST = dict(nfe=3, shard_size=4, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A randomly initialised tiny class-conditional v-prediction teacher (null class 10), saved as a folder."""
    torch.manual_seed(0)
    loaded = build_model(ModelConfig(source="", backbone="UNet2DModel", backbone_config=dict(TINY_UNET),
                                     scheduler="DDPMScheduler", scheduler_config=dict(TINY_SCHEDULER)))
    folder = tmp_path_factory.mktemp("teacher")
    save_model(loaded.denoiser, loaded.scheduler, folder, {"num_classes": 10, "resolution": 8, "channels": 1})
    return folder


def shards(folder):
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("pairs-*.safetensors"))}


def assert_same_pairs(a, b):
    sa, sb = shards(a), shards(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for key in sa[name]:
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)


@pytest.mark.parametrize("solver, guidance, labels", [("ddim", 1.0, "balanced"), ("heun", 2.0, "random"),
                                                      ("euler", 1.5, "balanced"), ("dpmpp_2m", 1.0, "random")])
def test_images_are_the_teachers_ode_solution_from_the_stored_noise(teacher, tmp_path, solver, guidance, labels):
    out = tmp_path / "pairs"
    make_pairs(str(teacher), out, 6, solver=solver, guidance_scale=guidance, labels=labels, **FAST)
    data = PairDataset(out)
    manifest = data.manifest
    assert len(data) == 6 and manifest["complete"] and manifest["n"] == 6
    assert [s["file"] for s in manifest["shards"]] == ["pairs-00000.safetensors", "pairs-00001.safetensors"]
    assert manifest["solver"] == solver and manifest["nfe"] == 3 and manifest["guidance_scale"] == guidance
    assert (manifest["resolution"], manifest["channels"], manifest["seed"]) == (8, 1, 0)
    assert manifest["teacher"]["source"] == str(teacher) and len(manifest["teacher_weights"]) == 64

    t = load_model(ModelConfig(source=str(teacher)))
    from diffusers import DDIMScheduler

    timesteps = [float(x) for x in (lambda s: (s.set_timesteps(3), s.timesteps)[1])(
        DDIMScheduler.from_config(t.scheduler.config))]
    assert manifest["timesteps"] == timesteps == pair_timesteps(t.scheduler, 3) == [999.0, 666.0, 332.0]
    # noise: sample i's own generator, seeded sample_seed(2**31 + seed, i); labels balanced or drawn after the noise
    for i in range(6):
        g = torch.Generator().manual_seed(2**31 + i)
        assert torch.equal(data.noise[i], torch.randn(1, 8, 8, generator=g))
        expected = i % 10 if labels == "balanced" else int(torch.randint(10, (), generator=g))
        assert int(data.labels[i]) == expected
    # images: sampling the teacher directly from the stored noise, shard by shard (the batches make_pairs ran)
    for start, stop in ((0, 4), (4, 6)):
        cond = Cond(class_labels=data.labels[start:stop])
        direct = sample(lambda x, tt: t.denoiser(x, tt, cond, guidance_scale=guidance), t.denoiser.schedule,
                        data.noise[start:stop], timesteps, solver)
        assert torch.equal(data.images[start:stop], direct)
    # evaluations: 1 per step for DDIM/Euler; Heun 2 per step but the last and the one from t=999 (zero SNR: Euler)
    assert manifest["network_evaluations"] == {"ddim": 3, "euler": 3, "heun": 4, "dpmpp_2m": 3}[solver]


def test_ddim_pairs_are_the_teacher_pipeline_on_noise_eval_never_draws(teacher, tmp_path):
    """The pair images are what the teacher's DDIM pipeline (eval/bench's sampler) makes from the pair noise; that
    noise comes from a stream of its own, so a student regressed on pairs is not evaluated on its training noise.
    On an even grid only: DDIMScheduler steps to ``t - 1000 // K``, which is the next listed timestep when K
    divides 1000 (K = 4, 25, 50; not K = 3: 666 -> 333, then it evaluates at 332)."""
    from stepdistill.metrics.samplers import load_eval_model, sample_generators

    make_pairs(str(teacher), tmp_path / "p", 6, **{**FAST, "nfe": 4})
    pairs = PairDataset(tmp_path / "p")
    eval_noise = torch.stack([torch.randn(pairs.noise.shape[1:], generator=g) for g in sample_generators(range(6), 0)])
    assert not torch.isclose(pairs.noise, eval_noise).any()
    model = load_eval_model(str(teacher))
    model.pipe.set_progress_bar_config(disable=True)
    images = model.pipe(class_labels=pairs.labels, latents=pairs.noise, num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close((pairs.images / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-5)


def test_pairs_do_not_depend_on_the_batch_size(teacher, tmp_path):
    make_pairs(str(teacher), tmp_path / "a", 7, **{**FAST, "batch_size": 1})
    make_pairs(str(teacher), tmp_path / "b", 7, **{**FAST, "batch_size": 3})
    a, b = PairDataset(tmp_path / "a"), PairDataset(tmp_path / "b")
    assert torch.equal(a.noise, b.noise) and torch.equal(a.labels, b.labels)
    # images agree to float32 rounding only: CPU kernels sum in an order that depends on the batch size (~1e-6)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "a" / P.MANIFEST).read_text())["shards"][0]["count"] == 4


def test_resume_after_a_crash_gives_the_uninterrupted_pairs(teacher, tmp_path, monkeypatch):
    make_pairs(str(teacher), tmp_path / "whole", 10, **FAST)
    out = tmp_path / "crashed"
    real_write = P._write_shard

    def crash_in_shard_2(path, tensors, metadata):
        if path.name == "pairs-00001.safetensors":  # die half-way through writing the second shard
            path.with_name(f"{path.name}.tmp-4242").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, tensors, metadata)

    monkeypatch.setattr(P, "_write_shard", crash_in_shard_2)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(str(teacher), out, 10, **FAST)
    manifest = json.loads((out / P.MANIFEST).read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["pairs-00000.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["pairs-00000.safetensors", "pairs-00001.safetensors.tmp-4242",
                                                     "pairs.json"]
    with pytest.raises(DataError, match="unfinished: 4 of 10 pairs"):
        PairDataset(out)
    assert len(PairDataset(out, allow_incomplete=True)) == 4  # the leftover temporary shard is not read

    monkeypatch.setattr(P, "_write_shard", real_write)
    made = []
    real_generate = P._generate
    monkeypatch.setattr(P, "_generate", lambda *a: made.append(len(a[5])) or real_generate(*a))
    first = (out / "pairs-00000.safetensors").stat().st_mtime_ns
    make_pairs(str(teacher), out, 10, **FAST)
    assert made == [4, 2]  # shards 2 and 3 only
    assert (out / "pairs-00000.safetensors").stat().st_mtime_ns == first
    assert not list(out.glob("*.tmp-*"))
    assert_same_pairs(out, tmp_path / "whole")
    assert PairDataset(out, verify=True).manifest["complete"]
    made.clear()
    make_pairs(str(teacher), out, 10, **FAST)  # complete: nothing to do
    assert made == []


def test_other_settings_in_the_same_folder_are_refused_and_n_can_grow(teacher, tmp_path):
    out = tmp_path / "pairs"
    make_pairs(str(teacher), out, 6, **FAST)
    for change, what in (({"nfe": 4}, "nfe: 3 there, 4 here"), ({"solver": "heun"}, "solver"),
                         ({"seed": 1}, "seed"), ({"guidance_scale": 2.0}, "guidance_scale"),
                         ({"shard_size": 3}, "shard_size"), ({"labels": "random"}, "labels")):
        with pytest.raises(DataError, match="holds pairs made with other settings") as info:
            make_pairs(str(teacher), out, 6, **{**FAST, **change})
        assert what in str(info.value) and "\n" not in str(info.value)
    first = (out / "pairs-00000.safetensors").stat().st_mtime_ns
    make_pairs(str(teacher), out, 10, **FAST)  # same settings, more pairs: the full first shard is kept
    assert (out / "pairs-00000.safetensors").stat().st_mtime_ns == first
    make_pairs(str(teacher), tmp_path / "ten", 10, **FAST)
    assert_same_pairs(out, tmp_path / "ten")


def test_pair_dataset_round_trip_and_errors(teacher, tmp_path):
    out = tmp_path / "pairs"
    make_pairs(str(teacher), out, 6, **FAST)
    data = PairDataset(out)
    raw = shards(out)
    assert torch.equal(data.noise, torch.cat([raw[n]["noise"] for n in sorted(raw)]))
    item = data[5]
    assert set(item) == {"noise", "image", "class_label"}
    assert item["noise"].shape == item["image"].shape == (1, 8, 8) and item["class_label"].dtype == torch.int64
    batch = collate([data[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 8, 8)
    assert torch.equal(Cond.from_batch(batch).class_labels, torch.tensor([0, 1, 2]))

    with pytest.raises(DataError, match="does not exist"):
        PairDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no pairs.json"):
        PairDataset(tmp_path / "empty")
    manifest = json.loads((out / P.MANIFEST).read_text())
    bad = dict(manifest, resolution=16)
    (out / P.MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(DataError, match="does not match its shards"):
        PairDataset(out)
    (out / P.MANIFEST).write_text(json.dumps(manifest))
    (out / "pairs-00001.safetensors").unlink()
    with pytest.raises(DataError, match="pairs-00001.safetensors is missing"):
        PairDataset(out)


def test_prompt_pairs_store_the_prompt_index_and_embeddings(tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from stepdistill.prompts import PromptEncoder
    from stepdistill.denoiser import Denoiser
    from stepdistill.models import LoadedModel
    from stepdistill.schedule import NoiseSchedule
    from tiny import clip_model, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler.from_config(TINY_SCHEDULER)
    encoder = PromptEncoder("sd", tokenizer=clip_tokenizer(), text_encoder=clip_model())
    teacher = LoadedModel(Denoiser(unet, NoiseSchedule.from_scheduler(scheduler), "v_prediction"), scheduler)
    prompts = ["a cat", "a dog", "cab"]
    make_pairs(teacher, tmp_path / "p", 5, prompts=prompts, prompt_encoder=encoder, guidance_scale=2.0, **FAST)
    data = PairDataset(tmp_path / "p")
    assert data.manifest["prompts"] == prompts and torch.equal(data.prompt_index, torch.tensor([0, 1, 2, 0, 1]))
    item = data[4]
    assert item["prompt"] == "a dog" and int(item["prompt_index"]) == 1
    emb = encoder.encode(prompts)
    assert torch.equal(item["encoder_hidden_states"], emb.encoder_hidden_states[1])
    cond = Cond.from_batch(collate([data[i] for i in range(4)]))
    null = encoder.null()
    den = Denoiser(unet, NoiseSchedule.from_scheduler(scheduler), "v_prediction", null_cond=null)
    direct = sample(lambda x, t: den(x, t, cond, guidance_scale=2.0), den.schedule, data.noise[:4],
                    data.timesteps, "ddim")
    assert torch.equal(direct, data.images[:4])


def test_cli_makes_pairs_and_reports_user_errors_in_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-pairs", "--teacher", str(teacher), "--out", str(out), "--n", "5", "--nfe", "2",
                 "--shard-size", "4", "--batch-size", "2", "--seed", "3", "--no-progress"]) == 0
    assert "5 pairs in" in capsys.readouterr().out
    manifest = json.loads((out / P.MANIFEST).read_text())
    assert (manifest["n"], manifest["nfe"], manifest["seed"], manifest["num_shards"]) == (5, 2, 3, 2)

    assert main(["make-pairs", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepdistill: error:") and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert main(["make-pairs", "--teacher", str(teacher), "--out", str(out), "--n", "5", "--nfe", "3",
                 "--shard-size", "4", "--seed", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds pairs made with other settings" in err and err.count("\n") == 1


def test_one_writer_per_pairs_folder_and_a_killed_writer_leaves_no_lock(teacher, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    from stepdistill.cli import main
    from stepdistill.locks import FolderInUse, hold_folder

    out = tmp_path / "pairs"
    with hold_folder(out, "a test"):
        with pytest.raises(FolderInUse, match=f"{out} is in use"):
            make_pairs(str(teacher), out, 4, nfe=2, shard_size=4, progress=False)
        assert main(["make-pairs", "--teacher", str(teacher), "--out", str(out), "--n", "4", "--nfe", "2"]) == 2
        assert "in use" in capsys.readouterr().err
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom stepdistill.locks import hold_folder\n"
                               f"with hold_folder({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUse, match="in use by"):
        make_pairs(str(teacher), out, 4, nfe=2, shard_size=4, progress=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    make_pairs(str(teacher), out, 4, nfe=2, shard_size=4, progress=False)  # the dead writer's lock died with it
    assert PairDataset(out).noise.shape[0] == 4
