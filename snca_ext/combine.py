"""The two merges of partial results shared by every split of the bank: the log-sum-exp combine and
the top-k merge.

The Triton kernel splits the bank across programs (split-KV) and combines the per-split partials
along a local dimension; the sharded bank of distributed training splits it across processes and
combines the per-rank partials with ``torch.distributed`` all-reduces. Both are the same exact
combine, parametrised only by how a partial is reduced, so they follow one non-finite contract:

- a group's log-sum-exp is NaN if any of its partials is NaN (a partial whose sum is NaN);
- else +inf if any partial's max is +inf, and its weighted mean is then the mean over the +inf
  partials (the limit of the softmax, which puts all its weight on the +inf scores);
- a group empty everywhere is -inf with a zero weighted mean, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

_NEG_INF = float("-inf")

Reduce = Callable[[Tensor], Tensor]


class CombinedLse(NamedTuple):
    """lse: the combined log-sum-exp. wmean: the combined softmax-weighted mean row (None when the
    partials carried no weighted sums)."""

    lse: Tensor
    wmean: Tensor | None


def lse_as_partial(lse: Tensor) -> tuple[Tensor, Tensor]:
    """A finished log-sum-exp as a (max, sum) partial: lse = max + log(sum).

    NaN becomes (-inf, NaN) so that a MAX reduction never meets a NaN (collectives do not agree
    on NaN in MAX) while the SUM reduction still carries it; -inf becomes (-inf, 0).
    """
    nan = torch.isnan(lse)
    part_max = torch.where(nan, torch.full_like(lse, _NEG_INF), lse)
    part_sum = torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.ones_like(lse))
    return part_max, torch.where(nan, torch.full_like(lse, float("nan")), part_sum)


def combine_lse(
    part_max: Tensor,
    part_sum: Tensor,
    part_acc: Tensor | None,
    *,
    reduce_max: Reduce,
    reduce_sum: Reduce,
) -> CombinedLse:
    """Exact log-sum-exp (and weighted mean) of a group from partials over disjoint rows.

    Each partial holds ``max`` (its largest score, never NaN; -inf when it saw no row), ``sum =
    sum exp(s - max)`` (NaN when it saw a NaN score) and, optionally, ``acc = sum exp(s - max) m``.

    Args:
        part_max, part_sum: partials, shape ``P + S`` (P: the partial dims the reductions remove).
        part_acc: ``P + S + [D]`` or None.
        reduce_max: elementwise max over the partials, ``P + S -> S`` (``t.amax(0)``, or an
            all_reduce MAX across ranks).
        reduce_sum: elementwise sum over the partials, ``P + S + [1 + D] -> S + [1 + D]``; called
            once, on the sums and accumulators packed together (one collective).

    Returns:
        ``CombinedLse(lse: S, wmean: S + [D] or None)``.
    """
    top = reduce_max(part_max)
    # A group empty everywhere has top -inf: a 0 pivot makes exp(-inf - 0) = 0 instead of NaN.
    pivot = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    # A partial at the (+inf) top scales by 1: exp(inf - inf) would be NaN.
    scale = torch.where(part_max == pivot, torch.ones_like(part_max), torch.exp(part_max - pivot))
    # NaN * 0 is NaN: a partial that saw a NaN score poisons its group even when scaled to 0.
    packed = (part_sum * scale)[..., None]
    if part_acc is not None:
        packed = torch.cat([packed, part_acc * scale[..., None]], dim=-1)
    packed = reduce_sum(packed)
    total = packed[..., 0]
    lse = torch.where(total == 0, torch.full_like(total, _NEG_INF), pivot + torch.log(total))
    if part_acc is None:
        return CombinedLse(lse, None)
    safe_total = torch.where(total == 0, torch.ones_like(total), total)
    return CombinedLse(lse, packed[..., 1:] / safe_total[..., None])


def local_reduce(dim: int) -> tuple[Reduce, Reduce]:
    """(reduce_max, reduce_sum) over a local dimension: the partials of one process."""
    return (lambda t: t.amax(dim=dim)), (lambda t: t.sum(dim=dim))


class TopK(NamedTuple):
    values: Tensor
    indices: Tensor


def merge_topk(values: Tensor, rows: Tensor, k: int) -> TopK:
    """The k best of candidates ``[B, C]``: value descending (NaN above +inf, as torch.topk ranks
    it), then bank row ascending; candidates with row -1 (none) go last.

    Any order of the candidates gives the same answer, so the merge does not depend on which
    split or rank produced which candidate.

    Args:
        values: ``[B, C]`` candidate scores.
        rows: ``[B, C]`` their global bank rows, -1 for an empty slot.
        k: how many to keep, ``k <= C``.

    Returns:
        ``TopK(values [B, k], indices [B, k] int64)``.
    """
    rows = rows.long()
    rank_rows = torch.where(rows >= 0, rows, torch.full_like(rows, torch.iinfo(torch.long).max))
    by_row = rank_rows.argsort(dim=1, stable=True)
    values, rows = values.gather(1, by_row), rows.gather(1, by_row)
    # A descending stable sort ranks NaN first and keeps equal values (NaNs among themselves too)
    # in the row order set above; a real -inf score precedes an empty slot (row -1, value -inf).
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return TopK(values.gather(1, by_value), rows.gather(1, by_value))
