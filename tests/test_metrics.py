"""FID/KID/PR/IS through torch-fidelity: identities, monotonicity, agreement with torch-fidelity's own
``calculate_metrics``, the streaming moments, the reference cache, the digits extractor and the Inception path."""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from stepdistill.data import digits_tensors, to_uint8
from stepdistill.metrics import features as feats
from stepdistill.metrics.fid import (FeatureAccumulator, FidelityEvaluator, Moments, features_of, fidelity_metrics,
                                     real_vs_real, reference_features, reference_images)

DIGITS_ACCURACY_THRESHOLD = 0.97


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid-cache")


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    torch.set_num_threads(1)
    return FidelityEvaluator("digits", "digits", 16, metrics=("fid", "kid", "prc", "isc"), cache_dir=cache_dir,
                             kid_subsets=10, kid_subset_size=400)


@pytest.fixture(scope="module")
def real():
    return reference_images("digits", 16)[1]


def blur(x, sigma):
    return gaussian_blur(x.float(), 7, sigma).round().clamp(0, 255).to(torch.uint8)


def noise(x, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + torch.randn(x.shape, generator=g) * std).round().clamp(0, 255).to(torch.uint8)


def test_fid_and_kid_of_a_set_against_itself_are_zero(evaluator, real):
    same = evaluator.evaluate(real[i:i + 500] for i in range(0, len(real), 500))
    assert same["n"] == len(real) == 1797
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    blurred = evaluator.evaluate([blur(real[:600], 1.0)])
    assert abs(same["kid_mean"]) < 0.01 < 0.1 < blurred["kid_mean"]  # unbiased: ~0 vs clearly positive


def test_fid_and_kid_grow_monotonically_with_blur_and_noise(evaluator, real):
    x = real[:400]
    for corrupt, levels in ((blur, (0.5, 1.0, 2.0, 3.0)), (noise, (20, 60, 120, 200))):
        scores = [evaluator.evaluate([corrupt(x, s)]) for s in levels]
        fids = [s["fid"] for s in scores]
        kids = [s["kid_mean"] for s in scores]
        assert all(a < b for a, b in zip(fids, fids[1:])), (corrupt.__name__, fids)
        assert all(a < b for a, b in zip(kids, kids[1:])), (corrupt.__name__, kids)


def test_streaming_matches_torch_fidelity_calculate_metrics(evaluator, real):
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    gen, ref = noise(real[:300], 60), real[300:600]
    spec = evaluator.spec
    expected = torch_fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(ref), cuda=False, fid=True, kid=True, prc=True, isc=True,
        feature_extractor=spec.extractor, feature_extractor_weights_path=spec.weights_path, cache=False,
        verbose=False, save_cpu_ram=True, kid_subsets=10, kid_subset_size=200, batch_size=64)
    ours = fidelity_metrics(features_of(gen, evaluator.extractor, spec, batch_size=37),  # ragged batches
                            features_of(ref, evaluator.extractor, spec, keep_fid_features=True), spec,
                            kid_subsets=10, kid_subset_size=200)
    # torch-fidelity keeps the feature mean in float32; ours is float64, hence 1e-5 rather than exact
    assert ours["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-5, abs=1e-7)
    assert ours["kid_std"] == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-5, abs=1e-7)
    assert ours["precision"] == expected["precision"] and ours["recall"] == expected["recall"]
    assert ours["isc_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)


def test_moments_merged_batch_by_batch_equal_numpy():
    x = torch.randn(503, 7, dtype=torch.float64) * 3 + 10
    m = Moments(7)
    for chunk in x.split(64):
        m.update(chunk)
    assert m.n == 503
    np.testing.assert_allclose(m.mean, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_accumulator_keeps_features_not_images(evaluator, real):
    acc = FeatureAccumulator(evaluator.extractor, evaluator.spec, ("fid",))
    for chunk in real[:300].split(100):
        acc.add(chunk)
    fs = acc.result()
    assert fs.n == 300 and fs.features == {} and fs.sigma.shape == (128, 128)  # FID alone: moments only
    with pytest.raises(ValueError, match="uint8"):
        acc.add(real[:2].float())


def test_reference_cache_is_safetensors_keyed_by_extractor_weights(evaluator, real, tmp_path):
    desc, images, labels = reference_images("digits:test", 16)
    assert labels.bincount().tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    spec, ex = evaluator.spec, evaluator.extractor
    first = reference_features(desc, images, ex, spec, tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and "digits_test-16px-stepdistill-digits" in files[0].name
    with mock.patch("stepdistill.metrics.fid.features_of", side_effect=AssertionError("recomputed")):
        again = reference_features(desc, images, ex, spec, tmp_path)
    np.testing.assert_array_equal(first.mu, again.mu)
    assert again.n == desc["size"] == 359
    other = feats.FeatureSpec(**{**spec.__dict__, "weights_sha256": "0" * 64})
    reference_features(desc, images, ex, other, tmp_path)  # another weights hash: another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_real_vs_real_floor(evaluator):
    plain = real_vs_real(evaluator.ref, evaluator.spec, 2000, splits=3, kid_subsets=10, kid_subset_size=400)
    assert plain["halves"] == [898, 899] and not plain["stratified"]
    assert 0 < plain["fid_floor"] < plain["fid_halves_mean"]  # more samples on both sides: a lower floor
    assert abs(plain["kid_halves_mean"]) < 0.01
    balanced = evaluator.floor(2000, splits=3, stratified=True)  # for class-balanced generation
    assert balanced["stratified"] and sum(balanced["halves"]) == 1797
    assert balanced["fid_floor"] < plain["fid_floor"]  # no class-proportion noise


def test_protocol_is_complete(evaluator):
    p = evaluator.protocol(2000)
    assert set(p["computed"]) == {"fid", "kid", "prc", "isc"}
    fe = p["feature_extractor"]
    assert fe["name"] == "digits" and fe["extractor"] == "stepdistill-digits"
    assert fe["weights_sha256"] == feats.file_sha256(fe["weights_path"]) and len(fe["config_sha256"]) == 64
    assert p["n_generated"] == 2000 and p["resolution"] == 16
    assert p["reference"]["name"] == "digits" and p["reference"]["size"] == 1797
    assert p["kid_subset_size"] == 400 and p["kid_subsets"] == 10
    json.dumps(p)


def test_digits_extractor_held_out_accuracy():
    """The shipped extractor, through torch-fidelity's registry, on the digits TEST split it never saw."""
    spec = feats.resolve_features("digits")
    extractor = feats.create_extractor(spec, ["fc", "logits"])
    images, labels = digits_tensors(16, "test")
    logits = feats.extract(extractor, to_uint8(images), spec.channels)["logits"]
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= DIGITS_ACCURACY_THRESHOLD
    recorded = json.loads((feats.DIGITS_FEATURES_DIR / feats.DIGITS_CONFIG).read_text())
    assert recorded["test_accuracy"] == pytest.approx(accuracy, abs=1e-3)
    # RGB input is converted to gray, any size is resized: 3x32x32 works
    rgb = to_uint8(torch.nn.functional.interpolate(images[:4], size=32)).expand(-1, 3, -1, -1)
    assert feats.extract(extractor, rgb, spec.channels)["fc"].shape == (4, 128)


def _random_inception_weights(path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value=None), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():  # He init keeps the activations alive through 40 random layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)  # what torch-fidelity loads: torch.load(path) then load_state_dict
    return path, net.state_dict()


def test_inception_from_a_local_weights_file(tmp_path, real):
    path, saved = _random_inception_weights(tmp_path / feats.INCEPTION_FILE)
    spec = feats.resolve_features(f"inception:{path}")
    assert spec.extractor == "inception-v3-compat" and spec.channels == 3
    assert spec.weights_sha256 == feats.file_sha256(path) and spec.layers["fid"] == "2048"
    extractor = feats.create_extractor(spec, ["2048"])
    loaded = extractor.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # the file's weights, not a download
    a, b = real[:3], blur(real[3:6], 2.0)  # grayscale 16x16: repeated to RGB, resized to 299 inside
    fa = features_of(a, extractor, spec, ("fid",))
    fb = features_of(b, extractor, spec, ("fid",))
    assert fa.mu.shape == (2048,)
    assert fidelity_metrics(fa, fb, spec, ("fid",))["fid"] > 1e-3  # one 2048-d FID: ~4 s on one core


def test_inception_weights_that_are_a_pickle_of_code_are_never_unpickled(tmp_path):
    """torch-fidelity unpickles a weights file with weights_only=False; a file that asks to run code is refused
    before it gets there, and one that changed after its hash was taken is refused too."""
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / feats.INCEPTION_FILE
    torch.save({"w": torch.zeros(1), "payload": Payload()}, path)
    spec = feats.resolve_features(f"inception:{path}")
    with pytest.raises(feats.FeatureError, match="not a plain file of tensors"):
        feats.create_extractor(spec, ["2048"])
    assert not marker.exists()
    good, _ = _random_inception_weights(tmp_path / "good.pth")
    spec = feats.resolve_features(f"inception:{good}")
    torch.save({"other": torch.ones(1)}, good)
    with pytest.raises(feats.FeatureError, match="changed since"):
        feats.create_extractor(spec, ["2048"])


def test_inception_without_weights_is_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache
    with pytest.raises(feats.FeatureError) as err:
        feats.resolve_features("inception")
    message = str(err.value)
    assert feats.INCEPTION_URL in message and str(tmp_path / "hub" / "checkpoints" / feats.INCEPTION_FILE) in message
    with pytest.raises(feats.FeatureError, match="does not exist"):
        feats.resolve_features(f"inception:{tmp_path / 'missing.pth'}")
    with pytest.raises(feats.FeatureError, match="unknown feature extractor"):
        feats.resolve_features("vgg")
