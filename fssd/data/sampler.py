"""A distributed sampler whose global batches do not depend on the number of ranks."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch.

    Each epoch the dataset is permuted with ``seed + epoch``; the permutation is cut into
    global batches of ``global_batch_size`` and rank ``r`` of ``world_size`` takes the
    ``r``-th contiguous slice of every global batch. So W ranks with batch ``B / W`` see, step
    by step, exactly the images one rank with batch ``B`` sees, which makes DDP runs
    comparable to single-process runs. ``drop_last`` drops the incomplete last global batch
    (training); otherwise it is split as evenly as possible, and ranks may get fewer images.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the number of workers {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if drop_last and dataset_size < global_batch_size:
            raise ValueError(
                f"the dataset has {dataset_size} images, fewer than one global batch of {global_batch_size}; "
                "lower the batch size or use more data"
            )
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        b = self.global_batch_size
        for start in range(0, len(order), b):
            chunk = order[start : start + b]
            if len(chunk) < b:
                if self.drop_last:
                    return
                share = (len(chunk) + self.world_size - 1) // self.world_size
                mine = chunk[self.rank * share : (self.rank + 1) * share]
            else:
                mine = chunk[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]
            if mine:
                yield mine

    def __len__(self) -> int:
        full, rest = divmod(self.dataset_size, self.global_batch_size)
        if self.drop_last or rest == 0:
            return full
        share = (rest + self.world_size - 1) // self.world_size
        return full + (1 if self.rank * share < rest else 0)
