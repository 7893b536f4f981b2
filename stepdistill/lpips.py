"""LPIPS (Zhang et al. 2018) from local weights, as a training distance (DMD's regression loss; improved reflow's
LPIPS-Huber).

The ``lpips`` package ships its linear calibration layers; its VGG16 backbone is torchvision's ImageNet VGG16,
which it would download. Here the backbone comes from a local file instead (torchvision's ``vgg16-397923af.pth``
state dict or a safetensors copy of it), so nothing is fetched at run time.
"""
from __future__ import annotations

from pathlib import Path

import torch


class LPIPSError(ValueError):
    pass


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs


def load_lpips(vgg_weights: str | Path) -> torch.nn.Module:
    """A frozen ``lpips.LPIPS(net="vgg")`` whose VGG16 features are loaded from ``vgg_weights``."""
    import warnings

    import lpips

    path = Path(vgg_weights).expanduser()
    if not path.is_file():
        raise LPIPSError(f"LPIPS needs the VGG16 weights as a local file; {path} does not exist (torchvision's "
                         "vgg16-397923af.pth, e.g. from ~/.cache/torch/hub/checkpoints/ on a machine with internet)")
    try:
        state = _read_state(path)
    except Exception as exc:
        raise LPIPSError(f"{path} is not a readable VGG16 state dict ({type(exc).__name__}: {exc})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained`
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # lpips keeps torchvision's feature indices inside five slices: features.<i>.* -> net.slice<k>.<i>.*
    own = model.net.state_dict()
    where = {key.split(".", 1)[1]: key for key in own}  # "<i>.weight" -> "slice<k>.<i>.weight"
    mapped = {where[k.removeprefix("features.")]: v for k, v in state.items()
              if k.startswith("features.") and k.removeprefix("features.") in where}
    if set(mapped) != set(own):
        raise LPIPSError(f"{path} does not hold torchvision VGG16 features (missing {sorted(set(own) - set(mapped))[:3]})")
    model.net.load_state_dict(mapped)
    return model.eval().requires_grad_(False)


MIN_SIZE = 32  # VGG16 halves the image four times before its last stage


def lpips_per_sample(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor,
                     size: int | None = None) -> torch.Tensor:
    """LPIPS of each pair of images in [-1, 1], shape ``(B,)``; 1-channel images are repeated to RGB. ``size``:
    bilinear resize to ``size`` x ``size`` first (rfpp compares at 224); otherwise images smaller than 32 pixels are
    bilinearly upsampled to 32 (VGG16's last stage needs 2x2 after four poolings)."""
    if size is None and min(a.shape[-2:]) < MIN_SIZE:
        size = MIN_SIZE
    if size is not None and tuple(a.shape[-2:]) != (size, size):
        a, b = (torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
                for x in (a, b))
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    if a.shape[1] != 3:
        raise LPIPSError(f"LPIPS compares RGB or grayscale images, not {a.shape[1]}-channel tensors (latents: use "
                         "pseudo_huber)")
    return model(a.float(), b.float()).flatten(1).mean(1)


def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS between image batches in [-1, 1] (:func:`lpips_per_sample`, images below 32 pixels upsampled)."""
    return lpips_per_sample(model, a, b).mean()
