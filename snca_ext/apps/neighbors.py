"""Browse what was learned: ``python -m snca_ext.neighbors``.

    python -m snca_ext.neighbors --checkpoint RUN/checkpoint.pt --out nn.html
    python -m snca_ext.neighbors --checkpoint SNCA/checkpoint.pt --compare SOFTMAX/checkpoint.pt \\
        --classes novel --out novel.html

writes a self-contained HTML page (every image embedded as a data: URI; it opens offline and can be
mailed as one file) and a PNG grid beside it (``--png``, default: the page's name with ``.png``).
One row per query and model: the query image, then its ``--k`` (20) nearest training images by
cosine similarity, best first, each framed green (same class as the query) or red (another class)
and captioned with its similarity. Queries come from the test split (``--query-split``), chosen at
random with ``--seed`` or given by ``--query-index`` (indices into the split, the ``indices`` of
``python -m snca_ext.export``). ``--compare`` adds a second model's row under each query (e.g. the
``--loss softmax`` baseline), as the original project's page compares features.

The bank is the training split's features recomputed by each network (kept in memory: N x D
floats), or read from a file of ``python -m snca_ext.export`` (``--bank-features``, memory-mapped),
or each checkpoint's memory bank (``--memory-bank``), and searched by ``snca_ext.bank_topk``.

A released model of the original project rebuilds the paper's neighbour page without recomputing
the 1.28 M training features (its file holds them as its memory bank):

    python -m snca_ext.neighbors --checkpoint snca_resnet50.pth.tar --trust-checkpoint \\
        --data /data/imagenet --memory-bank --out nn.html

(an original checkpoint records no data set: ``--data`` is needed, ``--dataset`` names another
than the one its arch implies, ``--arch`` the network of a file that does not say it).

With a ``--holdout-classes`` run, ``--classes novel`` shows how the features order classes never
seen in training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from snca_ext.backends import BACKENDS

from .arguments import (
    POSITIVE_INT,
    check_backend,
    int_list_type,
    number,
    program_name,
    report,
    resolve_device,
    set_threads,
    writable_folder,
)
from .data import IndexedDataset
from .errors import AppError, ExportError
from .feature_files import load_features
from .features import compute_features
from .neighbor_pages import ModelRows, choose_queries, retrieve, write_html, write_png
from .trained import (
    CLASS_SETS,
    SPLITS,
    add_checkpoint_arguments,
    dataset_indices,
    load_trained_model,
    original_data_check,
    split_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.neighbors"),
        description="An HTML page (self-contained) and a PNG grid of nearest neighbours: per query, its "
        "top-k training images by feature similarity, marked correct or wrong class.",
    )
    add = parser.add_argument
    add_checkpoint_arguments(add)
    add("--compare", help="a second checkpoint (same dataset) whose retrievals are shown under each query")
    add("--names", help="row labels of the models, comma-separated (default: their --loss and run folder)")
    add("--out", required=True, help="the HTML page to write")
    add("--png", help="the PNG grid to write (default: --out with .png)")
    add("-k", "--k", type=POSITIVE_INT, default=20, help="retrievals per query (20)")
    add("--queries", type=POSITIVE_INT, default=10, help="random queries (10)")
    add("--seed", type=int, default=0, help="seed of the random queries (0)")
    add(
        "--query-index",
        type=int_list_type(minimum=0, what="query indices", example="3,17,42"),
        help="these queries instead: indices into the query split",
    )
    add("--query-split", choices=SPLITS, default="test", help="where the queries come from (test)")
    add("--classes", choices=CLASS_SETS, default="all", help="all, or a holdout run's seen or novel classes")
    add("--bank-features", help="the bank of --checkpoint from python -m snca_ext.export --split train")
    add(
        "--memory-bank",
        action="store_true",
        help="search each checkpoint's memory bank (the training features its run kept: the original's "
        "evaluation protocol, and the released models' bank of all ImageNet training images) instead of "
        "recomputing the training split's features",
    )
    add("--compare-bank-features", help="the same for --compare")
    add("--thumb", type=number(int, 8, what="an integer >= 8"), default=64, help="image size in pixels (64)")
    add(
        "-b",
        "--batch-size",
        type=POSITIVE_INT,
        default=256,
        help="images per forward pass for the bank (256)",
    )
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add("--threads", type=POSITIVE_INT, help="CPU threads of torch (torch's default)")
    add("--backend", choices=BACKENDS, default="auto", help="bank_topk backend (auto)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def _bank(
    model: nn.Module,
    bank_set: IndexedDataset,
    features_path: str | None,
    args: argparse.Namespace,
    device: torch.device,
    run_args: dict[str, Any],
) -> Tensor:
    if args.memory_bank:
        memory = run_args.get("bank")
        if memory is None:
            raise ExportError(f"--memory-bank: {run_args['checkpoint']} holds no memory bank")
        if memory.shape[0] != len(bank_set):
            raise ExportError(
                f"--memory-bank: the memory bank of {run_args['checkpoint']} has {memory.shape[0]} rows, "
                f"but the training split (--classes {args.classes}) has {len(bank_set)} images: not the "
                f"data it was trained on (--dataset / --data; a run with --holdout-classes needs "
                f"--classes seen)"
            )
        return memory.float()
    if features_path is None:
        features, _ = compute_features(
            model, bank_set, device, batch_size=args.batch_size, progress=not args.no_progress
        )
        return features
    exported = load_features(features_path)
    recorded = exported["metadata"].get("model_digest")
    # Files written before the digest was recorded say nothing: their shape is checked below.
    if recorded is not None and recorded != run_args["model_digest"]:
        flag = "--bank-features" if features_path == args.bank_features else "--compare-bank-features"
        source = exported["metadata"]
        raise ExportError(
            f"{flag} {features_path} was exported from another network ({source.get('checkpoint')}, "
            f"epoch {source.get('epoch')}) than {run_args['checkpoint']} (epoch "
            f"{run_args['epoch']}): their weights differ; export the bank with the same checkpoint"
        )
    expected = dataset_indices(bank_set)
    if exported["indices"].shape != expected.shape or not torch.equal(exported["indices"], expected):
        raise ExportError(
            f"--bank-features {features_path} holds {len(exported['indices'])} rows that are not the "
            f"{len(expected)} training images of --classes {args.classes} (export it with --split train "
            f"--classes {args.classes})"
        )
    features = exported["features"]
    dim = getattr(getattr(model, "fc", None), "out_features", None)
    if features.dim() != 2 or (dim is not None and features.shape[1] != dim):
        raise ExportError(
            f"--bank-features {features_path} holds features of shape {tuple(features.shape)}, but the "
            f"network's are [N, {dim}]: export them with the same checkpoint"
        )
    return features


def _data_text(run_args: dict[str, Any]) -> str:
    """The data a run read, as its flags: ``--dataset X`` and ``--data PATH`` where it had one."""
    data = run_args.get("data")
    return f"--dataset {run_args.get('dataset')}" + (f" --data {data}" if data else "")


def _model_name(run_args: dict[str, Any]) -> str:
    path = Path(run_args["checkpoint"])
    return f"{run_args.get('loss', 'snca')}: {path.name if run_args.get('original') else path.parent.name}"


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
        if png.resolve() == Path(args.out).resolve():
            which = "--png" if args.png else "its default: --out with .png"
            raise ExportError(
                f"--out {args.out} and the PNG grid ({which}) are the same file: give --out a .html "
                "name, or --png another"
            )
        for flag, path in (("--out", Path(args.out)), ("--png", png)):
            if path.is_dir():
                raise ExportError(f"{flag} {path} is a folder: give the file to write")
        writable_folder(Path(args.out).parent, "--out")
        if args.png:
            writable_folder(Path(args.png).parent, "--png")
        set_threads(args.threads)
        device = resolve_device(args.device)
        check_backend(args.backend, device)
        checkpoints = [args.checkpoint] + ([args.compare] if args.compare else [])
        # Everything that does not need the networks is checked before a checkpoint is loaded (and
        # with --trust-checkpoint unpickled: its code must not run for a command that is refused).
        if args.names and len(args.names.split(",")) != len(checkpoints):
            raise ExportError(f"--names needs {len(checkpoints)} comma-separated names, got {args.names!r}")
        if args.memory_bank and (args.bank_features or args.compare_bank_features):
            raise ExportError(
                "--memory-bank and --bank-features / --compare-bank-features exclude each other"
            )
        for flag, path in (
            ("--bank-features", args.bank_features),
            ("--compare-bank-features", args.compare_bank_features),
        ):
            if path is not None and not Path(path).is_file():
                raise ExportError(f"{flag} {path}: no such feature file")
        loaded = [
            load_trained_model(
                path,
                device,
                trust=args.trust_checkpoint,
                flag=flag,
                arch=args.arch,
                dataset=args.dataset,
                before_unpickling=original_data_check(args.data, args.dataset),
            )
            for path, flag in zip(checkpoints, ("--checkpoint", "--compare"), strict=False)
        ]
        first = loaded[0][1]
        for _, other in loaded[1:]:
            if (other.get("dataset"), other.get("data")) != (first.get("dataset"), first.get("data")):
                raise ExportError(
                    f"--compare {args.compare} was trained on {_data_text(other)}, --checkpoint "
                    f"{args.checkpoint} on {_data_text(first)}: the same images are needed"
                )
        names = args.names.split(",") if args.names else [_model_name(run_args) for _, run_args in loaded]
        if len(names) != len(loaded):
            raise ExportError(f"--names needs {len(loaded)} comma-separated names, got {args.names!r}")
        query_set = split_dataset(first, args.query_split, args.classes, args.data)
        # A --train-limit run's memory bank holds its first N training examples only.
        limit = first.get("train_limit") if args.memory_bank else None
        bank_set = split_dataset(first, "train", args.classes, args.data, limit)
        positions = choose_queries(query_set, args.queries, args.seed, args.query_index)
        images = torch.stack([query_set[p][0] for p in positions.tolist()])
        # A training image is its own nearest neighbour: leave its row out when it is the query.
        exclude = positions if args.query_split == "train" else None
        bank_paths = [args.bank_features, args.compare_bank_features]
        rows = []
        for (model, run_args), name, bank_path in zip(loaded, names, bank_paths, strict=False):
            bank = _bank(model, bank_set, bank_path, args, device, run_args)
            values, found = retrieve(
                model,
                images,
                bank,
                args.k,
                device,
                exclude=None if exclude is None else exclude.to(device),
                backend=args.backend,
            )
            rows.append(ModelRows(name, values, found))
    except AppError as error:
        return report(parser, error)
    out = Path(args.out)
    how = (
        f"--query-index {args.query_index}"
        if args.query_index
        else f"{len(positions)} random, seed {args.seed}"
    )
    notes = [
        f"{first.get('dataset')} {args.query_split} queries ({how}) against the {len(bank_set)} training "
        f"images ({args.classes} classes), top {args.k} by cosine similarity of the features"
        + (" (each checkpoint's memory bank)" if args.memory_bank else ""),
        *[f"{name}: {path}" for name, path in zip(names, checkpoints, strict=True)],
        "green: same class as the query; red: another class",
    ]
    write_html(
        out,
        title=f"Nearest neighbours: {' vs '.join(names)}",
        query_set=query_set,
        bank_set=bank_set,
        queries=positions,
        models=rows,
        thumb=args.thumb,
        notes=notes,
    )
    write_png(png, query_set=query_set, bank_set=bank_set, queries=positions, models=rows, thumb=args.thumb)
    for row in rows:
        correct = sum(
            int(bank_set.targets[r]) == int(query_set.targets[p])
            for p, found in zip(positions.tolist(), row.positions.tolist(), strict=True)
            for r in found
            if r >= 0
        )
        print(f"{row.name}: {correct}/{row.positions.ge(0).sum()} retrievals of the same class as the query")
    print(f"wrote {out} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
