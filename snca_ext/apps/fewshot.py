"""N-way K-shot accuracy of exported features: ``python -m snca_ext.fewshot FEATURES``.

The episodes and the nearest-class-mean rule are the core's (``snca_ext.episodes``); this is the
command line that runs them on a file written by ``python -m snca_ext.export``. A file that records
its classes' groups (``groups`` in its metadata: an Omniglot export, whose groups are the
alphabets) gets episodes whose classes all come from one group, the protocol of Lake et al.;
``--across-groups`` draws them from every class instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from snca_ext import few_shot_accuracy

from .arguments import NON_NEGATIVE_INT, POSITIVE_INT, int_list_type, program_name, report
from .errors import AppError, ExportError
from .feature_files import load_features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.fewshot"),
        description="N-way K-shot nearest-class-mean accuracy (mean and 95% interval over seeded "
        "episodes) of a feature file written by python -m snca_ext.export.",
    )
    add = parser.add_argument
    add("features", help="a .safetensors or .pt file of python -m snca_ext.export")
    add(
        "--ways",
        type=int_list_type(minimum=2, what="classes per episode", example="20,5"),
        default=(5,),
        help="classes per episode, comma-separated (5; Omniglot's headline: 20)",
    )
    add(
        "--shots",
        type=int_list_type(minimum=1, what="shot counts", example="1,5"),
        default=(1, 5),
        help="support examples per class, comma-separated (1,5)",
    )
    add("--queries", type=POSITIVE_INT, default=15, help="query examples per class (15)")
    add("--episodes", type=POSITIVE_INT, default=1000, help="episodes (1000)")
    add("--seed", type=NON_NEGATIVE_INT, default=0, help="episode sampling seed (0)")
    add(
        "--across-groups",
        action="store_true",
        help="a file that records its classes' groups (an Omniglot export: the alphabets) gets episodes "
        "whose classes all come from one group; this draws them from every class instead",
    )
    return parser


def row_groups(exported: dict[str, Any], where: str) -> Tensor | None:
    """Each row's group (its class's, from the file's ``groups`` metadata), or None."""
    text = exported["metadata"].get("groups")
    if text is None:
        return None
    try:
        groups = torch.tensor(json.loads(text), dtype=torch.long)
    except (json.JSONDecodeError, TypeError, ValueError, RuntimeError) as error:
        raise ExportError(f"{where}: its groups metadata is not a JSON list of integers ({error})") from error
    labels = exported["labels"]
    if groups.dim() != 1 or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(groups)):
        raise ExportError(f"{where}: its groups metadata must give a group to each of its classes")
    return groups[labels.long()]


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        exported = load_features(args.features)
        groups = None if args.across_groups else row_groups(exported, args.features)
        for ways in args.ways:
            for shot in args.shots:
                try:
                    result = few_shot_accuracy(
                        exported["features"],
                        exported["labels"],
                        ways=ways,
                        shots=shot,
                        queries=args.queries,
                        episodes=args.episodes,
                        seed=args.seed,
                        groups=groups,
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
