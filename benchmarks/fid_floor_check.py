"""Check the model behind the real-vs-real FID floor: FID(n vs n, disjoint real halves) ~ c * (2 / n).

For several n, draw disjoint real subsets of the digits reference (random, and class-stratified as balanced
generation is), and print the mean FID and c = FID / (1/n + 1/n). A constant c supports extrapolating the
floor to the protocol's sizes (stepdistill.metrics.fid.real_vs_real).

    python benchmarks/fid_floor_check.py [--repeats 20] [--features digits]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from stepdistill.metrics.fid import FidelityEvaluator, fidelity_metrics


def subsets(labels, n, stratified, g):
    if not stratified:
        perm = torch.randperm(len(labels), generator=g)
        return perm[:n], perm[n:2 * n]
    a, b = [], []
    classes = torch.unique(labels)
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = n // len(classes)
        a.append(idx[:k])
        b.append(idx[k:2 * k])
    return torch.cat(a), torch.cat(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--features", default="digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ev = FidelityEvaluator(args.features, "digits", 16, metrics=("fid",))
    layer = ev.spec.layers["fid"]
    g = torch.Generator().manual_seed(0)
    print("split        n   FID mean   FID std   c = FID / (2/n)")
    for stratified in (False, True):
        for n in (150, 300, 600, 890):
            fids = []
            for _ in range(args.repeats):
                ia, ib = subsets(ev.ref_labels, n, stratified, g)
                fids.append(fidelity_metrics(ev.ref.subset(ia, layer), ev.ref.subset(ib, layer), ev.spec,
                                             ("fid",))["fid"])
            m = float(np.mean(fids))
            print(f"{'stratified' if stratified else 'random':<10} {len(ia):>5}   {m:8.4f}  {np.std(fids):8.4f}"
                  f"   {m / (2 / len(ia)):8.1f}")


if __name__ == "__main__":
    main()
