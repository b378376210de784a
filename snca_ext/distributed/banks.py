"""The memory banks of a job of several processes: replicated (``ReplicatedMemoryBank``) or sharded
in row blocks (``ShardedMemoryBank``), and the choice between them (``memory_bank_class``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory import MemoryBank, check_update, momentum_update
from . import comm
from .comm import DistEnv, all_gather_cat, gather_sizes, guarded, local_rows, shard_range, world_size
from .sharded import sharded_snca_loss, sharded_topk


class ReplicatedMemoryBank(MemoryBank):
    """The whole bank on every rank; ``update`` applies the global batch's momentum update (the
    features and indices of every rank, all-gathered), so the banks stay bit-identical."""

    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor, momentum: float | None = None) -> None:
        sizes = gather_sizes(features.shape[0], features.device)
        super().update(
            all_gather_cat(features.detach().float(), sizes),
            all_gather_cat(indices.to(features.device).long(), sizes),
            momentum,
        )


class ShardedMemoryBank(MemoryBank):
    """Rank r holds rows ``shard_range(N, r, W)`` of the bank (``bank`` is that block) and the
    labels of every row (8 bytes a row, against 2-4 bytes per dimension for the bank). The rows
    are initialised exactly as ``MemoryBank``'s with the same generator, so a sharded run starts
    from the single-process bank. Its ``state_dict`` entries, also inside a parent module's, hold
    the whole bank (gathered: collective, so every rank must save) under MemoryBank's keys, so a
    checkpoint loads at any world size and without sharding; ``fill`` takes this rank's block."""

    def __init__(self, labels: Tensor, dim: int, *, device=None, **kwargs) -> None:
        super().__init__(labels, dim, device="cpu", **kwargs)
        rank, world = comm.rank_world()
        size = self.bank.shape[0]
        if size < world:
            raise ValueError(f"a sharded bank needs at least one row per rank: N={size} < {world} ranks")
        self.total_size = size
        self.start, self.end = shard_range(size, rank, world)
        self.bank = self.bank[self.start : self.end].clone().to(device)
        self.labels = self.labels.to(device)

    @property
    def size(self) -> int:
        return self.total_size

    @property
    def shard_labels(self) -> Tensor:
        return self.labels[self.start : self.end]

    def loss(
        self,
        features: Tensor,
        indices: Tensor,
        *,
        margin: float = 0.0,
        labels: Tensor | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        fresh_rows: bool = False,
    ) -> Tensor:
        """This rank's queries' loss against the whole (sharded) bank: ``sharded_snca_loss``."""
        if fresh_rows:
            raise ValueError(
                "fresh_rows needs the whole bank in each process (MemoryBank, or ReplicatedMemoryBank, "
                "where each process refreshes its own batch's rows); the sharded bank does not swap rows "
                "held by other ranks"
            )
        indices = indices.to(self.labels.device).long()
        if labels is None:
            labels = self.labels[indices.clamp(min=0)]
        return sharded_snca_loss(
            features,
            indices,
            self.bank,
            self.shard_labels,
            self.temperature,
            labels=labels,
            start=self.start,
            margin=margin,
            reduction=reduction,
            backend=backend,
        )

    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor, momentum: float | None = None) -> None:
        """The global batch's momentum update of the rows this rank owns (same arithmetic as
        ``MemoryBank.update``, so the rows equal the single-process bank's)."""
        check_update(features, indices, self.dim, self.size)
        momentum = self.momentum if momentum is None else momentum
        sizes = gather_sizes(features.shape[0], features.device)
        features = all_gather_cat(features.detach().float(), sizes).to(self.bank.device)
        rows = local_rows(all_gather_cat(indices.to(features.device).long(), sizes), self.start, self.end)
        owned = rows >= 0
        momentum_update(self.bank, rows[owned], features[owned], momentum)

    def topk(
        self,
        queries: Tensor,
        k: int,
        *,
        exclude: Tensor | None = None,
        backend: str = "auto",
        bank: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The k most similar rows of the whole bank per query (collective, ``sharded_topk``).
        ``bank`` searches other rows in this process's block's place (its shape)."""
        rows = self._rows_to_search(bank)
        return sharded_topk(queries, rows, k, start=self.start, exclude=exclude, backend=backend)

    # The two per-module steps of nn.Module.state_dict / load_state_dict, which run for this bank
    # also when it is a submodule (of a LightningModule, of any parent): the whole bank is saved
    # under the key MemoryBank uses, and each rank loads its own block of it.
    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "bank"] = gather_blocks(self.bank.detach(), self.total_size)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "bank"
        if key in state_dict:
            bank = state_dict[key]
            if tuple(bank.shape) != (self.total_size, self.dim):
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint's bank has shape {tuple(bank.shape)}, "
                    f"expected the whole bank {(self.total_size, self.dim)}"
                )
                return
            state_dict = {**state_dict, key: bank[self.start : self.end]}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of {self.total_size}, " + super().extra_repr()


def gather_blocks(block: Tensor, total_rows: int, chunk_rows: int = 1 << 16) -> Tensor:
    """The whole sharded bank on the CPU of every rank, assembled in chunks so the device never
    holds more than a block plus ``world x chunk_rows`` rows (collective)."""
    world = world_size()
    if world == 1:  # no process group: there is nothing to gather (and all_gather would not run)
        return block.cpu().clone()
    out = torch.empty(total_rows, block.shape[1], dtype=block.dtype)
    ranges = [shard_range(total_rows, r, world) for r in range(world)]
    longest = max(end - start for start, end in ranges)
    for offset in range(0, longest, chunk_rows):
        piece = block[offset : offset + chunk_rows]
        padded = block.new_zeros(min(chunk_rows, longest - offset), block.shape[1])
        padded[: piece.shape[0]] = piece
        parts = [torch.empty_like(padded) for _ in range(world)]
        guarded("all_gather", lambda: dist.all_gather(parts, padded))  # noqa: B023 (called at once)
        for (start, end), part in zip(ranges, parts, strict=True):
            rows = max(0, min(end - start - offset, part.shape[0]))
            out[start + offset : start + offset + rows] = part[:rows].cpu()
    return out


def memory_bank_class(env: DistEnv | None, sharded: bool) -> type[MemoryBank]:
    """The bank for this job: ``MemoryBank`` in one process, else replicated or sharded."""
    if env is None or env.world_size == 1:
        return MemoryBank
    return ShardedMemoryBank if sharded else ReplicatedMemoryBank
