"""N-way K-shot episodes on any feature matrix: the few-shot protocol used to judge how well
features generalise to classes never seen in training.

An episode samples ``ways`` classes, then ``shots`` support and ``queries`` query examples of each
(without replacement, disjoint). Each query is classified by its nearest class mean: the support
features are L2-normalised, averaged per class and renormalised, and the query goes to the mean
with the largest cosine similarity (prototype classification on the unit sphere). With one shot
this is exactly 1-nearest-neighbour, the paper's rule; with more shots the class mean uses every
support example with equal weight, which is the usual and the more stable choice for few shots
(a weighted kNN vote over 5 supports per class is dominated by the single nearest one).

With ``groups`` (a group id per example, the same for every example of a class: Omniglot's
alphabets), every episode draws its ``ways`` classes from one group, chosen uniformly among the
groups that have ``ways`` classes with enough examples: the within-alphabet protocol of Lake et al.
(Science 2015), harder than drawing across alphabets, whose characters differ more.

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
    within_groups: bool = False

    def __str__(self) -> str:
        within = ", classes of one group" if self.within_groups else ""
        return (
            f"{self.ways}-way {self.shots}-shot ({self.queries} queries/class, {self.episodes} episodes"
            f"{within}): {self.mean:.2f}% ± {self.ci95:.2f}"
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _group_of_class(labels: Tensor, groups: Tensor | None) -> dict[int, int] | None:
    """``{class: group}`` of per-example ``groups``; ValueError unless each class has one group."""
    if groups is None:
        return None
    groups = torch.as_tensor(groups)
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"groups must have an integer dtype (group ids), got {groups.dtype}")
    if groups.shape != labels.shape:
        raise ValueError(
            f"groups must hold one group id per example, shape {tuple(labels.shape)} like labels, "
            f"got {tuple(groups.shape)}"
        )
    pairs = torch.stack([labels, groups.long().cpu()], dim=1).unique(dim=0)
    classes, counts = pairs[:, 0].unique(return_counts=True)
    if bool((counts > 1).any()):
        split = int(classes[counts > 1][0])
        found = pairs[pairs[:, 0] == split, 1].tolist()
        raise ValueError(
            f"groups must give every example of a class the same group; class {split} has {found}"
        )
    return dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), strict=True))


def sample_episodes(
    labels: Tensor,
    *,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    groups: Tensor | None = None,
) -> Tensor:
    """Seeded N-way K-shot episodes.

    Args:
        labels: [N] integer classes. ways: classes per episode (>= 2). shots, queries: support and
            query examples per class. episodes: how many. seed: of the sampling.
        groups: None, or [N] integer group ids, the same for every example of a class: each
            episode then draws its classes from one group (uniformly among the groups with at
            least ``ways`` classes of ``shots + queries`` examples).

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
    group_of = _group_of_class(labels, groups)
    per_class = shots + queries
    classes, counts = labels.unique(return_counts=True)
    eligible = classes[counts >= per_class]
    if len(eligible) < ways:
        raise ValueError(
            f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with at least "
            f"{per_class} examples each; only {len(eligible)} of the {len(classes)} classes have that many "
            f"(counts: {dict(zip(classes.tolist(), counts.tolist(), strict=True))})"
        )
    if group_of is None:
        pools = [eligible]
    else:
        in_group: dict[int, list[int]] = {}
        for c in eligible.tolist():
            in_group.setdefault(group_of[c], []).append(c)
        pools = [torch.tensor(members) for _, members in sorted(in_group.items()) if len(members) >= ways]
        if not pools:
            sizes = {group: len(members) for group, members in sorted(in_group.items())}
            raise ValueError(
                f"{ways}-way episodes within one group need a group with {ways} classes of at least "
                f"{per_class} examples; the largest has {max(sizes.values())} (classes per group: {sizes})"
            )
    members = {int(c): (labels == c).nonzero().flatten() for c in eligible}
    generator = torch.Generator().manual_seed(seed)
    rows = torch.empty(episodes, ways, per_class, dtype=torch.long)
    for episode in range(episodes):
        pool = (
            pools[int(torch.randint(len(pools), (1,), generator=generator))] if len(pools) > 1 else pools[0]
        )
        chosen = pool[torch.randperm(len(pool), generator=generator)[:ways]]
        for way, c in enumerate(chosen.tolist()):
            examples = members[c]
            rows[episode, way] = examples[torch.randperm(len(examples), generator=generator)[:per_class]]
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
    groups: Tensor | None = None,
) -> FewShotResult:
    """Nearest-class-mean accuracy over seeded N-way K-shot episodes.

    Args:
        features: [N, D] floating point, finite (any scale: they are normalised here).
        labels: [N] integer class ids.
        ways, shots, queries: classes per episode, support and query examples per class.
        episodes: how many episodes; seed: of their sampling.
        groups: None, or [N] integer group ids (the same for every example of a class): every
            episode's classes come from one group (``sample_episodes``).

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
    rows = sample_episodes(
        labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed, groups=groups
    )
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
        within_groups=groups is not None,
    )
