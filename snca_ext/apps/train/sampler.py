"""The order of training examples: a fresh permutation per epoch from the run's own generator,
cut into whole global batches, each split over the processes; resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """This process's examples of the current epoch, in order.

    ``begin_epoch(skip_batches)`` draws the epoch's permutation from ``generator`` (whose state at
    that moment the trainer saves, so a resume replays the same order) and drops the first
    ``skip_batches`` global batches (those already trained on) and the last incomplete one (a
    batch of one example would break batch norm). Global batch i is the permutation's examples
    ``[i * B, (i + 1) * B)`` at any world size; rank r takes every ``world_size``-th of them from
    position r, so a data loader with ``batch_size = B / world_size`` gives it its share of every
    global batch, and a checkpoint resumes at another world size.
    """

    def __init__(
        self, size: int, global_batch: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} must be a multiple of world_size {world_size}")
        self.size, self.global_batch = size, global_batch
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        self._order: list[int] = []

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def begin_epoch(self, skip_batches: int = 0) -> None:
        order = torch.randperm(self.size, generator=self.generator)
        order = order[skip_batches * self.global_batch : self.batches_per_epoch * self.global_batch]
        self._order = order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)
