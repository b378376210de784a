"""N-way K-shot accuracy of exported features: ``python -m snca_ext.fewshot FEATURES``.

The episodes and the nearest-class-mean rule are the core's (``snca_ext.episodes``); this is the
command line that runs them on a file written by ``python -m snca_ext.export``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from snca_ext import few_shot_accuracy

from .cli import NON_NEGATIVE_INT, POSITIVE_INT, int_list_type, number, program_name, report
from .errors import AppError, ExportError
from .export import load_features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.fewshot"),
        description="N-way K-shot nearest-class-mean accuracy (mean and 95% interval over seeded "
        "episodes) of a feature file written by python -m snca_ext.export.",
    )
    add = parser.add_argument
    add("features", help="a .safetensors or .pt file of python -m snca_ext.export")
    add("--ways", type=number(int, 2, what="an integer >= 2"), default=5, help="classes per episode (5)")
    add(
        "--shots",
        type=int_list_type(minimum=1, what="shot counts", example="1,5"),
        default=(1, 5),
        help="support examples per class, comma-separated (1,5)",
    )
    add("--queries", type=POSITIVE_INT, default=15, help="query examples per class (15)")
    add("--episodes", type=POSITIVE_INT, default=1000, help="episodes (1000)")
    add("--seed", type=NON_NEGATIVE_INT, default=0, help="episode sampling seed (0)")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        exported = load_features(args.features)
        for shot in args.shots:
            try:
                result = few_shot_accuracy(
                    exported["features"],
                    exported["labels"],
                    ways=args.ways,
                    shots=shot,
                    queries=args.queries,
                    episodes=args.episodes,
                    seed=args.seed,
                )
            except ValueError as error:
                raise ExportError(f"{args.features}: {error}") from error
            print(result)
    except AppError as error:
        return report(parser, error)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
