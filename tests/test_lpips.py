"""LPIPS from a local VGG16 file (no download) and DMD's LPIPS regression distance."""
import pytest
import torch

from stepdistill.config import ConfigError

from stepdistill.trainers import resolve
from stepdistill.lpips import LPIPSError, load_lpips, lpips_distance
from tiny import tiny_dmd_raw


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16's features, saved as torchvision names them."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's vgg16().features, without the 120M-parameter classifier
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return path, features


def test_lpips_is_the_calibrated_feature_distance(vgg_file):
    """LPIPS = sum_l mean_hw || w_l * (f_l(a)/|f_l(a)| - f_l(b)/|f_l(b)|) ||^2 over VGG16's five relu stages, on
    inputs shifted and scaled as lpips does; the backbone is the local file's."""
    path, features = vgg_file
    model = load_lpips(path)
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    rgb_a, rgb_b = (model.scaling_layer(x.repeat(1, 3, 1, 1)) for x in (a, b))
    cuts = [4, 9, 16, 23, 30]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16.features
    expected = torch.zeros(2)
    fa, fb = rgb_a, rgb_b
    start = 0
    for layer, cut in enumerate(cuts):
        for m in list(features.eval())[start:cut]:
            fa, fb = m(fa), m(fb)
        start = cut
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(model, f"lin{layer}").model[-1].weight  # 1x1 conv, C -> 1, non-negative
        expected += torch.nn.functional.conv2d((na - nb) ** 2, w).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lpips_distance(model, a, b), expected.mean(), rtol=1e-4, atol=1e-6)
    assert float(lpips_distance(model, a, a)) == 0.0
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(LPIPSError, match="does not exist"):
        load_lpips(tmp_path / "nope.pth")
    from safetensors.torch import save_file

    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LPIPSError, match="VGG16 features"):
        load_lpips(tmp_path / "bad.safetensors")


def test_dmd_regression_with_lpips(tmp_path, teacher_folder, vgg_file):
    from stepdistill.pairs import make_pairs
    from stepdistill.trainers import build_trainer

    make_pairs(str(teacher_folder), tmp_path / "pairs", 16, nfe=2, shard_size=16, batch_size=16, progress=False)
    raw = tiny_dmd_raw(tmp_path / "reg", teacher_folder, "regression")
    raw["data"] = {"dataset": "pairs", "path": str(tmp_path / "pairs"), "resolution": 8, "channels": 1}
    raw["optim"] = {"generator": {"lr": 1e-3}}
    raw["objective"] = {"regression_distance": "lpips"}
    with pytest.raises(ConfigError, match="lpips_weights=PATH"):
        build_trainer(resolve(raw))
    raw["objective"]["lpips_weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        build_trainer(resolve(raw))
    raw["objective"]["lpips_weights"] = str(vgg_file[0])
    trainer = build_trainer(resolve(raw))
    o = trainer.objective
    batch = trainer._next_batch()
    loss, _ = o.loss("generator", batch, 0)
    from stepdistill import Cond

    with torch.no_grad():
        pred = o._generate(batch["noise"], Cond.from_batch(batch), grad=False)
    torch.testing.assert_close(loss, lpips_distance(o.lpips_net, pred, batch["image"]))
    trainer.train(resume=None)
