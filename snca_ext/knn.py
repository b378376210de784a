"""Weighted k-nearest-neighbour classification on a memory bank (the paper's evaluation).

Each of the K bank rows most similar to a query votes for its class with weight exp(sim / sigma);
the class with the largest total wins (top-5: the five largest). The search is ``bank_topk``, the
same streaming pass over the bank as the loss, so no B x N matrix is built even at ImageNet size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .ops import bank_topk


@dataclass(frozen=True)
class KnnResult:
    """Accuracies in percent over ``count`` queries."""

    top1: float
    top5: float
    count: int


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
    """[B, num_classes] summed vote weights of the k nearest bank rows of each query.

    The weights are exp((sim - max_sim) / sigma): dividing every weight of a query by the same
    exp(max_sim / sigma) leaves its ranking of classes unchanged and cannot overflow at small sigma.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    k = min(k, bank.shape[0])
    values, rows = bank_topk(queries, bank, k, exclude=exclude, backend=backend)
    return knn_votes(values, rows, bank_labels, num_classes, sigma)


def knn_votes(values: Tensor, rows: Tensor, bank_labels: Tensor, num_classes: int, sigma: float) -> Tensor:
    """[B, num_classes] summed vote weights of given top-k neighbours (``bank_topk``'s output:
    values descending, row -1 for a missing neighbour), as ``knn_scores``."""
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
    """[B, min(5, num_classes)] predicted classes, best first."""
    scores = knn_scores(queries, bank, bank_labels, num_classes, k, sigma, exclude=exclude, backend=backend)
    return scores.topk(min(5, num_classes), dim=1).indices


@torch.no_grad()
def compute_features(
    model: nn.Module, loader: DataLoader, size: int, device: torch.device, *, progress: bool = False
) -> Tensor:
    """The model's features of every example of ``loader``'s dataset, row i for dataset index i.

    The loader must yield ``(images, labels, indices)``; the model runs in eval mode and is put
    back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    features: Tensor | None = None
    try:
        for images, _, indices in tqdm(
            loader, desc="features", leave=False, disable=None if progress else True
        ):
            batch = model(images.to(device, non_blocking=True)).float()
            if features is None:
                features = torch.zeros(size, batch.shape[1], device=device)
            features[indices.to(device)] = batch
    finally:
        model.train(was_training)
    if features is None:
        raise ValueError("the loader yielded no batch: cannot compute features of an empty dataset")
    return features


@torch.no_grad()
def knn_evaluate(
    model: nn.Module,
    loader: DataLoader,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    *,
    k: int,
    sigma: float,
    device: torch.device,
    backend: str = "auto",
    progress: bool = False,
) -> KnnResult:
    """Top-1 / top-5 weighted kNN accuracy of the model's features of ``loader`` against ``bank``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    try:
        for images, labels, _ in tqdm(
            loader, desc=f"kNN k={k}", leave=False, disable=None if progress else True
        ):
            queries = model(images.to(device, non_blocking=True)).float()
            predicted = knn_predict(queries, bank, bank_labels, num_classes, k, sigma, backend=backend)
            hits = predicted == labels.to(device)[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += labels.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation loader yielded no example")
    return KnnResult(top1=100.0 * correct1 / total, top5=100.0 * correct5 / total, count=total)
