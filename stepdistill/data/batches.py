"""A resumable, deterministic order of batches, and the per-sample seed rule."""
from __future__ import annotations

import torch

from .images import DataError


class ResumableBatches:
    """An endless, deterministic order of batches that can resume at any position.

    Epoch ``e`` is a permutation drawn from ``seed + e``; each process takes every ``world``-th batch. The
    position (epoch, batch) is all the state there is, so a resumed run sees exactly the batches the
    uninterrupted run would have.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0):
        if len(dataset) < batch_size * world:
            raise DataError(f"the data set has {len(dataset)} items, fewer than one global batch "
                            f"({batch_size} x {world} processes); lower train.batch_size or add data")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.batches_per_epoch = len(dataset) // (batch_size * world)
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch:
                start = (self.position * self.world + self.rank) * self.batch_size
                idx = order[start:start + self.batch_size].tolist()
                self.position += 1
                yield collate([self.dataset[i] for i in idx])
            self.epoch, self.position = self.epoch + 1, 0


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``: ``(seed * 0x9E3779B1 + index) mod 2**32``.

    Torch's CPU generator keeps only the low 32 bits of a seed, so ``(seed << 32) + index`` would ignore ``seed``.
    This Weyl sequence gives each seed its own stream (seed 0 is ``index`` itself), disjoint from the others'
    for any realistic number of samples.
    """
    return (int(seed) * 0x9E3779B1 + int(index)) % 2**32
