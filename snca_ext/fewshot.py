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

``novel_class_evaluation`` is the evaluation of ``python -m snca_ext.train --holdout-classes``: the
bank is the held-out classes' training images (features recomputed by the network), the queries
their test images (weighted kNN, as the seen-class evaluation), and the episodes are drawn from all
of their images, training and test (the few-shot convention: every image of a novel class is
fair game, none was seen in training).

``python -m snca_ext.fewshot FEATURES`` runs the episodes on a file written by
``python -m snca_ext.export``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .data import DataBundle
from .knn import compute_features, knn_predict

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
    """[episodes, ways, shots + queries] row indices into ``labels``: per episode ``ways`` distinct
    classes, then for each ``shots + queries`` distinct rows of that class (support first)."""
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
    """Nearest-class-mean accuracy of ``features`` [N, D] (any scale: they are normalised here)
    over ``episodes`` seeded ``ways``-way ``shots``-shot episodes drawn from rows with ``labels``."""
    features = torch.as_tensor(features)
    if features.dim() != 2 or features.shape[0] != torch.as_tensor(labels).shape[0]:
        raise ValueError(
            f"features must be [N, D] with N = len(labels) = {torch.as_tensor(labels).shape[0]}, "
            f"got shape {tuple(features.shape)}"
        )
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


def novel_class_evaluation(
    model: nn.Module,
    novel: DataBundle,
    *,
    k: int,
    sigma: float,
    device: torch.device,
    batch_size: int = 256,
    ways: int = 5,
    shots: Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = False,
) -> dict:
    """kNN accuracy on the novel classes' test images against a bank of their training images, and
    ``ways``-way (at most the number of novel classes) few-shot accuracy for each of ``shots``."""
    bank_labels, test_labels = novel.train_plain.targets, novel.test.targets
    bank, tests = (
        compute_features(model, DataLoader(part, batch_size=batch_size), len(part), device, progress=progress)
        for part in (novel.train_plain, novel.test)
    )
    predicted = knn_predict(tests, bank, bank_labels.to(device), novel.num_classes, k, sigma, backend=backend)
    hits = predicted.cpu() == test_labels[:, None]
    classes = sorted(set(bank_labels.tolist()))
    ways = min(ways, len(classes))
    pool, pool_labels = torch.cat([bank, tests]).cpu(), torch.cat([bank_labels, test_labels])
    fewshot = [
        few_shot_accuracy(
            pool, pool_labels, ways=ways, shots=shot, queries=queries, episodes=episodes, seed=seed
        ).as_dict()
        for shot in shots
    ]
    return {
        "classes": classes,
        "bank_size": len(bank_labels),
        "test_examples": len(test_labels),
        "knn_k": k,
        "knn_top1": 100.0 * float(hits[:, 0].double().mean()),
        "fewshot": fewshot,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m snca_ext.fewshot",
        description="N-way K-shot nearest-class-mean accuracy (mean and 95%% interval over seeded "
        "episodes) of a feature file written by python -m snca_ext.export.",
    )
    parser.add_argument("features", help="a .safetensors or .pt file of python -m snca_ext.export")
    parser.add_argument("--ways", type=int, default=5, help="classes per episode (5)")
    parser.add_argument("--shots", default="1,5", help="support examples per class, comma-separated (1,5)")
    parser.add_argument("--queries", type=int, default=15, help="query examples per class (15)")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes (1000)")
    parser.add_argument("--seed", type=int, default=0, help="episode sampling seed (0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .export import ExportError, load_features

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shots = [int(part) for part in args.shots.split(",") if part.strip()]
        exported = load_features(args.features)
        for shot in shots:
            result = few_shot_accuracy(
                exported["features"],
                exported["labels"],
                ways=args.ways,
                shots=shot,
                queries=args.queries,
                episodes=args.episodes,
                seed=args.seed,
            )
            print(result)
    except (ValueError, ExportError) as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
