"""The communication of SNCA on several processes: the job (``DistEnv``, ``init_from_env``), the
collectives every other part goes through (each bounded by the process group's timeout, a failure
raised as ``PeerFailure``), and the row blocks of a sharded bank (``shard_range``, ``local_rows``)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 600.0
_NEG_INF = float("-inf")


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank has died, hung or diverged from this one."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the variables torchrun sets."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device) -> DistEnv:
        """The world of one process: every collective of this module is then the identity."""
        return cls(rank=0, world_size=1, local_rank=0, device=device, timeout_s=DEFAULT_TIMEOUT_S)


def launched_distributed() -> bool:
    """True under torchrun (or a launcher that sets the same variables) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Joins the process group described by torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT: NCCL with one GPU per local rank when the device is CUDA, gloo on CPU.

    ``timeout_s`` bounds every collective, so a rank that dies or hangs makes the others fail with
    ``PeerFailure`` rather than wait forever.
    """
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise RuntimeError(f"distributed training needs torchrun's environment; {missing} not set")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank if chosen.index is None else chosen.index)
        torch.cuda.set_device(chosen)
    elif chosen.type != "cpu":
        raise ValueError(f"device must be cpu or cuda for distributed training, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank, world, local_rank, chosen, float(timeout_s))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group, where every collective below is the
    identity, so one code path serves one process and many."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    """The number of processes of the job (1 without a process group)."""
    return rank_world()[1]


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return rank_world()[0]


def _peer_failure(what: str, error: Exception) -> PeerFailure:
    rank, world = rank_world()
    return PeerFailure(
        f"rank {rank} of {world}: {what} failed ({str(error).strip().splitlines()[0]}). Another rank "
        f"has probably died or hung; its own log says why."
    )


def guarded(what: str, collective: Callable[[], object]) -> None:
    if not dist.is_initialized():
        return
    try:
        collective()
    except RuntimeError as error:  # DistBackendError and gloo's timeouts are RuntimeErrors
        raise _peer_failure(what, error) from error


def backward(loss: Tensor) -> None:
    """``loss.backward()`` under DDP: a failure of its gradient all-reduce raises ``PeerFailure``;
    any other error is raised as it is."""
    try:
        loss.backward()
    except RuntimeError as error:
        text = str(error)
        if isinstance(error, dist.DistBackendError) or "gloo" in text or "NCCL" in text:
            raise _peer_failure("the gradient all-reduce of DDP", error) from error
        raise


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of ``tensor`` (returned), raising ``PeerFailure`` on failure."""
    guarded("all_reduce", lambda: dist.all_reduce(tensor, op=op))
    return tensor


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count, in rank order."""
    rank, world = rank_world()
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[rank] = rows
    return all_reduce(sizes).tolist()


def all_gather_cat(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` in rank order; the ranks may hold
    different numbers of rows (``sizes``, from ``gather_sizes``; padded for the transfer). Not
    differentiable: each rank differentiates only its own rows."""
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    if len(sizes) == 1:
        return tensor
    padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    guarded("all_gather", lambda: dist.all_gather(parts, padded))
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def own_slice(sizes: list[int]) -> slice:
    """This rank's rows of a concatenation of blocks of ``sizes`` rows, one per rank."""
    rank, _ = rank_world()
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def all_gather_columns(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (all the same shape) concatenated along the last dim, rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    guarded("all_gather", lambda: dist.all_gather(parts, tensor.contiguous()))
    return torch.cat(parts, dim=-1)


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (a small picklable object: a path, a flag)."""
    holder = [value]
    guarded("broadcast", lambda: dist.broadcast_object_list(holder, src=0))
    return holder[0]


def barrier() -> None:
    """Waits for every rank (nothing without a process group), raising ``PeerFailure`` on failure."""
    guarded("barrier", dist.barrier)


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any: ranks must agree to stop together."""
    if world_size() == 1:
        return bool(flag)
    return bool(all_reduce(torch.tensor([float(flag)], device=device), dist.ReduceOp.MAX).item())


def global_mean(value: Tensor) -> float:
    """The mean over ranks of a scalar (each rank's loss is the mean over its own queries)."""
    total = all_reduce(value.detach().double().reshape(1).clone())
    return float(total) / world_size()


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block ``[start, end)`` of ``size`` rows owned by ``rank``: the first
    ``size % world_size`` ranks get one row more."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_rows(indices: Tensor, start: int, end: int) -> Tensor:
    """Global bank rows mapped to rows of the block ``[start, end)``; -1 where not owned (or -1)."""
    owned = (indices >= start) & (indices < end)
    return torch.where(owned, indices - start, torch.full_like(indices, -1))
