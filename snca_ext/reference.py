"""Plain PyTorch versions of the SNCA op: the oracle for the tests, the baseline for benchmarks.

Both materialise the B x N similarity matrix. ``snca_stats_reference`` / ``snca_loss_reference``
work in log space, so they are right at any temperature; ``snca_loss_original`` is the original
project's linear-space computation (``exp`` with no max subtraction), kept for benchmarks and to
show where it overflows. The reference is plain PyTorch, so it also differentiates twice.

Non-finite inputs: the contract that every backend follows
-----------------------------------------------------------
With the scores ``s_ij = <f_i, m_j> / T`` over the bank rows ``j != indices[i]`` (an inf or NaN
in ``f_i`` or ``m_j`` makes ``s_ij`` +inf, -inf or NaN under IEEE arithmetic):

- **Log-sum-exps.** Each group's lse (same class, other classes) is the exact IEEE log-sum-exp of
  its scores: NaN if any score in the group is NaN; else +inf if any is +inf; -inf scores
  contribute nothing (a group of only -inf scores, or an empty one, gives -inf). The other group
  of the same query and every other query are unaffected. The query's own row is excluded
  everywhere, so whatever it holds changes nothing.
- **Loss.** It follows from the lses: ``softplus(lse_other - lse_same + margin)``, so a NaN lse
  gives NaN, an other-class lse of +inf gives +inf, a same-class lse of +inf (other finite) gives
  0; a row with no positive (``lse_same = -inf``) contributes 0 whatever ``lse_other`` is.
- **Top-k.** Ranked as ``torch.topk`` ranks: NaN above +inf, +inf above every number, -inf last
  among the eligible rows (but still returned with its row); ties to the lower bank row; the
  -inf / -1 padding comes after every eligible row.
- **Gradients** (features only). ``d lse / d f_i`` is the softmax-weighted mean of the group's bank
  rows divided by T, over the rows with a finite score; a row whose weight is exactly 0 (a -inf
  score, the other group, the own row) contributes nothing, even when it holds inf or NaN. It is
  NaN in every component when the lse is NaN or +inf, and 0 when the lse is -inf. The gradient of
  a top-k value ``<q_i, m_j>`` is ``m_j`` (IEEE: a non-finite selected row gives non-finite
  components); padding entries contribute nothing. The upstream gradients combine these under
  IEEE arithmetic (``0 * NaN = NaN``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

_NEG_INF = float("-inf")


def _query_labels(indices: Tensor, bank_labels: Tensor, labels: Tensor | None) -> Tensor:
    if labels is not None:
        return labels.long()
    return bank_labels.long()[indices.long().clamp(min=0)]


def _self_mask(indices: Tensor, num_rows: int) -> Tensor:
    """[B, N] bool, True at each query's own bank row (none for index -1)."""
    return torch.arange(num_rows, device=indices.device)[None, :] == indices.long()[:, None]


def _inner_products(features: Tensor, bank: Tensor) -> Tensor:
    """``features @ bank.T`` whose gradient takes nothing from a non-finite bank row where that row
    gets a zero weight (a plain matmul backward would give ``0 * inf = NaN``); where its weight is
    NaN (its score is +inf or NaN), the gradient is NaN, as the contract says."""
    bank = bank.to(features.dtype)
    finite_rows = torch.isfinite(bank).all(dim=1)
    if bool(finite_rows.all()):
        return features @ bank.T
    dots = features @ bank.masked_fill(~finite_rows[:, None], 0).T
    # Value 0, gradient (sum of the upstream) * 0: NaN exactly where a non-finite row got a NaN
    # weight. nan_to_num's backward multiplies by isfinite, which keeps that NaN.
    carrier = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1, keepdim=True) * 0.0
    return torch.where(finite_rows, dots, features.detach() @ bank.T + carrier)


def _masked_logsumexp(logits: Tensor, include: Tensor) -> Tensor:
    """logsumexp over the included entries of each row, -inf for a row with none.

    A row with nothing included but -inf scores is computed over all its entries and then
    replaced, so its backward sees finite values (logsumexp's backward of an all -inf row is NaN)
    and its gradient is 0.
    """
    has_any = (include & (logits != _NEG_INF)).any(dim=1)
    safe_include = include | ~has_any[:, None]
    lse = torch.logsumexp(logits.masked_fill(~safe_include, _NEG_INF), dim=1)
    return torch.where(has_any, lse, torch.full_like(lse, _NEG_INF))


def snca_stats_reference(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    topk: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse_same, lse_other, topk_values, topk_indices), conventions as ``snca_ext.snca_stats``."""
    dots = _inner_products(features, bank)
    logits = dots / temperature
    query_labels = _query_labels(indices, bank_labels, labels)
    same = query_labels[:, None] == bank_labels.long()[None, :]
    own = _self_mask(indices, bank.shape[0])
    lse_same = _masked_logsumexp(logits, same & ~own)
    lse_other = _masked_logsumexp(logits, ~same & ~own)
    values, rows = topk_reference(dots, own, topk, features, bank)
    return lse_same, lse_other, values, rows


def snca_partials_autocast_reference(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse_same, lse_other, wmean_same, wmean_other) as plain PyTorch computes them under
    ``torch.autocast`` in the dtype of bfloat16/float16 ``features``: 16-bit products with float32
    output (the bank rounded to the features' dtype), float32 softmax and log-sum-exps, the
    weighted sums as ``P.to(dtype) @ M.to(dtype)`` with float32 output. The yardstick of the GPU
    backends' 16-bit path (at least as accurate as this, against float64)."""
    dtype = features.dtype
    bank16 = bank.to(dtype).float()
    logits = (features.float() @ bank16.T) / temperature
    same = _query_labels(indices, bank_labels, labels)[:, None] == bank_labels.long()[None, :]
    own = _self_mask(indices, bank.shape[0])
    out = []
    for member in (same & ~own, ~same & ~own):
        lse = _masked_logsumexp(logits, member)
        weights = torch.where(member & (lse[:, None] > _NEG_INF), torch.exp(logits - lse[:, None]), 0.0)
        out.append((lse, weights.to(dtype).float() @ bank16))
    (lse_same, wmean_same), (lse_other, wmean_other) = out
    return lse_same, lse_other, wmean_same, wmean_other


def topk_reference(
    dots: Tensor, exclude_mask: Tensor, k: int, queries: Tensor | None = None, bank: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Top k of each row of ``dots``, excluded entries skipped, sorted descending (NaN first, as
    ``torch.topk``) with ties to the lower column; -inf / -1 pad a row with fewer than k eligible
    entries, after every eligible one.

    With ``queries`` that require grad (and their ``bank``), the values are recomputed from the k
    selected rows, so that only those rows enter the gradient (the contract's top-k gradient).
    """
    masked = dots.detach().masked_fill(exclude_mask, _NEG_INF)
    # Stable sorts: equal values keep column order (ties go to the lower bank row), and then the
    # excluded entries move behind every eligible one, -inf scores included. With at most `extra`
    # excluded entries in a row, its k best eligible ones are among its first k + extra.
    _, order = torch.sort(masked, dim=1, descending=True, stable=True)
    extra = int(exclude_mask.sum(dim=1).max()) if exclude_mask.numel() else 0
    head = order[:, : k + extra]
    _, eligible_first = torch.sort(exclude_mask.gather(1, head).to(torch.uint8), dim=1, stable=True)
    rows = head.gather(1, eligible_first)[:, :k]
    excluded = exclude_mask.gather(1, rows)
    if queries is not None and queries.requires_grad:
        selected = bank[rows].to(queries.dtype).masked_fill(excluded[..., None], 0)
        values = torch.einsum("bd,bkd->bk", queries, selected)
    else:
        values = dots.gather(1, rows)
    values = values.masked_fill(excluded, _NEG_INF)
    rows = rows.masked_fill(excluded, -1)
    return values, rows


def bank_topk_reference(
    queries: Tensor, bank: Tensor, k: int, *, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    dots = queries.detach() @ bank.to(queries.dtype).T
    if exclude is None:
        exclude_mask = torch.zeros_like(dots, dtype=torch.bool)
    else:
        exclude_mask = _self_mask(exclude, bank.shape[0])
    return topk_reference(dots, exclude_mask, k, queries, bank)


def loss_from_lse_reference(lse_same: Tensor, lse_other: Tensor, margin: float, reduction: str) -> Tensor:
    """-log(P e^-margin / (P e^-margin + Q)) per row, 0 for a row with no positive.

    Computed as -logsigmoid(lse_same - margin - lse_other), which is exact at either infinity
    (0 for lse_same = +inf, +inf for lse_other = +inf) where logaddexp(a, b) - a gives inf - inf.
    """
    has_positive = lse_same != _NEG_INF
    # Rows without a positive go through logsigmoid with a harmless 0: lse_other gets no gradient.
    gap = torch.where(has_positive, lse_same - margin - lse_other, torch.zeros_like(lse_same))
    per_row = -F.logsigmoid(gap)
    return reduce_rows(torch.where(has_positive, per_row, torch.zeros_like(per_row)), reduction)


def reduce_rows(per_row: Tensor, reduction: str) -> Tensor:
    """``"none"``, ``"sum"``, or ``"mean"`` as the original: the sum over rows divided by B, rows
    without a positive (loss 0) included."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / per_row.shape[0]


def snca_loss_reference(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    margin: float = 0.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    lse_same, lse_other, _, _ = snca_stats_reference(
        features, indices, bank, bank_labels, temperature, labels=labels
    )
    return loss_from_lse_reference(lse_same, lse_other, margin, reduction)


def snca_loss_original(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    margin: float = 0.0,
) -> Tensor:
    """The original project's loss (LinearAverage + NCACrossEntropy), linear-space ``exp``.

    Overflows to inf/NaN once a similarity exceeds ~88 * T in float32 (T below ~0.011 for unit
    vectors); here for benchmarks and comparison only.
    """
    batch_size = features.shape[0]
    logits = features @ bank.to(features.dtype).T / temperature
    exp = torch.exp(logits)
    query_labels = bank_labels[indices]
    same = (query_labels[:, None] == bank_labels[None, :]).to(exp.dtype)
    exp = exp.scatter(1, indices[:, None], 0)  # the original's self exclusion
    positive = (exp * same).sum(dim=1)
    total = exp.sum(dim=1)
    other = total - positive
    positive = positive / math.exp(margin)
    prob = positive / (other + positive)
    kept = prob[prob != 0]
    return -kept.log().sum() / batch_size
