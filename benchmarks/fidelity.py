"""The paper's claims on real data, SNCA against the softmax baseline and the baselines that tell.

    python -m benchmarks.fidelity                              Fashion-MNIST, 3 seeds, the recipe
    python -m benchmarks.fidelity --train-limit 10000 --epochs 4 --seeds 0   a reduced protocol
    python -m benchmarks.fidelity --dataset digits --experiments novel

Experiments (``--experiments``, comma-separated), each run with ``--loss snca`` and ``--loss
softmax`` (the same network and schedule with a linear classifier on the embedding) once per seed,
through ``python -m snca_ext.train``:

- ``classes``: train on every class; kNN top-1 (K = 30) against the bank recomputed from the final
  network and against the memory bank (the original's protocol), and the softmax run's own
  classifier head.
- ``coarse``: sub-category discovery: train on the coarse classes (``--train-labels coarse``) and
  report kNN top-1 with the fine classes, which the features were never told.
- ``novel``: hold out the last half of the classes (``--holdout-classes``); kNN top-1 on them
  against a bank of their training images, and 5-way 1-shot / 5-shot accuracy (nearest class mean).

Beside the trained networks, two baselines get the same evaluations: the untrained network (the
same architecture and seed, no step taken) and the raw pixels (L2-normalised, cosine). Prints one
markdown table (mean ± std over seeds, time per training run) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from snca_ext import few_shot_accuracy, knn_accuracy
from snca_ext.apps.data import build_data
from snca_ext.apps.features import compute_features
from snca_ext.apps.models import build_model
from snca_ext.apps.train.config import COMMON_DEFAULTS, RECIPES

LOSSES = ("snca", "softmax")
EXPERIMENTS = ("classes", "coarse", "novel")
COLUMNS = {
    "classes": (
        ("kNN top-1", "knn"),
        ("kNN top-1, memory bank", "knn_memory"),
        ("classifier head top-1", "head"),
    ),
    "coarse": (("fine-label kNN top-1 (trained on coarse)", "fine_knn"),),
    "novel": (
        ("novel kNN top-1", "novel_knn"),
        ("novel 5-way 1-shot", "novel_1shot"),
        ("novel 5-way 5-shot", "novel_5shot"),
    ),
}


def _holdout(num_classes: int) -> str:
    return ",".join(str(c) for c in range(num_classes - num_classes // 2, num_classes))


def _common(args: argparse.Namespace, seed: int) -> list[str]:
    argv = ["--dataset", args.dataset, "--seed", str(seed), "--no-progress", "--fewshot-episodes", "1000"]
    for flag, value in (
        ("--epochs", args.epochs),
        ("--lr-step", args.lr_step),
        ("--train-limit", args.train_limit),
        ("--test-limit", args.test_limit),
        ("--threads", args.threads),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _train(experiment: str, loss: str, seed: int, num_classes: int, args, runs: Path) -> tuple[dict, float]:
    """One training run through the command line; returns its figures and its time in seconds."""
    out = runs / f"{experiment}-{loss}-{seed}"
    argv = [sys.executable, "-m", "snca_ext.train", "--out", str(out), "--loss", loss, *_common(args, seed)]
    if experiment == "coarse":
        argv += ["--train-labels", "coarse"]
    if experiment == "novel":
        argv += ["--holdout-classes", _holdout(num_classes), "--fewshot-shots", "1,5"]
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    figures = {
        "knn": summary["knn_recomputed_bank"]["top1"],
        "knn_memory": summary["knn_memory_bank"]["top1"],
    }
    if "classifier_head" in summary:
        figures["head"] = summary["classifier_head"]["top1"]
    if "fine_labels_knn" in summary:
        figures["fine_knn"] = summary["fine_labels_knn"]["recomputed_bank"]["top1"]
    if "novel_classes" in summary:
        novel = summary["novel_classes"]
        figures.update(
            novel_knn=novel["knn_top1"],
            novel_1shot=novel["fewshot"][0]["mean"],
            novel_5shot=novel["fewshot"][1]["mean"],
        )
    return figures, seconds


def _baselines(experiment: str, seed: int, args) -> dict[str, dict]:
    """The untrained network's and the raw pixels' figures, with the same evaluations."""
    data = build_data(args.dataset).limit(args.train_limit, args.test_limit)
    recipe = {**RECIPES[args.dataset], **COMMON_DEFAULTS}
    k, sigma = recipe["knn_k"], recipe["temperature"]
    torch.manual_seed(seed)
    untrained = build_model(recipe["arch"], recipe["low_dim"])

    def network(dataset):
        return compute_features(untrained, dataset, torch.device("cpu"))[0]

    def pixels(dataset):
        return F.normalize(torch.stack([dataset[i][0].flatten() for i in range(len(dataset))]), dim=1)

    results = {}
    for name, embed in (("untrained network", network), ("raw pixels", pixels)):
        figures = {}
        if experiment in ("classes", "coarse"):
            bank, queries = embed(data.train_plain), embed(data.test)
            accuracy = knn_accuracy(
                queries, data.test.targets, bank, data.train.targets, data.num_classes, k=k, sigma=sigma
            )
            figures["knn" if experiment == "classes" else "fine_knn"] = accuracy.top1
        else:
            _, novel = data.split_holdout([int(c) for c in _holdout(data.num_classes).split(",")])
            bank, queries = embed(novel.train_plain), embed(novel.test)
            bank_labels, labels = novel.train_plain.targets, novel.test.targets
            figures["novel_knn"] = knn_accuracy(
                queries, labels, bank, bank_labels, data.num_classes, k=k, sigma=sigma
            ).top1
            pool, pool_labels = torch.cat([bank, queries]), torch.cat([bank_labels, labels])
            for shots, key in ((1, "novel_1shot"), (5, "novel_5shot")):
                figures[key] = few_shot_accuracy(pool, pool_labels, ways=5, shots=shots, seed=seed).mean
        results[name] = figures
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: dict[str, dict[str, list[float]]], seconds: dict[str, list[float]], experiments) -> str:
    columns = [column for experiment in experiments for column in COLUMNS[experiment]]
    lines = [
        "| | " + " | ".join(title for title, _ in columns) + " | time / run |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for method, figures in rows.items():
        cells = [_cell(figures.get(key, [])) for _, key in columns]
        time_cell = f"{statistics.mean(seconds[method]) / 60:.1f} min" if seconds.get(method) else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {time_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="classes,coarse,novel")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument("--epochs", type=int, help="default: the data set's recipe")
    parser.add_argument("--lr-step", type=int, help="default: the data set's recipe")
    parser.add_argument("--train-limit", type=int, help="train on the first N training examples")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test examples")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each run")
    parser.add_argument("--runs", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/fidelity.md", help="the markdown table")
    args = parser.parse_args(argv)
    experiments = [e for e in args.experiments.split(",") if e]
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown or (args.dataset == "digits" and "coarse" in experiments):
        parser.error(
            f"--experiments must be among {EXPERIMENTS} (digits has no coarse classes), got {unknown}"
        )
    seeds = [int(seed) for seed in args.seeds.split(",")]
    num_classes = build_data(args.dataset).num_classes
    methods = ("snca", "softmax", "untrained network", "raw pixels")
    rows: dict[str, dict[str, list[float]]] = {method: {} for method in methods}
    seconds: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs or scratch)
        for experiment in experiments:
            for seed in seeds:
                for loss in LOSSES:
                    figures, taken = _train(experiment, loss, seed, num_classes, args, runs)
                    seconds[loss].append(taken)
                    for key, value in figures.items():
                        if any(key == column for _, column in COLUMNS[experiment]):
                            rows[loss].setdefault(key, []).append(value)
                    print(f"{experiment} {loss} seed {seed}: {figures} in {taken / 60:.1f} min", flush=True)
                for method, figures in _baselines(experiment, seed, args).items():
                    for key, value in figures.items():
                        rows[method].setdefault(key, []).append(value)
    command = "python -m benchmarks.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(rows, seconds, experiments)
    text += (
        f"\n\n{args.dataset}, seeds {args.seeds}, `{command.strip()}`; kNN K = 30 with sigma = T; "
        "time per training run on this machine.\n"
    )
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
