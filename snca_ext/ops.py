"""Public functional API of the fused SNCA op; its argument checks are in ``snca_ext.checks``, the
backend choice in ``snca_ext.backends``.

The kernels are registered with the PyTorch dispatcher (csrc/ops.cpp, csrc/cpu, csrc/cuda; the
Triton twins in snca_ext/triton), so one Python function serves every device; ``backend`` only
chooses between implementations for the same device.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from . import reference
from .backends import BACKENDS, available_backends, kernel_op, resolve_backend  # noqa: F401 (also ops.X)
from .checks import (
    check_features_and_bank,
    check_index_tensor,
    check_k,
    check_rows_in_bank,
    check_temperature,
)


class SNCAStats(NamedTuple):
    """What ``snca_stats`` returns (a tuple, like ``torch.topk``'s result)."""

    lse_same: Tensor  # [B] log-sum-exp of <f_i, m_j> / T over same-class rows (-inf: none)
    lse_other: Tensor  # [B] the same over other-class rows
    topk_values: Tensor  # [B, k] the k largest inner products (not divided by T), descending
    topk_indices: Tensor  # [B, k] their bank rows, -1 where fewer than k rows are eligible


class TopK(NamedTuple):
    """What ``bank_topk`` returns (a tuple, like ``torch.topk``'s result)."""

    values: Tensor  # [B, k] inner products, descending
    indices: Tensor  # [B, k] bank rows, ties to the lower row; -1 where none is left


class SNCAPartials(NamedTuple):
    """What ``snca_partials`` returns: the log-sum-exps and the softmax-weighted mean bank rows
    from which partial results over disjoint blocks of a bank are combined exactly."""

    lse_same: Tensor  # [B]
    lse_other: Tensor  # [B]
    wmean_same: Tensor  # [B, D] when with_grad, else [0, D]
    wmean_other: Tensor  # [B, D] when with_grad, else [0, D]


REDUCTIONS = ("mean", "sum", "none")
_NEG_INF = float("-inf")


def _in_accumulation_dtype(features: Tensor) -> Tensor:
    """bfloat16/float16 features in float32, the kernels' accumulation dtype (a differentiable
    cast: their gradient comes back in their own dtype); float32/float64 as they are. Under
    ``torch.autocast`` a network's bf16/fp16 output arrives here and is handled the same way."""
    return features.float() if features.dtype in (torch.bfloat16, torch.float16) else features


def _prepare(features, indices, bank, bank_labels, temperature, labels, backend):
    check_features_and_bank(features, bank, "features")
    batch, bank_rows = features.shape[0], bank.shape[0]
    indices = check_index_tensor(indices, "indices", batch, "B")
    bank_labels = check_index_tensor(bank_labels, "bank_labels", bank_rows, "N")
    temperature = check_temperature(temperature)
    for name, tensor in (("indices", indices), ("bank_labels", bank_labels)):
        if tensor.device != features.device:
            raise ValueError(f"{name} is on {tensor.device} but features is on {features.device}")
    check_rows_in_bank(indices, "indices", bank_rows)
    if labels is None:
        message = (
            "labels must be given when a query has no bank row (indices contains -1): "
            "its class cannot be read from bank_labels"
        )
        if torch.compiler.is_compiling() or indices.device.type != "cpu":  # no host sync (see above)
            torch._assert_async((indices >= 0).all(), message)
        elif bool((indices < 0).any()):
            raise ValueError(message)
        labels = bank_labels[indices.clamp(min=0)]
    else:
        labels = check_index_tensor(labels, "labels", batch, "B")
        if labels.device != features.device:
            raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    backend = resolve_backend(backend, features.device)
    if backend == "reference":
        features = _in_accumulation_dtype(features)
    return features, indices, bank_labels, labels, temperature, backend


def _stats(features, indices, bank, bank_labels, temperature, labels, topk, backend, want_grad) -> SNCAStats:
    """(lse_same, lse_other, topk_values, topk_indices) from the chosen backend."""
    if backend == "reference":
        return SNCAStats(
            *reference.snca_stats_reference(
                features, indices, bank, bank_labels, temperature, labels=labels, topk=topk
            )
        )
    with_grad = want_grad and torch.is_grad_enabled() and features.requires_grad
    lse_same, lse_other, _, _, values, rows = kernel_op("snca_forward", backend)(
        features, labels, indices, bank, bank_labels, temperature, with_grad, topk
    )
    return SNCAStats(lse_same, lse_other, values, rows)


# ----------------------------------------------------------------------------- public API


def snca_loss(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    margin: float = 0.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The SNCA loss of a batch against the memory bank, in one streaming pass.

    ``loss_i = -log(P_i e^-margin / (P_i e^-margin + Q_i))`` with ``P_i``, ``Q_i`` the same-class
    and other-class sums of ``exp(<f_i, m_j> / T)`` over the bank, the query's own row
    ``indices[i]`` excluded (README, "How it works"). A row with no positive contributes 0.
    The bank gets no gradient.

    Args:
        features: [B, D] query features (L2-normalise them first): float32 or float64, or
            bfloat16/float16 (e.g. a network's output under ``torch.autocast``): their dtype
            decides the products, as autocast does (the bank is read in it; the GPU backends
            multiply on 16-bit tensor cores, the CPU and the reference in float32), accumulation
            and the softmax state are float32, the loss is float32 and the gradient comes back
            in the features' dtype.
        indices: [B] integer, each query's own bank row, or -1 for a query with no row (which
            then needs ``labels``).
        bank: [N, D] the memory bank: float64 with float64 features, else float32, bfloat16
            or float16; it must not require grad.
        bank_labels: [N] integer class of every bank row.
        temperature: T > 0.
        margin: subtracted from the positives' logits (logit units, i.e. already divided by T).
        labels: [B] integer classes of the queries (default: ``bank_labels[indices]``).
        reduction: "mean" (sum over rows / B, the original's convention), "sum" or "none".
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        The loss: a scalar, or [B] with ``reduction="none"``; differentiable in ``features``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(margin, bool) or not isinstance(margin, Real) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    lse_same, lse_other, _, _ = _stats(
        features, indices, bank, bank_labels, temperature, labels, 0, backend, want_grad=True
    )
    return loss_from_lse(lse_same, lse_other, float(margin), reduction)


def loss_from_lse(
    lse_same: Tensor, lse_other: Tensor, margin: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """SNCA loss from the per-query same-class and other-class log-sum-exps (logit units).

    ``softplus(lse_other - lse_same + margin)``, which is ``-log(P e^-mu / (P e^-mu + Q))``
    without cancellation; 0 (and a zero gradient) for a row with no positive.

    Args:
        lse_same, lse_other: [B] as returned by ``snca_stats``.
        margin: in logit units. reduction: "mean" (sum / B), "sum" or "none".

    Returns:
        A scalar, or [B] with ``reduction="none"``.
    """
    has_positive = lse_same != _NEG_INF
    # Rows without a positive go through softplus with a harmless 0, so their gradient is 0, not NaN.
    gap = torch.where(has_positive, lse_other - lse_same + margin, torch.zeros_like(lse_same))
    threshold = 50.0 if gap.dtype == torch.float64 else 20.0
    per_row = torch.where(has_positive, F.softplus(gap, threshold=threshold), torch.zeros_like(gap))
    return reference.reduce_rows(per_row, reduction)


def snca_stats(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    topk: int = 0,
    backend: str = "auto",
) -> SNCAStats:
    """Per-query statistics of one pass over the bank: the loss's log-sum-exps and a top-k.

    The query's own row is excluded everywhere. Differentiable in ``features`` (the lses and the
    top-k values).

    Args:
        features, indices, bank, bank_labels, temperature, labels, backend: as ``snca_loss``.
        topk: k in [0, N], the number of nearest bank rows to return beside the sums.

    Returns:
        ``SNCAStats(lse_same, lse_other, topk_values, topk_indices)``: [B] log-sum-exps of
        ``<f_i, m_j> / T`` over same-class and other-class rows (-inf for an empty group); [B, k]
        the k largest inner products ``<f_i, m_j>`` (not divided by T), descending, ties to the
        lower bank row, and their rows; where fewer than k rows are eligible the tail is -inf
        with row -1.
    """
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    topk = check_k(topk, "topk", bank.shape[0])
    return _stats(features, indices, bank, bank_labels, temperature, labels, topk, backend, want_grad=True)


def bank_topk(
    queries: Tensor,
    bank: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> TopK:
    """The k bank rows with the largest inner product with each query, in one streaming pass.

    Args:
        queries: [B, D] float32 or float64, or bfloat16/float16 (computed in float32).
        bank: [N, D], dtype as for ``snca_loss``.
        k: in [0, N].
        exclude: [B] integer, optional: a bank row query i must not return (its own), -1 for none.
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        ``TopK(values, indices)``, each [B, k]: values descending, ties to the lower bank row;
        where fewer than k rows are eligible the tail is -inf with index -1. ``values`` is
        differentiable in ``queries``.
    """
    check_features_and_bank(queries, bank, "queries")
    k = check_k(k, "k", bank.shape[0])
    batch, bank_rows = queries.shape[0], bank.shape[0]
    if exclude is None:
        exclude = torch.full((batch,), -1, dtype=torch.long, device=queries.device)
    else:
        exclude = check_index_tensor(exclude, "exclude", batch, "B")
        if exclude.device != queries.device:
            raise ValueError(f"exclude is on {exclude.device} but queries is on {queries.device}")
        check_rows_in_bank(exclude, "exclude", bank_rows)
    backend = resolve_backend(backend, queries.device)
    queries = _in_accumulation_dtype(queries)
    if backend == "reference":
        return TopK(*reference.bank_topk_reference(queries, bank, k, exclude=exclude))
    return TopK(*kernel_op("bank_topk", backend)(queries, bank, k, exclude))


def snca_partials(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    with_grad: bool = False,
    backend: str = "auto",
) -> SNCAPartials:
    """The raw statistics of one pass over a block of the bank, for exact combines over blocks
    (the sharded bank of ``snca_ext.distributed``); not differentiable: the caller builds the
    gradient from the combined weighted means (``d lse / d f = wmean / T``).

    Args:
        as ``snca_loss``; ``with_grad`` also accumulates the weighted means. ``backend`` must be a
        fused one (the reference does not compute the weighted means).

    Returns:
        ``SNCAPartials(lse_same, lse_other, wmean_same, wmean_other)``.
    """
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    if backend == "reference":
        raise ValueError("snca_partials needs a fused backend (cpu, cuda or triton), got 'reference'")
    with torch.no_grad():
        lse_same, lse_other, wmean_same, wmean_other, _, _ = kernel_op("snca_forward", backend)(
            features.detach(), labels, indices, bank, bank_labels, temperature, bool(with_grad), 0
        )
    return SNCAPartials(lse_same, lse_other, wmean_same, wmean_other)
