"""kNN evaluation of a network during and after training, one code path for one process and for
many (a single process is the world of size one, where every collective is the identity).

The test set is split over the processes in contiguous blocks; each computes its block's features
and searches the bank (its own block of rows when the bank is sharded: the search is then
collective), and the hit counts are summed over the processes, so every process gets the same
result. ``novel_class_evaluation`` is the evaluation of ``--holdout-classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from snca_ext import (
    KnnResult,
    MemoryBank,
    few_shot_accuracy,
    knn_accuracy,
    knn_counts,
    knn_votes,
)
from snca_ext import distributed as dist

from ..data import DataBundle
from ..features import compute_features


def _block_features(
    model: nn.Module, dataset, device: torch.device, dim: int, **loader
) -> tuple[Tensor, Tensor]:
    """Features and labels of this process's contiguous block of ``dataset``."""
    start, end = dist.shard_range(len(dataset), dist.rank(), dist.world_size())
    return compute_features(model, Subset(dataset, range(start, end)), device, dim=dim, **loader)


def bank_features(
    model: nn.Module,
    dataset,
    *,
    sharded: bool,
    dim: int,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
) -> Tensor:
    """The model's features of the whole training set (the bank recomputed from the network),
    computed one contiguous block per process: the process's own bank block when ``sharded``,
    else the whole bank on every process."""
    features, _ = _block_features(
        model, dataset, device, dim, batch_size=batch_size, workers=workers, progress=progress
    )
    return features if sharded else dist.all_gather_cat(features)


@torch.no_grad()
def knn_evaluate(
    model: nn.Module,
    dataset,
    memory: MemoryBank,
    num_classes: int,
    *,
    k: int,
    sigma: float,
    device: torch.device,
    bank: Tensor | None = None,
    bank_labels: Tensor | None = None,
    batch_size: int = 256,
    workers: int = 0,
    backend: str = "auto",
    chunk: int = 1024,
    progress: bool = False,
) -> KnnResult:
    """Weighted kNN accuracy of the model's features of ``dataset`` (the test set) against
    ``memory`` (``bank`` replaces its rows: the whole bank, or this process's block when the bank
    is sharded; ``bank_labels`` [N] replaces the labels the rows vote with, e.g. the fine classes
    of a bank trained on coarse ones, with ``num_classes`` and the dataset's labels to match)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    queries, labels = _block_features(
        model, dataset, device, memory.dim, batch_size=batch_size, workers=workers, progress=progress
    )
    k = min(k, memory.size)
    # A sharded search is collective: every process runs the same number of chunks, some empty.
    chunks = -(-max(dist.gather_sizes(queries.shape[0], device)) // chunk)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    for first in range(0, chunks * chunk, chunk):
        values, rows = memory.topk(queries[first : first + chunk], k, bank=bank, backend=backend)
        scores = knn_votes(
            values, rows, memory.labels if bank_labels is None else bank_labels, num_classes, sigma
        )
        counts += knn_counts(scores, labels[first : first + chunk])
    return KnnResult.from_counts(dist.all_reduce(counts))


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module,
    dataset,
    head_of_class: Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
) -> KnnResult:
    """Top-1 / top-5 accuracy of the model's classifier head (``--loss softmax`` or
    ``cosine-softmax``) on ``dataset``;
    ``head_of_class[c]`` is the head output of class c. Summed over processes like the kNN."""
    logits, labels = _block_features(
        model, dataset, device, 0, batch_size=batch_size, workers=workers, logits=True
    )
    counts = torch.zeros(3, dtype=torch.long, device=device)
    if logits.shape[0]:
        truth = head_of_class.to(device)[labels]
        counts += knn_counts(logits, truth)
    return KnnResult.from_counts(dist.all_reduce(counts))


def most_ways(classes: Sequence[int], groups: Tensor | None) -> int:
    """The most classes a few-shot episode can draw from ``classes``: all of them, or with
    ``groups`` (a group id per class id) those of the largest group."""
    if groups is None:
        return len(classes)
    return int(groups.cpu()[torch.as_tensor(list(classes), dtype=torch.long)].bincount().max())


def novel_class_evaluation(
    model: nn.Module,
    novel: DataBundle,
    *,
    k: int,
    sigma: float,
    device: torch.device,
    batch_size: int = 256,
    ways: Sequence[int] = (5,),
    shots: Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    groups: Tensor | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """kNN accuracy on the novel classes' test images against a bank of their training images
    (features recomputed by the network), and few-shot accuracy for each of ``ways`` x ``shots``,
    with episodes drawn from all of their images, training and test (the few-shot convention:
    none was seen in training). ``groups`` [num_classes] (a group id per class, e.g. Omniglot's
    alphabets): each episode's classes come from one group. A ``ways`` larger than the classes
    available (in one group) is lowered to that count."""
    (bank, bank_labels), (tests, test_labels) = (
        compute_features(model, part, device, batch_size=batch_size, progress=progress)
        for part in (novel.train_plain, novel.test)
    )
    knn = knn_accuracy(
        tests, test_labels, bank, bank_labels, novel.num_classes, k=k, sigma=sigma, backend=backend
    )
    classes = sorted(set(bank_labels.tolist()))
    pool, pool_labels = torch.cat([bank, tests]).cpu(), torch.cat([bank_labels, test_labels]).cpu()
    pool_groups = None if groups is None else groups.cpu()[pool_labels]
    largest = most_ways(classes, groups)
    fewshot = [
        few_shot_accuracy(
            pool,
            pool_labels,
            ways=way,
            shots=shot,
            queries=queries,
            episodes=episodes,
            seed=seed,
            groups=pool_groups,
        ).as_dict()
        for way in dict.fromkeys(min(way, largest) for way in ways)
        for shot in shots
    ]
    return {
        "classes": classes,
        "bank_size": len(bank_labels),
        "test_examples": len(test_labels),
        "knn_k": min(k, len(bank_labels)),  # the K used: the bank may hold fewer rows
        "knn_top1": knn.top1,
        "fewshot": fewshot,
    }
