"""Plain PyTorch versions of the SNCA op: the oracle for the tests, the baseline for benchmarks.

Both materialise the B x N similarity matrix. ``snca_stats_reference`` / ``snca_loss_reference``
work in log space, so they are right at any temperature; ``snca_loss_original`` is the original
project's linear-space computation (``exp`` with no max subtraction), kept for benchmarks and to
show where it overflows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def _compute_dtype(features: Tensor) -> torch.dtype:
    return features.dtype


def _query_labels(indices: Tensor, bank_labels: Tensor, labels: Tensor | None) -> Tensor:
    if labels is not None:
        return labels.long()
    return bank_labels.long()[indices.long().clamp(min=0)]


def _self_mask(indices: Tensor, num_rows: int) -> Tensor:
    """[B, N] bool, True at each query's own bank row (none for index -1)."""
    return torch.arange(num_rows, device=indices.device)[None, :] == indices.long()[:, None]


def _masked_logsumexp(logits: Tensor, include: Tensor) -> Tensor:
    """logsumexp over the included entries of each row, -inf for a row with none.

    A row with nothing included is computed over all its entries and then replaced, so its
    backward sees finite values (logsumexp's backward of an all -inf row is NaN).
    """
    has_any = include.any(dim=1)
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
    dots = features @ bank.to(_compute_dtype(features)).T
    logits = dots / temperature
    query_labels = _query_labels(indices, bank_labels, labels)
    same = query_labels[:, None] == bank_labels.long()[None, :]
    own = _self_mask(indices, bank.shape[0])
    lse_same = _masked_logsumexp(logits, same & ~own)
    lse_other = _masked_logsumexp(logits, ~same & ~own)
    values, rows = topk_reference(dots, own, topk)
    return lse_same, lse_other, values, rows


def topk_reference(dots: Tensor, exclude_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row of ``dots``, excluded entries skipped, sorted descending with ties to the
    lower column; -inf / -1 pad a row with fewer than k eligible entries."""
    masked = dots.detach().masked_fill(exclude_mask, _NEG_INF)
    # A stable sort keeps equal values in column order: ties go to the lower bank row.
    _, order = torch.sort(masked, dim=1, descending=True, stable=True)
    rows = order[:, :k]
    values = dots.gather(1, rows)
    excluded = exclude_mask.gather(1, rows)
    values = values.masked_fill(excluded, _NEG_INF)
    rows = rows.masked_fill(excluded, -1)
    return values, rows


def bank_topk_reference(
    queries: Tensor, bank: Tensor, k: int, *, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    dots = queries @ bank.to(queries.dtype).T
    if exclude is None:
        exclude_mask = torch.zeros_like(dots, dtype=torch.bool)
    else:
        exclude_mask = _self_mask(exclude, bank.shape[0])
    return topk_reference(dots, exclude_mask, k)


def loss_from_lse_reference(lse_same: Tensor, lse_other: Tensor, margin: float, reduction: str) -> Tensor:
    """-log(P e^-margin / (P e^-margin + Q)) per row, 0 for a row with no positive."""
    positive_logit = lse_same - margin
    has_positive = lse_same != _NEG_INF
    safe_positive = torch.where(has_positive, positive_logit, torch.zeros_like(positive_logit))
    per_row = torch.logaddexp(safe_positive, lse_other) - safe_positive
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
