"""The sharded SNCA loss and kNN search: every rank streams the global batch over its block of the
bank and the partials are combined exactly (``snca_ext.distributed``'s docstring)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from .. import _autograd, combine
from ..ops import bank_topk, loss_from_lse, snca_partials
from .comm import (
    all_gather_cat,
    all_gather_columns,
    all_reduce,
    gather_sizes,
    local_rows,
    own_slice,
)

_NEG_INF = float("-inf")


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
        mine = own_slice(sizes)
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
    mine = own_slice(sizes)
    candidates_values = all_gather_columns(values)[mine]
    candidates_rows = all_gather_columns(rows)[mine]
    return merge_topk(candidates_values, candidates_rows, k)
