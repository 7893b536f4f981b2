"""Train the shipped digits feature extractor (stepdistill/assets/digits-features).

A small CNN classifier on the digits TRAIN split at 16x16 in [-1, 1] (the same images as the digits teacher
sees), trained with +-1 pixel random shifts; its accuracy on the held-out TEST split is written to config.json.
Inputs go through the same uint8 quantisation as the images it will score (to_uint8, then back to [-1, 1]).

    python scripts/train_digits_features.py [--out stepdistill/assets/digits-features] [--epochs 40]

Deterministic on CPU for a given torch version (seed 0); about 3 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stepdistill.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_tensors, to_uint8
from stepdistill.metrics.features import DIGITS_FEATURES_DIR, DigitsCNN, save_digits_cnn, uint8_to_unit

RESOLUTION = 16


def quantised(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_tensors(RESOLUTION, split)
    return uint8_to_unit(to_uint8(images), 1, RESOLUTION), labels


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels, padding with the background (-1)."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def feature_scales(model: DigitsCNN, x: torch.Tensor) -> dict[str, float]:
    """Multipliers that give the ``conv`` and ``fc`` features RMS 1 over ``x`` (KID's cubic kernel
    ``(x.y/d + 1)^3`` assumes O(1) features, as Inception's pool3 ones are). Logits are left as they are (IS)."""
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
    return {k: float(f"{1 / feats[k].pow(2).mean().sqrt().item():.6g}") for k in ("conv", "fc")}


def train(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> tuple[DigitsCNN, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = quantised("train")
    x_test, y_test = quantised("test")
    model = DigitsCNN(channels=1, num_classes=10, resolution=RESOLUTION)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(shift(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {accuracy(model, x_test, y_test):.4f}")
    info = {
        "feature_scale": feature_scales(model, x_train),
        "train_accuracy": round(accuracy(model, x_train, y_train), 4),
        "test_accuracy": round(accuracy(model, x_test, y_test), 4),
        "train": {"data": f"digits train split (sklearn load_digits, {len(x_train)} images, stratified "
                          f"{1 - DIGITS_TEST_FRACTION:.0%}, split seed {DIGITS_SPLIT_SEED}), {RESOLUTION}x{RESOLUTION} "
                          "bilinear, uint8-quantised", "test_images": len(x_test), "epochs": epochs,
                  "batch_size": batch_size, "lr": lr, "optimizer": "AdamW(wd=1e-4), one-cycle",
                  "augmentation": "random shift +-1 px", "seed": seed, "torch": torch.__version__,
                  "seconds": round(time.time() - start, 1),
                  "script": "scripts/train_digits_features.py"},
    }
    return model.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DIGITS_FEATURES_DIR)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, info = train(args.epochs, seed=args.seed)
    save_digits_cnn(model, args.out, info)
    print(f"test accuracy {info['test_accuracy']:.4f} (train {info['train_accuracy']:.4f}); wrote {args.out}")


if __name__ == "__main__":
    main()
