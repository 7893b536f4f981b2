"""Feature extractors for FID/KID/IS/precision-recall, all served through torch-fidelity's registry.

- ``digits``: the shipped digits CNN (``stepdistill/assets/digits-features``), a small classifier trained on the
  digits train split at 16x16; registered with torch-fidelity as ``stepdistill-digits``.
- ``inception:PATH``: torch-fidelity's ``inception-v3-compat`` (the TF-2015 FID Inception, TF-exact bilinear
  resize to 299) with weights from a local file. Offline, there is no download: a missing file is an error that
  says where to get it and where to put it.

Both take uint8 ``B x C x H x W`` (torch-fidelity's convention); grayscale images are repeated to RGB for
Inception, RGB images are averaged to gray for the digits CNN.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ..cache import file_sha256
from ..data import DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_FEATURES_DIR = ASSETS / "digits-features"
DIGITS_WEIGHTS = "model.safetensors"
DIGITS_CONFIG = "config.json"
DIGITS_EXTRACTOR = "stepdistill-digits"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # torch.hub names it by this
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class FeatureError(DataError):
    """A feature extractor that cannot be built (bad spec, missing weights); the message says how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# The digits CNN
# --------------------------------------------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """A small classifier of 16x16 grayscale digits in [-1, 1].

    Features: ``conv`` (64-d, global average of the last conv block), ``fc`` (128-d, the penultimate linear layer
    before its ReLU: continuous, full-rank covariance; the FID/KID/PR layer) and ``logits`` (10-d, the IS layer).
    The extractor multiplies ``conv`` and ``fc`` by the ``feature_scale`` of config.json (RMS 1 on the train split).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128,
                 resolution: int = 16, dropout: float = 0.3):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "width": width, "hidden": hidden,
                       "resolution": resolution, "dropout": dropout}
        w = width
        self.block1 = nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * w * (resolution // 4) ** 2, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.block2(self.block1(x))
        fc = self.fc(h.flatten(1))
        return {"conv": h.mean(dim=(2, 3)), "fc": fc, "logits": self.head(self.drop(F.relu(fc)))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def save_digits_cnn(model: DigitsCNN, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``extra``: training, accuracy)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / DIGITS_WEIGHTS))
    (out_dir / DIGITS_WEIGHTS).chmod(0o644)
    config = {"architecture": "DigitsCNN", **model.config, "input": "uint8 images, mapped to [-1, 1] inside",
              "features": {"conv": 2 * model.config["width"], "fc": model.config["hidden"],
                           "logits": model.config["num_classes"]}, **(extra or {})}
    (out_dir / DIGITS_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out_dir


def load_digits_cnn(folder: str | Path | None = None) -> tuple[DigitsCNN, dict]:
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DIGITS_FEATURES_DIR
    if folder.is_file():  # the weights file itself
        folder = folder.parent
    weights, config_path = folder / DIGITS_WEIGHTS, folder / DIGITS_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise FeatureError(f"the digits feature extractor is missing from {folder} (expected {DIGITS_WEIGHTS} and "
                           f"{DIGITS_CONFIG}); rebuild it with `python scripts/train_digits_features.py` or "
                           "reinstall stepdistill")
    config = json.loads(config_path.read_text())
    arch = {k: config[k] for k in ("channels", "num_classes", "width", "hidden", "resolution", "dropout")}
    model = DigitsCNN(**arch)
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), config


def uint8_to_unit(x: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """uint8 B x C x H x W -> float in [-1, 1] with ``channels`` channels at ``resolution``."""
    x = x.float() / 127.5 - 1
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise FeatureError(f"cannot map {x.shape[1]}-channel images to {channels} channels")
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > resolution)
    return x


class FeatureExtractorDigits(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsCNN`; ``feature_extractor_weights_path`` is the asset folder or its
    ``model.safetensors`` (the shipped one by default)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, self.net_config = load_digits_cnn(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("conv", "fc", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "fc", "kid": "fc", "prc": "fc"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise FeatureError("the digits feature extractor takes uint8 B x C x H x W images")
        cfg = self.net_config
        feats = self.net.features(uint8_to_unit(x, cfg["channels"], cfg["resolution"]))
        scale = cfg.get("feature_scale", {})
        return tuple(feats[name].float() * scale.get(name, 1.0) for name in self.features_list)


def register() -> None:
    """Register the digits extractor with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, FeatureExtractorDigits)


# --------------------------------------------------------------------------------------------------------------
# Specs: which extractor, which weights, which layers
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    """A feature extractor as torch-fidelity names it, with its weights file and their sha256."""

    spec: str  # what the user wrote: "digits" or "inception:PATH"
    extractor: str  # torch-fidelity registry name
    weights_path: str
    weights_sha256: str
    channels: int  # what the network takes (inputs are converted)
    layers: dict  # metric -> feature layer
    config_sha256: str | None = None  # the digits extractor's config.json (its feature scales)

    def protocol(self) -> dict:
        d = asdict(self)
        d.pop("spec")
        return {"name": self.spec.split(":")[0], **d}


def inception_default_path() -> Path:
    """Where torch.hub (and so torch-fidelity) caches the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _inception_missing(path: Path | None) -> FeatureError:
    where = f"{path} does not exist. " if path is not None else ""
    return FeatureError(
        f"{where}FID Inception v3 weights are needed offline: on a machine with internet download {INCEPTION_URL} "
        f"and pass it as --features inception:/path/to/{INCEPTION_FILE}, or put it at {inception_default_path()} "
        "(torch.hub's cache, used by `--features inception`).")


def resolve_features(spec: str = "digits") -> FeatureSpec:
    """``digits`` | ``digits:FOLDER`` | ``inception`` (torch.hub cache) | ``inception:PATH``."""
    name, _, arg = spec.partition(":")
    if name == "digits":
        register()
        folder = Path(arg).expanduser() if arg else DIGITS_FEATURES_DIR
        load_digits_cnn(folder)  # fail early and clearly
        weights = (folder if folder.is_file() else folder / DIGITS_WEIGHTS).resolve()
        return FeatureSpec(spec, DIGITS_EXTRACTOR, str(weights), file_sha256(weights), 1,
                           {m: FeatureExtractorDigits.get_default_feature_layer_for_metric(m)
                            for m in ("fid", "kid", "prc", "isc")},
                           file_sha256(weights.parent / DIGITS_CONFIG))
    if name == "inception":
        path = Path(arg).expanduser() if arg else inception_default_path()
        if not path.is_file():
            raise _inception_missing(path)
        return FeatureSpec(spec, INCEPTION_EXTRACTOR, str(path.resolve()), file_sha256(path), 3,
                           {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"})
    raise FeatureError(f"unknown feature extractor {spec!r}: use 'digits' or 'inception:/path/to/{INCEPTION_FILE}'")


def create_extractor(spec: FeatureSpec, layers: list[str] | None = None, device: str = "cpu"):
    """The torch-fidelity extractor for ``spec``, giving ``layers`` (default: the FID layer and the IS layer)."""
    from torch_fidelity.utils import create_feature_extractor

    register()
    layers = layers or sorted(set(spec.layers.values()))
    weights = spec.weights_path
    if spec.extractor == INCEPTION_EXTRACTOR:
        weights = _verified_tensors(spec)
    extractor = create_feature_extractor(spec.extractor, layers, cuda=False, verbose=False,
                                         feature_extractor_weights_path=weights)
    return extractor.to(device)


def _verified_tensors(spec: FeatureSpec) -> io.BytesIO:
    """The Inception weights file as bytes that hold tensors only: torch-fidelity unpickles the file it is given with
    ``weights_only=False`` (which runs whatever a pickle asks), so it gets these bytes, checked by PyTorch's
    weights-only loader and against the sha256 the protocol records, not the path."""
    data = Path(spec.weights_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != spec.weights_sha256:
        raise FeatureError(f"{spec.weights_path} changed since its sha256 was taken; evaluate again")
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error names what the file asked for
        raise FeatureError(f"{spec.weights_path} is not a plain file of tensors, so it is not loaded (a pickle can "
                           f"run code): {str(exc).splitlines()[0]}. Use the FID Inception weights {INCEPTION_FILE} "
                           "from torch-fidelity's release") from None
    if spec.weights_sha256 != INCEPTION_SHA256:
        warnings.warn(f"{spec.weights_path} is not the standard FID Inception weights file (sha256 "
                      f"{spec.weights_sha256[:12]}..., expected {INCEPTION_SHA256[:12]}...): its FID does not compare "
                      "with published numbers", stacklevel=3)
    return io.BytesIO(data)


def extract(extractor, images_uint8: torch.Tensor, channels: int) -> dict[str, torch.Tensor]:
    """Features of one uint8 batch, as a dict layer -> float32 (B, D) on CPU."""
    x = images_uint8
    if x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            pass  # the digits extractor converts RGB to gray itself
        else:
            raise FeatureError(f"{x.shape[1]}-channel images cannot go into a {channels}-channel feature extractor")
    device = next(extractor.parameters()).device
    with torch.no_grad():
        out = extractor(x.contiguous().to(device))
    return {k: v.detach().float().cpu() for k, v in extractor.convert_features_tuple_to_dict(out).items()}
