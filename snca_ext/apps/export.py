"""Export the features of every image of a split: ``python -m snca_ext.export``.

    python -m snca_ext.export --checkpoint RUN/checkpoint.pt --split train --out train.safetensors

An original SNCA checkpoint (main.py's ``snca_resnet18.pth.tar``, cifar.py's ``ckpt.t7``) needs
``--trust-checkpoint`` and ``--data`` (it records no data set; its arch implies ``imagefolder`` or
``cifar10``, ``--dataset`` names another; ``--arch`` names the network of a file that does not):

    python -m snca_ext.export --checkpoint snca_resnet18.pth.tar --trust-checkpoint \\
        --data /data/imagenet --split test --out val.safetensors

The features are recomputed by the checkpoint's network (eval mode, the test-time transform, so
the training images are not augmented), batch by batch, and streamed to the file: neither the
images nor the features are ever all in memory (ImageNet train: 1,281,167 x 128 float32 =
656 MB on disk).

File layout (``.safetensors``, the default; readable by the ``safetensors`` package, by
``load_features`` here without it, or by any reader of the format: an 8-byte little-endian header
length, a JSON header, then the raw little-endian arrays):

    features  float32 [N, D]  L2-normalised features, row i of example indices[i]
    labels    int64   [N]     class ids (the dataset's, also with --holdout-classes)
    indices   int64   [N]     the example's index in the split's dataset: the package's digits
                              split, CIFAR-10's batch order, ImageFolder's sorted
                              ``datasets.ImageFolder(DATA/train).samples`` order (val/ for test)
    __metadata__ (strings): format, checkpoint, dataset, split, classes (all/seen/novel),
                            holdout_classes, arch, low_dim, loss, epoch, model_digest (a
                            digest of the network's weights: neighbors refuses a
                            --bank-features of another network); where the data set
                            has them, class_names (a JSON list, by class id); for omniglot
                            groups (a JSON list: each class's alphabet id, which
                            ``python -m snca_ext.fewshot`` draws episodes within) and
                            group_names (the alphabets)

``--images DIR`` instead of a split: the features of every image file under DIR (recursive,
sorted; the files ImageFolder takes: .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp),
through the checkpoint's test-time transform, with the paths relative to DIR in row order in the
metadata as ``paths`` (a JSON list; a ``.pt`` file holds the list as ``paths``), labels -1 and
indices 0..N-1. Every file's header is read first: files that are not readable images stop the
export with their names (exit status 2), or with ``--skip-bad-images`` are left out, named on
stderr.

    python -m snca_ext.export --checkpoint RUN --images my_drawings/ --out mine.safetensors

``--out F.pt`` writes the same tensors with ``torch.save`` as a dict
``{"features", "labels", "indices", "metadata"}`` that loads with ``weights_only=True``; it holds
the features in memory while it runs (fine for CIFAR-sized splits).

This module parses and calls: the network and the examples come from ``snca_ext.apps.trained``
(shared with ``python -m snca_ext.neighbors``), the export from ``snca_ext.apps.feature_export``,
the file format from ``snca_ext.apps.feature_files``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .arguments import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    program_name,
    report,
    resolve_device,
    set_threads,
    writable_folder,
)
from .errors import AppError, ExportError
from .feature_export import export_features, export_images
from .feature_files import load_features
from .trained import CLASS_SETS, SPLITS, add_checkpoint_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.export"),
        description="Write the features (recomputed by the network), labels and indices of every image "
        "of a split to a .safetensors file (streamed) or a .pt file.",
    )
    add = parser.add_argument
    add_checkpoint_arguments(add)
    add(
        "--split",
        choices=SPLITS,
        help="train or test; both go through the test-time transform (default: train)",
    )
    add(
        "--images",
        metavar="DIR",
        help="instead of a split: every image file under DIR (recursive, sorted), through the "
        "checkpoint's test-time transform; their paths relative to DIR are recorded in row order "
        "(metadata 'paths')",
    )
    add(
        "--skip-bad-images",
        action="store_true",
        help="--images: leave out the files that are not readable images, named on stderr (by default "
        "they stop the export, named, with exit status 2)",
    )
    add("--out", required=True, help="output file: .safetensors (streamed) or .pt")
    add(
        "--classes",
        choices=CLASS_SETS,
        help="all classes, or with a --holdout-classes run its seen or novel (held-out) classes (all)",
    )
    add("-b", "--batch-size", type=POSITIVE_INT, default=256, help="images per forward pass (256)")
    add("-j", "--workers", type=NON_NEGATIVE_INT, default=0, help="data loader processes (0)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add("--threads", type=POSITIVE_INT, help="CPU threads of torch (torch's default)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if Path(args.out).suffix not in (".safetensors", ".pt"):
            raise ExportError(f"--out must end in .safetensors or .pt, got {args.out}")
        if Path(args.out).is_dir():
            raise ExportError(
                f"--out {args.out} is a folder: give the file to write, e.g. {args.out}/train.safetensors"
            )
        writable_folder(Path(args.out).parent, "--out")
        set_threads(args.threads)
        options = dict(
            dataset=args.dataset,
            arch=args.arch,
            batch_size=args.batch_size,
            workers=args.workers,
            device=resolve_device(args.device),
            trust=args.trust_checkpoint,
            progress=not args.no_progress,
        )
        if args.images is not None:
            if args.split is not None or args.classes is not None or args.data is not None:
                raise ExportError("--images replaces --split, --classes and --data: give one or the other")
            export_images(args.checkpoint, args.images, args.out, skip_bad=args.skip_bad_images, **options)
            exported = load_features(args.out)
            print(
                f"wrote {len(exported['labels'])} x {exported['features'].shape[1]} features of the images "
                f"under {args.images} to {args.out}"
            )
            return 0
        if args.skip_bad_images:
            raise ExportError("--skip-bad-images is for --images")
        args.split, args.classes = args.split or "train", args.classes or "all"
        metadata = export_features(
            args.checkpoint,
            args.out,
            split=args.split,
            classes=args.classes,
            data_path=args.data,
            **options,
        )
    except AppError as error:
        return report(parser, error)
    rows = len(load_features(args.out)["labels"])
    print(
        f"wrote {rows} x {metadata['low_dim']} features of the {metadata['dataset']} {args.split} split "
        f"({args.classes} classes) to {args.out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
