"""What a run writes beside its checkpoint: ``metrics.csv`` (one row per epoch), ``curves.png``
(loss and kNN monitor per epoch) and ``summary.json``, each written atomically."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snca_ext import KnnResult

from ..files import atomic_write, write_text_atomic

METRIC_FIELDS = ("epoch", "lr", "memory_momentum", "loss", "knn1_top1")


def _format(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_metrics(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``metrics.csv``: one row per epoch with ``METRIC_FIELDS``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row[key]) for key in METRIC_FIELDS})
    write_text_atomic(path, buffer.getvalue())


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """``summary.json``."""
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """``curves.png``: training loss and kNN-1 test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    loss_axes.plot(epochs, [row["loss"] for row in rows], marker=".")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    accuracy_axes.plot(epochs, [row["knn1_top1"] for row in rows], marker=".", color="tab:green")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 (%)", title="kNN-1 accuracy (test vs bank)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    with atomic_write(path) as file:
        file.write(buffer.getvalue())


def summary_line(knn_k: int, knn_sigma: float, result: KnnResult, recomputed: bool, epochs: int) -> str:
    """The one line a run ends with."""
    bank = "bank recomputed from the network" if recomputed else "memory bank"
    return (
        f"kNN (K={knn_k}, sigma={knn_sigma:g}, {bank}) after {epochs} epochs on "
        f"{result.count} test examples: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%"
    )
