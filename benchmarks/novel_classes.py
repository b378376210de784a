"""SNCA vs the softmax baseline on classes never seen in training (the README's figures).

    python -m benchmarks.novel_classes                       digits, classes 5-9 held out, seeds 0-2
    python -m benchmarks.novel_classes --seeds 0,1,2,3,4 --epochs 25

Trains the digits recipe (``python -m snca_ext.train``) on classes 0-4 with ``--loss snca`` and with
``--loss softmax`` (the same network and schedule, a linear classifier on the embedding), once per
seed, and prints a markdown table, mean ± standard deviation over the seeds: kNN top-1 on the seen
classes' test images, kNN top-1 on the held-out classes' test images against a bank of their
training images (features recomputed by the network), and 5-way 1-shot / 5-shot accuracy on the
held-out classes (nearest class mean, 1000 episodes). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from snca_ext.apps.train.cli import EXIT_OK
from snca_ext.apps.train.cli import run as train

LOSSES = ("snca", "softmax")
COLUMNS = (
    ("seen kNN top-1", lambda s: s["top1"]),
    ("novel kNN top-1", lambda s: s["novel_classes"]["knn_top1"]),
    ("novel 5-way 1-shot", lambda s: s["novel_classes"]["fewshot"][0]["mean"]),
    ("novel 5-way 5-shot", lambda s: s["novel_classes"]["fewshot"][1]["mean"]),
)


def _train(out: Path, loss: str, seed: int, args: argparse.Namespace) -> dict:
    argv = [
        "--out",
        str(out),
        "--loss",
        loss,
        "--seed",
        str(seed),
        "--holdout-classes",
        args.holdout,
        "--fewshot-shots",
        "1,5",
        "--fewshot-episodes",
        str(args.episodes),
        "--threads",
        "1",
        "--no-progress",
    ]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    with contextlib.redirect_stdout(io.StringIO()):
        status = train(argv)
    if status != EXIT_OK:
        raise SystemExit(f"training {loss} seed {seed} failed with exit status {status}")
    return json.loads((out / "summary.json").read_text())


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.novel_classes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (0,1,2)")
    parser.add_argument("--holdout", default="5,6,7,8,9", help="held-out classes (5,6,7,8,9)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the digits recipe, 25)")
    parser.add_argument("--episodes", type=int, default=1000, help="few-shot episodes (1000)")
    parser.add_argument("--out", help="keep the runs and results.json here (default: a temporary folder)")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    summaries: dict[str, list[dict]] = {loss: [] for loss in LOSSES}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        for seed in seeds:
            for loss in LOSSES:
                summary = _train(root / f"{loss}-seed{seed}", loss, seed, args)
                summaries[loss].append(summary)
                novel = summary["novel_classes"]
                print(
                    f"{loss:8s} seed {seed}: seen {summary['top1']:.2f}  novel kNN {novel['knn_top1']:.2f}  "
                    f"1-shot {novel['fewshot'][0]['mean']:.2f}  5-shot {novel['fewshot'][1]['mean']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        if args.out:
            (root / "results.json").write_text(json.dumps(summaries, indent=2) + "\n")
    epochs = summaries["snca"][0]["epochs"]
    print(
        f"\nDigits, classes {args.holdout} held out (never trained on), digits_cnn, {epochs} epochs, "
        f"seeds {args.seeds}: mean ± std over seeds, accuracy in %\n"
    )
    print("| loss | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for loss in LOSSES:
        cells = [_cell([pick(summary) for summary in summaries[loss]]) for _, pick in COLUMNS]
        print(f"| {loss} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
