"""The paper's claims on real data, SNCA against the softmax baseline and the baselines that tell.

    python -m experiments.fidelity                              Fashion-MNIST, 3 seeds, the recipe
    python -m experiments.fidelity --train-limit 10000 --epochs 4 --seeds 0   a reduced protocol
    python -m experiments.fidelity --dataset digits --experiments novel
    python -m experiments.fidelity --dataset omniglot --data ../shared/data/omniglot

Experiments (``--experiments``, comma-separated), each run with ``--loss snca``, ``--loss softmax``
(the same network and schedule with a linear classifier on the embedding) and ``--loss
cosine-softmax`` (the normalised softmax: cosine logits over the same T, the tuned baseline) once
per seed (``--losses`` picks among them), through ``python -m snca_ext.train``:

- ``classes``: train on every class; kNN top-1 (K = 30) against the bank recomputed from the final
  network and against the memory bank (the original's protocol), and the softmax runs' own
  classifier heads.
- ``coarse``: sub-category discovery: train on the coarse classes (``--train-labels coarse``) and
  report kNN top-1 with the fine classes, which the features were never told.
- ``novel``: hold out the last half of the classes (``--holdout-classes``); kNN top-1 on them
  against a bank of their training images, and 5-way 1-shot / 5-shot accuracy (nearest class mean).
  Omniglot: train on ``small1`` (``--omniglot-train small1``) and evaluate on the alphabets only
  ``small2`` has (Japanese (katakana), Sanskrit, Tagalog: 106 characters), with episodes whose
  classes all come from one alphabet: 20-way 1-shot (the headline of Lake et al.), 5-way 1-shot
  and 5-shot. Omniglot's ``classes`` run trains on both minimal splits (242 characters; kNN of
  drawers 16-20 against the bank of drawers 1-15).

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
from snca_ext.apps.data import WITHIN_GROUPS, build_data
from snca_ext.apps.features import compute_features
from snca_ext.apps.models import build_model
from snca_ext.apps.train.config import COMMON_DEFAULTS, RECIPES

LOSSES = ("snca", "softmax", "cosine-softmax")
EXPERIMENTS = ("classes", "coarse", "novel")
COLUMNS = {
    "classes": (
        ("kNN top-1", "knn"),
        ("kNN top-1, memory bank", "knn_memory"),
        ("classifier head top-1", "head"),
    ),
    "coarse": (("fine-label kNN top-1 (trained on coarse)", "fine_knn"),),
}
# The few-shot cells of the novel experiment, (ways, shots): Omniglot's within one alphabet.
FEWSHOT = {"omniglot": ((20, 1), (5, 1), (5, 5))}
DEFAULT_FEWSHOT = ((5, 1), (5, 5))


def _columns(experiment: str, dataset: str) -> tuple[tuple[str, str], ...]:
    if experiment != "novel":
        return COLUMNS[experiment]
    within = ", one alphabet" if dataset == "omniglot" else ""
    cells = FEWSHOT.get(dataset, DEFAULT_FEWSHOT)
    fewshot = [(f"novel {ways}-way {shots}-shot{within}", f"novel_{ways}w{shots}s") for ways, shots in cells]
    return (("novel kNN top-1", "novel_knn"), *fewshot)


def _novel_flags(dataset: str, num_classes: int) -> list[str]:
    if dataset == "omniglot":
        return ["--omniglot-train", "small1", "--fewshot-ways", "20,5", "--fewshot-shots", "1,5"]
    return ["--holdout-classes", _holdout(num_classes), "--fewshot-shots", "1,5"]


def _holdout(num_classes: int) -> str:
    return ",".join(str(c) for c in range(num_classes - num_classes // 2, num_classes))


def _common(args: argparse.Namespace, seed: int) -> list[str]:
    argv = ["--dataset", args.dataset, "--seed", str(seed), "--no-progress", "--fewshot-episodes", "1000"]
    for flag, value in (
        ("--data", args.data),
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
        argv += _novel_flags(args.dataset, num_classes)
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
        figures["novel_knn"] = novel["knn_top1"]
        for row in novel["fewshot"]:
            figures[f"novel_{row['ways']}w{row['shots']}s"] = row["mean"]
    return figures, seconds


def _baselines(experiment: str, seed: int, args) -> dict[str, dict]:
    """The untrained network's and the raw pixels' figures, with the same evaluations."""
    novel_train = "small1" if args.dataset == "omniglot" and experiment == "novel" else ""
    data = build_data(args.dataset, args.data, omniglot_train=novel_train).limit(
        args.train_limit, args.test_limit
    )
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
            held = data.novel_classes or [int(c) for c in _holdout(data.num_classes).split(",")]
            _, novel = data.split_holdout(held)
            bank, queries = embed(novel.train_plain), embed(novel.test)
            bank_labels, labels = novel.train_plain.targets, novel.test.targets
            figures["novel_knn"] = knn_accuracy(
                queries, labels, bank, bank_labels, data.num_classes, k=k, sigma=sigma
            ).top1
            pool, pool_labels = torch.cat([bank, queries]), torch.cat([bank_labels, labels])
            groups = data.coarse_of[pool_labels] if args.dataset in WITHIN_GROUPS else None
            for ways, shots in FEWSHOT.get(args.dataset, DEFAULT_FEWSHOT):
                figures[f"novel_{ways}w{shots}s"] = few_shot_accuracy(
                    pool, pool_labels, ways=ways, shots=shots, seed=seed, groups=groups
                ).mean
        results[name] = figures
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(
    rows: dict[str, dict[str, list[float]]], seconds: dict[str, list[float]], experiments, dataset: str
) -> str:
    columns = [column for experiment in experiments for column in _columns(experiment, dataset)]
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
    parser = argparse.ArgumentParser(
        prog="python -m experiments.fidelity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits", "omniglot"))
    parser.add_argument("--data", help="the data folder (omniglot: the one holding its minimal splits' zips)")
    parser.add_argument(
        "--experiments",
        help="classes,coarse,novel (default: all; digits: classes,novel; omniglot: novel,classes)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument(
        "--losses", default=",".join(LOSSES), help=f"comma-separated, among {', '.join(LOSSES)} (all)"
    )
    parser.add_argument("--epochs", type=int, help="default: the data set's recipe")
    parser.add_argument("--lr-step", type=int, help="default: the data set's recipe")
    parser.add_argument("--train-limit", type=int, help="train on the first N training examples")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test examples")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each run")
    parser.add_argument("--runs", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", default="experiments/fidelity.md", help="the markdown table")
    args = parser.parse_args(argv)
    if args.dataset == "omniglot" and args.data is None:
        parser.error("--dataset omniglot needs --data DIR (the folder of its minimal splits' zips)")
    default = {"digits": "classes,novel", "omniglot": "novel,classes"}.get(
        args.dataset, ",".join(EXPERIMENTS)
    )
    experiments = [e for e in (args.experiments or default).split(",") if e]
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown or (args.dataset != "fashion-mnist" and "coarse" in experiments):
        parser.error(
            f"--experiments must be among {EXPERIMENTS} (coarse: fashion-mnist only), "
            f"got {sorted(unknown) or 'coarse'}"
        )
    seeds = [int(seed) for seed in args.seeds.split(",")]
    losses = [loss for loss in args.losses.split(",") if loss]
    if not losses or set(losses) - set(LOSSES):
        parser.error(f"--losses must be among {', '.join(LOSSES)}, got {args.losses!r}")
    num_classes = build_data(args.dataset, args.data).num_classes
    methods = (*losses, "untrained network", "raw pixels")
    rows: dict[str, dict[str, list[float]]] = {method: {} for method in methods}
    seconds: dict[str, list[float]] = {loss: [] for loss in losses}
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs or scratch)
        for experiment in experiments:
            for seed in seeds:
                for loss in losses:
                    figures, taken = _train(experiment, loss, seed, num_classes, args, runs)
                    seconds[loss].append(taken)
                    for key, value in figures.items():
                        if any(key == column for _, column in _columns(experiment, args.dataset)):
                            rows[loss].setdefault(key, []).append(value)
                    print(f"{experiment} {loss} seed {seed}: {figures} in {taken / 60:.1f} min", flush=True)
                for method, figures in _baselines(experiment, seed, args).items():
                    for key, value in figures.items():
                        rows[method].setdefault(key, []).append(value)
    command = "python -m experiments.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(rows, seconds, experiments, args.dataset)
    text += (
        f"\n\n{args.dataset}, seeds {args.seeds}, `{command.strip()}`; kNN K = 30 with sigma = T; "
        "time per training run on this machine.\n"
    )
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
