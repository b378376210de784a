"""Weighted k-nearest-neighbour classification on a memory bank (the paper's evaluation).

Each of the K bank rows most similar to a query votes for its class with weight exp(sim / sigma);
the class with the largest total wins (top-5: the five largest). The search is ``bank_topk``, the
same streaming pass over the bank as the loss, so no B x N matrix is built even at ImageNet size.
Everything here works on feature matrices; running a network over a data set is the
applications' job (``snca_ext.apps``). ``BankKNN`` offers the same search to
pytorch-metric-learning's ``AccuracyCalculator`` as its ``knn_func``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from .ops import TopK, bank_topk


@dataclass(frozen=True)
class KnnResult:
    """Accuracies in percent over ``count`` queries."""

    top1: float
    top5: float
    count: int

    @classmethod
    def from_counts(cls, counts: Tensor) -> KnnResult:
        """From ``knn_counts``'s ``[correct top-1, correct top-5, queries]`` (summed over chunks or
        processes)."""
        correct1, correct5, total = (int(value) for value in counts.tolist())
        if total == 0:
            raise ValueError("kNN accuracy of no query: the evaluation set is empty")
        return cls(top1=100.0 * correct1 / total, top5=100.0 * correct5 / total, count=total)


def _check_vote_arguments(bank: Tensor, bank_labels: Tensor, num_classes: int, k: int, sigma: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (neighbours that vote), got {k!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not (isinstance(sigma, Real) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not isinstance(bank_labels, Tensor) or bank_labels.shape != (bank.shape[0],):
        shape = tuple(bank_labels.shape) if isinstance(bank_labels, Tensor) else type(bank_labels).__name__
        raise ValueError(f"bank_labels must be [N={bank.shape[0]}], one class per bank row, got {shape}")
    if bank_labels.dtype.is_floating_point or bank_labels.dtype.is_complex or bank_labels.dtype == torch.bool:
        raise TypeError(f"bank_labels must have an integer dtype, got {bank_labels.dtype}")
    if bank_labels.numel() and bank_labels.device.type == "cpu":
        low, high = int(bank_labels.min()), int(bank_labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"bank_labels must be classes in [0, num_classes={num_classes}), "
                f"got {low if low < 0 else high}"
            )
    elif bank_labels.numel():  # on a GPU: checked there, no host sync
        message = f"bank_labels must be classes in [0, num_classes={num_classes})"
        torch._assert_async(((bank_labels >= 0) & (bank_labels < num_classes)).all(), message)


def knn_scores(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int,
    sigma: float,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Summed vote weights of the k nearest bank rows of each query.

    Args:
        queries: [B, D]. bank: [N, D]. bank_labels: [N] integer classes in [0, num_classes).
        k: neighbours >= 1 (capped at N). sigma: vote temperature > 0.
        exclude: [B] optional bank row each query must skip (-1 for none).

    Returns:
        [B, num_classes] scores. The weights are exp((sim - max_sim) / sigma): dividing every
        weight of a query by the same exp(max_sim / sigma) leaves its ranking of classes unchanged
        and cannot overflow at small sigma.
    """
    _check_vote_arguments(bank, bank_labels, num_classes, k, sigma)
    k = min(k, bank.shape[0])
    values, rows = bank_topk(queries, bank, k, exclude=exclude, backend=backend)
    return knn_votes(values, rows, bank_labels, num_classes, sigma)


def knn_votes(values: Tensor, rows: Tensor, bank_labels: Tensor, num_classes: int, sigma: float) -> Tensor:
    """[B, num_classes] summed vote weights of given top-k neighbours (``bank_topk``'s output:
    values [B, k] descending, rows [B, k] with -1 for a missing neighbour), as ``knn_scores``."""
    found = rows >= 0
    weights = torch.exp((values - values[:, :1]) / sigma)
    weights = torch.where(found, weights, torch.zeros_like(weights))
    votes = bank_labels.to(rows.device)[rows.clamp(min=0)]
    scores = torch.zeros(rows.shape[0], num_classes, dtype=weights.dtype, device=rows.device)
    return scores.scatter_add_(1, votes, weights)


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int,
    sigma: float,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """[B, min(5, num_classes)] predicted classes, best first (arguments as ``knn_scores``)."""
    scores = knn_scores(queries, bank, bank_labels, num_classes, k, sigma, exclude=exclude, backend=backend)
    return scores.topk(min(5, num_classes), dim=1).indices


def knn_counts(scores: Tensor, labels: Tensor) -> Tensor:
    """``[correct top-1, correct top-5, queries]`` (int64, on ``scores``' device) of vote scores
    [B, C] (``knn_votes`` / ``knn_scores``) against the true ``labels`` [B]; sums of these over
    chunks or processes give ``KnnResult.from_counts``."""
    predicted = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = predicted == labels.to(scores.device)[:, None]
    return torch.stack(
        [hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(labels.shape[0], device=scores.device)]
    ).long()


@torch.no_grad()
def knn_accuracy(
    queries: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    *,
    k: int,
    sigma: float,
    backend: str = "auto",
    chunk: int = 1024,
) -> KnnResult:
    """Top-1 / top-5 weighted kNN accuracy of ``queries`` [B, D] with true ``labels`` [B] against
    ``bank`` [N, D] with ``bank_labels`` [N], searched ``chunk`` queries at a time."""
    if not isinstance(labels, Tensor) or labels.shape != (queries.shape[0],):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be [B={queries.shape[0]}], one class per query, got {shape}")
    counts = torch.zeros(3, dtype=torch.long, device=queries.device)
    for first in range(0, queries.shape[0], chunk):
        scores = knn_scores(
            queries[first : first + chunk], bank, bank_labels, num_classes, k, sigma, backend=backend
        )
        counts += knn_counts(scores, labels[first : first + chunk])
    return KnnResult.from_counts(counts)


class BankKNN:
    """``bank_topk`` as the ``knn_func`` of pytorch-metric-learning's ``AccuracyCalculator`` (and
    any caller of its protocol), so its P@1, R-precision and MAP@R come from the streaming search::

        calculator = AccuracyCalculator(knn_func=snca_ext.BankKNN(), k="max_bin_count")
        calculator.get_accuracy(query, query_labels)  # reference = query, itself left out

    The search ranks by inner product: on L2-normalised embeddings that is the ranking by cosine
    similarity and by Euclidean distance (PML's default search). The "distances" returned are those
    inner products, largest first, as PML's search returns on an inner-product (cosine) index.

    Args:
        backend: as ``bank_topk``.
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    @torch.no_grad()
    def __call__(self, query: Tensor, k: int, reference: Tensor, ref_includes_query: bool = False) -> TopK:
        """The k reference rows most similar to each query.

        Args:
            query: [Q, D]. k: neighbours per query. reference: [R, D].
            ref_includes_query: the first Q rows of ``reference`` are the queries themselves; each
                query's own row is then left out (it still gets k neighbours).

        Returns:
            ``TopK(values, indices)``, each [Q, k]: inner products, descending, ties to the lower
            reference row, and the reference rows.
        """
        if reference is None:
            raise ValueError("reference must be given: BankKNN keeps no index of its own")
        exclude = None
        if ref_includes_query:
            if reference.shape[0] < query.shape[0]:
                raise ValueError(
                    f"ref_includes_query needs the {query.shape[0]} queries as the first rows of "
                    f"reference, which has {reference.shape[0]} rows"
                )
            exclude = torch.arange(query.shape[0], device=query.device)
        return bank_topk(query, reference.to(query.device), k, exclude=exclude, backend=self.backend)
