"""SNCA on several processes (``torchrun``): a replicated or a sharded memory bank.

Replicated (data parallel): every rank holds the whole bank, computes the loss of its own queries
against it, and applies the momentum update of the *global* batch (features and indices
all-gathered), so the banks stay bit-identical on every rank.

Sharded (``--bank-sharding``): rank r holds the contiguous block of rows ``shard_range(N, r, W)``.
Every rank streams the global batch (queries all-gathered) over its block with the fused op and
returns per-query partials: the same-class and other-class log-sum-exps and, when the features
require grad, the softmax-weighted mean bank rows (the gradient accumulators; README, "How it
works"). The partials are combined exactly, as FlashAttention's split-KV combine::

    M        = max_r lse_r                           (all_reduce MAX)
    s_r      = exp(lse_r - M)                        (0 for an empty group on rank r)
    lse      = M + log(sum_r s_r)                    (all_reduce SUM of [s_r, s_r * wmean_r])
    wmean    = sum_r s_r wmean_r / sum_r s_r

and each rank keeps only its own queries' rows, so the backward is local: d lse / d f = wmean / T.
The top-k of the kNN search merges every rank's k candidates (value descending, bank row
ascending). Everything goes through ``torch.distributed`` collectives: gloo on CPU, NCCL on GPU.

Every collective is bounded by the process group's timeout; a failed or timed-out collective
raises ``PeerFailure`` (another rank died or hung) instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from . import _autograd, combine
from .memory import MemoryBank, check_update, momentum_update
from .ops import bank_topk, loss_from_lse, snca_partials

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


def _rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group, where every collective below is the
    identity, so one code path serves one process and many."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    """The number of processes of the job (1 without a process group)."""
    return _rank_world()[1]


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _rank_world()[0]


def _peer_failure(what: str, error: Exception) -> PeerFailure:
    rank, world = _rank_world()
    return PeerFailure(
        f"rank {rank} of {world}: {what} failed ({str(error).strip().splitlines()[0]}). Another rank "
        f"has probably died or hung; its own log says why."
    )


def _guarded(what: str, collective: Callable[[], object]) -> None:
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
    _guarded("all_reduce", lambda: dist.all_reduce(tensor, op=op))
    return tensor


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count, in rank order."""
    rank, world = _rank_world()
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
    _guarded("all_gather", lambda: dist.all_gather(parts, padded))
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _own_slice(sizes: list[int]) -> slice:
    rank, _ = _rank_world()
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def all_gather_columns(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (all the same shape) concatenated along the last dim, rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    _guarded("all_gather", lambda: dist.all_gather(parts, tensor.contiguous()))
    return torch.cat(parts, dim=-1)


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (a small picklable object: a path, a flag)."""
    holder = [value]
    _guarded("broadcast", lambda: dist.broadcast_object_list(holder, src=0))
    return holder[0]


def barrier() -> None:
    """Waits for every rank (nothing without a process group), raising ``PeerFailure`` on failure."""
    _guarded("barrier", dist.barrier)


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


# ----------------------------------------------------------------------------- sharded loss


def combine_lse_partials(
    lse_same: Tensor, lse_other: Tensor, wmean_same: Tensor | None, wmean_other: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Exact cross-rank combine of per-rank log-sum-exps and weighted means over disjoint rows.

    Each rank passes its partials for the same queries; every rank gets the partials of the union.
    A group empty on every rank stays -inf with a zero mean (never NaN); the non-finite rules are
    those of snca_ext/combine.py, which the Triton backend's split combine shares.
    """
    part_max, part_sum = combine.lse_as_partial(torch.stack([lse_same, lse_other]))
    with_means = wmean_same is not None and wmean_other is not None
    lse, wmean = combine.combine_lse(
        part_max,
        part_sum,
        torch.stack([wmean_same, wmean_other]) if with_means else None,
        reduce_max=lambda t: all_reduce(t.clone(), dist.ReduceOp.MAX),
        reduce_sum=all_reduce,
    )
    if wmean is None:
        return lse[0], lse[1], None, None
    return lse[0], lse[1], wmean[0], wmean[1]


class _ShardedStats(torch.autograd.Function):
    """(lse_same, lse_other) of this rank's queries against the bank spread over every rank."""

    @staticmethod
    def forward(ctx, features, indices, labels, shard, shard_labels, start, temperature, backend, with_grad):
        sizes = gather_sizes(features.shape[0], features.device)
        queries = all_gather_cat(features.detach(), sizes)
        query_rows = all_gather_cat(indices, sizes)
        query_labels = all_gather_cat(labels, sizes)
        lse_same, lse_other, wmean_same, wmean_other = snca_partials(
            queries,
            local_rows(query_rows, start, start + shard.shape[0]),
            shard,
            shard_labels,
            temperature,
            labels=query_labels,
            with_grad=with_grad,
            backend=backend,
        )
        lse_same, lse_other, wmean_same, wmean_other = combine_lse_partials(
            lse_same, lse_other, wmean_same if with_grad else None, wmean_other if with_grad else None
        )
        mine = _own_slice(sizes)
        ctx.inv_temperature = 1.0 / temperature
        mine_same, mine_other = lse_same[mine], lse_other[mine]
        if with_grad:
            # The output is kept as the anchor that makes a second derivative raise, not vanish.
            ctx.save_for_backward(wmean_same[mine], wmean_other[mine], mine_same)
        return mine_same, mine_other

    @staticmethod
    def backward(ctx, grad_same, grad_other):
        wmean_same, wmean_other, anchor = ctx.saved_tensors
        grad = _autograd.lse_grad(grad_same, grad_other, wmean_same, wmean_other, ctx.inv_temperature)
        grad = _autograd.refuse_second_order(grad, anchor)
        return grad, None, None, None, None, None, None, None, None


def sharded_snca_stats(
    features: Tensor,
    indices: Tensor,
    shard: Tensor,
    shard_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor,
    start: int,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The loss statistics of this rank's queries over the whole bank, of which this rank holds
    rows ``[start, start + len(shard))``. Collective: every rank must call it, with the same
    temperature and backend; the batch sizes may differ.

    Args:
        features: [b, D] this rank's queries. indices: [b] their global bank rows (-1 for none).
        shard: [n, D] this rank's block of the bank. shard_labels: [n] its rows' classes.
        temperature: T. labels: [b] the queries' classes (a query's own row may live on another
            rank, so its class cannot be read from the shard). start: the block's first row.
        backend: a fused backend.

    Returns:
        ``(lse_same [b], lse_other [b])`` as ``snca_stats``'s, differentiable in ``features``.
    """
    if labels is None:
        raise ValueError("labels must be given: a query's own bank row may be on another rank")
    rows = torch.as_tensor(indices).to(features.device).long()
    # Grad mode is off inside Function.forward: decide here whether to accumulate the gradient.
    with_grad = features.requires_grad and torch.is_grad_enabled()
    return _ShardedStats.apply(
        features, rows, labels, shard, shard_labels, start, temperature, backend, with_grad
    )


def sharded_snca_loss(
    features: Tensor,
    indices: Tensor,
    shard: Tensor,
    shard_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor,
    start: int,
    margin: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The SNCA loss of this rank's queries against the bank sharded over every rank; equal to
    ``snca_loss`` of these queries against the whole bank. ``reduction="mean"`` divides by this
    rank's batch, so DDP's gradient averaging gives the gradient of the global batch's mean."""
    lse_same, lse_other = sharded_snca_stats(
        features, indices, shard, shard_labels, temperature, labels=labels, start=start, backend=backend
    )
    return loss_from_lse(lse_same, lse_other, float(margin), reduction)


def merge_topk(values: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of candidates ``[B, C]`` (rows global, -1 for none): value descending (NaN
    first), then row ascending; candidates with row -1 go last (snca_ext/combine.py)."""
    return tuple(combine.merge_topk(values, rows, k))


@torch.no_grad()
def sharded_topk(
    queries: Tensor,
    shard: Tensor,
    k: int,
    *,
    start: int,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The k rows of the sharded bank most similar to each of this rank's queries, as
    ``bank_topk`` on the whole bank. Collective; not differentiable.

    Args:
        queries: [b, D]. shard: [n, D] this rank's block, whose first row is ``start``.
        k: neighbours. exclude: [b] global rows to skip (-1 for none). backend: as ``bank_topk``.

    Returns:
        ``(values [b, k], rows [b, k])``: rows are global, ties to the lower row, -1 padding.
    """
    sizes = gather_sizes(queries.shape[0], queries.device)
    all_queries = all_gather_cat(queries, sizes)
    if exclude is None:
        exclude = torch.full((queries.shape[0],), -1, dtype=torch.long, device=queries.device)
    all_exclude = all_gather_cat(exclude.long(), sizes)
    shard_k = min(k, shard.shape[0])
    values, rows = bank_topk(
        all_queries,
        shard,
        shard_k,
        exclude=local_rows(all_exclude, start, start + shard.shape[0]),
        backend=backend,
    )
    rows = torch.where(rows >= 0, rows + start, rows)
    if shard_k < k:  # a block smaller than k: pad with "no neighbour"
        values = F.pad(values, (0, k - shard_k), value=_NEG_INF)
        rows = F.pad(rows, (0, k - shard_k), value=-1)
    # Every rank's candidates for every query, then this rank's queries only.
    mine = _own_slice(sizes)
    candidates_values = all_gather_columns(values)[mine]
    candidates_rows = all_gather_columns(rows)[mine]
    return merge_topk(candidates_values, candidates_rows, k)


# ----------------------------------------------------------------------------- memory banks


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
        rank, world = _rank_world()
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
    ) -> Tensor:
        """This rank's queries' loss against the whole (sharded) bank: ``sharded_snca_loss``."""
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
        _guarded("all_gather", lambda: dist.all_gather(parts, padded))  # noqa: B023 (called at once)
        for (start, end), part in zip(ranges, parts, strict=True):
            rows = max(0, min(end - start - offset, part.shape[0]))
            out[start + offset : start + offset + rows] = part[:rows].cpu()
    return out


def memory_bank_class(env: DistEnv | None, sharded: bool) -> type[MemoryBank]:
    """The bank for this job: ``MemoryBank`` in one process, else replicated or sharded."""
    if env is None or env.world_size == 1:
        return MemoryBank
    return ShardedMemoryBank if sharded else ReplicatedMemoryBank
