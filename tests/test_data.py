"""Data: digits, image folders, resumable batches, cached VAE latents."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data import (DataError, ImageFolder, ResumableBatches, TensorImages, cache_latents, collate,
                              digits_dataset, digits_tensors, latent_dataset)


# ---- digits -----------------------------------------------------------------------------------------------------
def _rows(images, labels):
    return Counter((img.numpy().tobytes(), int(y)) for img, y in zip(images, labels))


def test_digits_shapes_range_labels():
    images, labels = digits_tensors()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() > 0.9  # the full range is used
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    ds = digits_dataset()
    assert len(ds) == 1797 and ds.num_classes == 10
    assert ds[0]["image"].shape == (1, 16, 16) and ds[0]["class_label"].ndim == 0
    assert digits_tensors(resolution=8)[0].shape == (1797, 1, 8, 8)


def test_digits_split_is_a_stratified_partition():
    images, labels = digits_tensors()
    train, test = digits_tensors(split="train"), digits_tensors(split="test")
    assert len(train[0]) + len(test[0]) == len(images)
    # Every (image, label) is used exactly once: the two splits partition the data set.
    assert _rows(*train) + _rows(*test) == _rows(images, labels)
    for c in range(10):
        n = int((labels == c).sum())
        assert int((test[1] == c).sum()) == round(n * 0.2)
    assert torch.equal(digits_tensors(split="test")[0], test[0])  # fixed split
    with pytest.raises(DataError, match="split"):
        digits_tensors(split="val")


# ---- ResumableBatches -------------------------------------------------------------------------------------------
def _indexed(n=40):
    """A data set whose image is its own index, so batches can be read back as index lists."""
    return TensorImages(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 3)


def _ids(batch):
    return batch["image"][:, 0].long().tolist()


def _take(batches, n):
    it = iter(batches)
    return [_ids(next(it)) for _ in range(n)]


def test_batches_deterministic_and_seeded():
    a = _take(ResumableBatches(_indexed(), batch_size=4, seed=1), 12)
    assert a == _take(ResumableBatches(_indexed(), batch_size=4, seed=1), 12)
    assert a != _take(ResumableBatches(_indexed(), batch_size=4, seed=2), 12)
    assert sorted(sum(a[:10], [])) == list(range(40))  # one epoch = 10 batches covers the data once
    assert sum(a[10:], []) != sum(a[:2], [])  # the next epoch has a new order


def test_batches_rank_sharding_is_disjoint():
    per_epoch = 40 // (4 * 2)
    shards = [sum(_take(ResumableBatches(_indexed(), batch_size=4, rank=r, world=2), per_epoch), [])
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 40


def test_batches_resume_exactly():
    ref = ResumableBatches(_indexed(), batch_size=4, seed=3)
    it = iter(ref)
    for _ in range(13):  # past an epoch boundary
        next(it)
    state = ref.state_dict()
    expected = [_ids(next(it)) for _ in range(3)]
    resumed = ResumableBatches(_indexed(), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert _take(resumed, 3) == expected


def test_batches_need_one_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatches(_indexed(7), batch_size=4, world=2)


def test_collate():
    batch = collate([{"image": torch.zeros(2), "n": 1, "prompt": "a"}, {"image": torch.ones(2), "n": 2,
                                                                        "prompt": "b"}])
    assert batch["image"].shape == (2, 2) and batch["n"].tolist() == [1, 2] and batch["prompt"] == ["a", "b"]


# ---- ImageFolder ------------------------------------------------------------------------------------------------
def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _striped(h, w):
    """Red left eighth, blue right eighth, white middle: a square center crop sees white only."""
    array = np.full((h, w, 3), 255, dtype=np.uint8)
    array[:, : w // 8] = (255, 0, 0)
    array[:, w - w // 8:] = (0, 0, 255)
    return array


def test_image_folder_with_classes(tmp_path):
    _save(tmp_path / "cats" / "a.png", _striped(20, 40), "RGB")
    _save(tmp_path / "cats" / "deep" / "b.jpg", np.full((30, 30, 3), 128, np.uint8), "RGB")
    _save(tmp_path / "dogs" / "c.png", np.zeros((12, 9), np.uint8), "L")
    ds = ImageFolder(tmp_path, resolution=8)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert len(ds) == 3 and ds.images.shape == (3, 3, 8, 8)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.labels.tolist() == [0, 0, 1]  # sorted paths: cats/a, cats/deep/b, dogs/c
    # Shorter side resized to 8 (20x40 -> 8x16), then the center 8x8 crop: the white middle only.
    assert torch.allclose(ds[0]["image"], torch.ones(3, 8, 8), atol=0.02)
    assert torch.allclose(ds[1]["image"], torch.full((3, 8, 8), 128 / 255 * 2 - 1), atol=0.03)  # JPEG
    assert torch.equal(ds[2]["image"], -torch.ones(3, 8, 8))  # grayscale -> 3 equal channels
    assert ds[2]["class_label"] == 1


def test_class_folders_named_by_numbers_are_labelled_by_value(tmp_path):
    for name in ("10", "2", "1", "b", "a"):
        _save(tmp_path / name / "x.png", np.zeros((8, 8), np.uint8), "L")
    ds = ImageFolder(tmp_path, resolution=8, channels=1)
    assert ds.classes == ["1", "2", "10", "a", "b"]  # not "1", "10", "2" as text sorts them
    assert {ds.classes[int(label)] for label in ds.labels} == set(ds.classes)
    assert ds.classes[int(ds[ds.paths.index(tmp_path / "10" / "x.png")]["class_label"])] == "10"


def test_image_folder_without_classes_and_grayscale(tmp_path):
    _save(tmp_path / "a.png", _striped(16, 16), "RGB")
    _save(tmp_path / "b.png", np.full((5, 7), 255, np.uint8), "L")
    ds = ImageFolder(tmp_path, resolution=4, channels=1)
    assert ds.labels is None and ds.num_classes is None and ds.classes == []
    assert ds.images.shape == (2, 1, 4, 4)
    assert "class_label" not in ds[0]
    assert torch.allclose(ds[1]["image"], torch.ones(1, 4, 4))  # upsampled white stays white


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", resolution=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="has no images"):
        ImageFolder(tmp_path / "empty", resolution=8)
    bad = tmp_path / "bad"
    _save(bad / "ok.png", np.zeros((8, 8), np.uint8), "L")
    (bad / "x.png").write_text("this is not a PNG")
    with pytest.raises(DataError, match=r"x\.png"):
        ImageFolder(bad, resolution=8)
    with pytest.raises(DataError, match="channels"):
        ImageFolder(tmp_path / "bad", resolution=8, channels=2)


# ---- cached latents ---------------------------------------------------------------------------------------------
def _tiny_vae(seed=0, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
               norm_num_groups=8, sample_size=16,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    cfg.update(config)
    return AutoencoderKL(**cfg).eval()


def _count_encoder_calls(vae):
    calls = []
    vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _images(n=5, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_cache_latents_shape_scaling_and_reuse(tmp_path):
    vae, images = _tiny_vae(), _images()
    calls = _count_encoder_calls(vae)
    latents = cache_latents(images, vae, batch_size=2, cache_path=tmp_path)
    assert latents.shape == (5, 4, 8, 8)  # H / 2**(len(block_out_channels) - 1)
    assert len(calls) == 3  # batches of 2, 2, 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    assert torch.allclose(latents, mean * vae.config.scaling_factor, atol=1e-5)  # the mean, scaled, no shift
    files = list(tmp_path.glob("latents-*.safetensors"))
    assert len(files) == 1
    calls.clear()
    again = cache_latents(images, vae, batch_size=2, cache_path=tmp_path)
    assert not calls and torch.equal(again, latents)  # read from the cache, no VAE call
    # New images give a new key.
    cache_latents(_images(n=3), vae, batch_size=4, cache_path=tmp_path)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 2


def test_cache_latents_changed_vae_invalidates(tmp_path):
    images = _images(n=2)
    file = tmp_path / "latents.safetensors"
    a = cache_latents(images, _tiny_vae(), cache_path=file)
    changed = _tiny_vae()
    with torch.no_grad():
        changed.encoder.conv_in.weight.add_(0.1)
    calls = _count_encoder_calls(changed)
    b = cache_latents(images, changed, cache_path=file)
    assert calls and not torch.allclose(a, b)  # recomputed, and the single file rewritten
    assert torch.equal(cache_latents(images, changed, cache_path=file), b)
    # A different scaling/shift (config only, same weights) is a different VAE too: z = (mean - shift) * scale.
    cache_latents(images, _tiny_vae(), cache_path=tmp_path)
    shifted = _tiny_vae(scaling_factor=0.5, shift_factor=0.25)
    c = cache_latents(images, shifted, cache_path=tmp_path)
    with torch.no_grad():
        mean = shifted.encode(images).latent_dist.mean
    assert torch.allclose(c, (mean - 0.25) * 0.5, atol=1e-5)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 2


def test_cache_latents_errors_and_dataset():
    vae = _tiny_vae()
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        cache_latents(_images() * 3, vae)
    with pytest.raises(DataError, match="channel"):
        cache_latents(torch.zeros(2, 1, 16, 16), vae)
    ds = latent_dataset(TensorImages(_images(n=4), torch.tensor([0, 1, 2, 1])), vae)
    assert len(ds) == 4 and ds[3]["image"].shape == (4, 8, 8) and ds[3]["class_label"] == 1
    assert ds.num_classes == 3


def test_batch_image_is_the_sample_not_a_condition():
    from stepdistill.conditioning import Cond

    batch = collate([digits_dataset()[i] for i in range(3)])
    cond = Cond.from_batch(batch)
    assert cond.image is None and torch.equal(cond.class_labels, batch["class_label"])
    source = torch.zeros(3, 1, 16, 16)
    assert Cond.from_batch({**batch, "source_image": source}).image is source


def test_sample_seeds_give_each_run_seed_its_own_stream():
    from stepdistill.data import sample_seed

    # torch's CPU generator keeps 32 bits of a seed: (seed << 32) + i would make every seed the same stream
    same = [torch.randn(2, generator=torch.Generator().manual_seed((s << 32) + 5)) for s in (0, 1)]
    assert torch.equal(*same)
    assert [sample_seed(0, i) for i in range(3)] == [0, 1, 2]
    streams = [{sample_seed(s, i) for i in range(50_000)} for s in range(4)]
    assert all(len(a & b) == 0 for k, a in enumerate(streams) for b in streams[k + 1:])
    pairs = {sample_seed(2**31, i) for i in range(50_000)}  # make-pairs' stream
    assert all(not (pairs & s) for s in streams)


def test_super_resolution_sources_and_an_image_conditioned_teacher(tmp_path):
    from stepdistill.config import ConfigError
    from stepdistill.trainers import resolve
    from stepdistill.data import build_dataset, low_resolution
    from stepdistill.trainers import build_trainer
    from tiny import TINY_UNET, tiny_teacher_raw

    raw = tiny_teacher_raw(tmp_path / "sr", max_steps=2)
    raw["data"]["source_resolution"] = 4
    raw["model"]["backbone_config"] = {**TINY_UNET, "in_channels": 2, "num_class_embeds": None}
    run = resolve(raw)
    data = build_dataset(run.data)
    item = data[5]
    small = item["image"].reshape(1, 4, 2, 4, 2).mean(dim=(2, 4))  # 2x2 area averages of the 8x8 image
    torch.testing.assert_close(item["source_image"], small.repeat_interleave(2, 1).repeat_interleave(2, 2))
    torch.testing.assert_close(low_resolution(item["image"], 4), item["source_image"])
    seen = []
    trainer = build_trainer(run)
    trainer.objective.model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    trainer.train(resume=None)
    assert trainer.objective.num_classes is None and seen and set(seen) == {2}  # image + its source, no labels
    raw["data"]["source_resolution"] = None
    with pytest.raises(ConfigError, match="no source images: set data.source_resolution"):
        build_trainer(resolve(raw))
    raw["data"]["source_resolution"] = 8
    with pytest.raises(DataError, match="must be below data.resolution"):
        build_dataset(resolve(raw).data)
