"""N-way K-shot episodes on any feature matrix: the few-shot protocol used to judge how well
features generalise to classes never seen in training.

An episode samples ``ways`` classes, then ``shots`` support and ``queries`` query examples of each
(without replacement, disjoint). Each query is classified by its nearest class mean: the support
features are L2-normalised, averaged per class and renormalised, and the query goes to the mean
with the largest cosine similarity (prototype classification on the unit sphere). With one shot
this is exactly 1-nearest-neighbour, the paper's rule; with more shots the class mean uses every
support example with equal weight, which is the usual and the more stable choice for few shots
(a weighted kNN vote over 5 supports per class is dominated by the single nearest one).

The result is the mean accuracy over episodes and its 95% confidence interval,
``1.96 * std / sqrt(episodes)``, as few-shot papers report it. Episodes are drawn from a seeded
generator, so the same features and seed give the same number.

``python -m snca_ext.fewshot FEATURES`` (``snca_ext.apps.fewshot``) runs the episodes on a file
written by ``python -m snca_ext.export``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

Z_95 = 1.959964


@dataclass(frozen=True)
class FewShotResult:
    """Accuracy in percent: mean over ``episodes`` and the half-width of its 95% interval."""

    ways: int
    shots: int
    queries: int
    episodes: int
    mean: float
    ci95: float

    def __str__(self) -> str:
        return (
            f"{self.ways}-way {self.shots}-shot ({self.queries} queries/class, {self.episodes} episodes): "
            f"{self.mean:.2f}% ± {self.ci95:.2f}"
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def sample_episodes(
    labels: Tensor, *, ways: int, shots: int, queries: int, episodes: int, seed: int = 0
) -> Tensor:
    """Seeded N-way K-shot episodes.

    Args:
        labels: [N] integer classes. ways: classes per episode (>= 2). shots, queries: support and
            query examples per class. episodes: how many. seed: of the sampling.

    Returns:
        [episodes, ways, shots + queries] row indices into ``labels``: per episode ``ways``
        distinct classes, then for each ``shots + queries`` distinct rows of that class (support
        first).
    """
    labels = torch.as_tensor(labels).long().cpu()
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    per_class = shots + queries
    classes, counts = labels.unique(return_counts=True)
    eligible = classes[counts >= per_class]
    if len(eligible) < ways:
        raise ValueError(
            f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with at least "
            f"{per_class} examples each; only {len(eligible)} of the {len(classes)} classes have that many "
            f"(counts: {dict(zip(classes.tolist(), counts.tolist(), strict=True))})"
        )
    members = {int(c): (labels == c).nonzero().flatten() for c in eligible}
    generator = torch.Generator().manual_seed(seed)
    rows = torch.empty(episodes, ways, per_class, dtype=torch.long)
    for episode in range(episodes):
        chosen = eligible[torch.randperm(len(eligible), generator=generator)[:ways]]
        for way, c in enumerate(chosen.tolist()):
            pool = members[c]
            rows[episode, way] = pool[torch.randperm(len(pool), generator=generator)[:per_class]]
    return rows


def few_shot_accuracy(
    features: Tensor,
    labels: Tensor,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: int = 1000,
    seed: int = 0,
) -> FewShotResult:
    """Nearest-class-mean accuracy over seeded N-way K-shot episodes.

    Args:
        features: [N, D] floating point, finite (any scale: they are normalised here).
        labels: [N] integer class ids.
        ways, shots, queries: classes per episode, support and query examples per class.
        episodes: how many episodes; seed: of their sampling.

    Returns:
        ``FewShotResult`` with the mean accuracy (%) and its 95% interval.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must have an integer dtype (class ids), got {labels.dtype}")
    if features.dim() != 2 or features.shape[0] != labels.shape[0] or features.shape[1] == 0:
        raise ValueError(
            f"features must be [N, D] with N = len(labels) = {labels.shape[0]} and D >= 1, "
            f"got shape {tuple(features.shape)}"
        )
    if not features.dtype.is_floating_point:
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).nonzero()[0])
        raise ValueError(f"features must be finite, row {bad} is not")
    rows = sample_episodes(labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    accuracies = []
    # Chunks of episodes bound the memory whatever the episode count: [chunk, ways, per_class, D].
    for chunk in rows.split(256):
        x = F.normalize(features[chunk.to(features.device)].double(), dim=-1)
        support, query = x[:, :, :shots], x[:, :, shots:]
        prototypes = F.normalize(support.mean(dim=2), dim=-1)  # [E, ways, D]
        scores = torch.einsum("ewqd,evd->ewqv", query, prototypes)
        truth = torch.arange(ways, device=scores.device).view(1, ways, 1)
        accuracies.append((scores.argmax(dim=-1) == truth).double().mean(dim=(1, 2)).cpu())
    per_episode = torch.cat(accuracies) * 100.0
    std = float(per_episode.std(unbiased=True)) if episodes > 1 else 0.0
    return FewShotResult(
        ways=ways,
        shots=shots,
        queries=queries,
        episodes=episodes,
        mean=float(per_episode.mean()),
        ci95=Z_95 * std / math.sqrt(episodes),
    )
