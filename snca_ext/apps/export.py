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
                            holdout_classes, arch, low_dim, loss, epoch; where the data set
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

``load_trained_model`` (the network of a checkpoint) and ``split_dataset`` (the examples a split and
class selection name) are shared with ``python -m snca_ext.neighbors``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoints import FORMAT, from_original, load_checkpoint, original_run
from .cli import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    arch_type,
    program_name,
    report,
    resolve_device,
    set_threads,
    writable_folder,
)
from .data import (
    DATASETS,
    DEFAULT_LOCATION,
    WITHIN_GROUPS,
    ClassSubset,
    DataBundle,
    IndexedDataset,
    held_out_classes,
    image_file_transform,
    run_data,
)
from .data.imagefolder import ImageFiles, header_problems, name_bad
from .errors import AppError, CheckpointError, DataError, ExportError
from .features import iter_features
from .files import atomic_write
from .models import build_model, input_channels

EXPORT_FORMAT = "snca_ext.export/1"
SPLITS = ("train", "test")
CLASS_SETS = ("all", "seen", "novel")
_DTYPES = {"F32": (torch.float32, np.float32), "I64": (torch.int64, np.int64)}


# ----------------------------------------------------------------------------- model and data


def load_trained_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    trust: bool = False,
    flag: str = "--checkpoint",
    arch: str | None = None,
    dataset: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a checkpoint, in eval mode on ``device``, and its run arguments: ``args`` of a
    ``python -m snca_ext.train`` checkpoint; for an original SNCA checkpoint (main.py's
    ``.pth.tar``, cifar.py's ``ckpt.t7``), its arch (``arch`` where the file does not say),
    low-dim and the data set its arch implies. ``dataset`` (the ``--dataset`` flag) replaces the
    run's data set (an original checkpoint records none, nor its folder: ``split_dataset``'s
    ``data_path``). The args also hold the checkpoint's memory bank as ``bank`` (None if it has
    none)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = load_checkpoint(path, trust=trust, flag=flag)
    if state.get("format") == FORMAT:
        args = dict(state["args"])
        weights, bank, epoch = state["model"], state["memory"].get("bank"), int(state["epoch"])
    else:
        parts = from_original(state)
        if parts["low_dim"] is None:
            raise CheckpointError(f"{flag} {path}: an original checkpoint without the network's fc weights")
        args = {**original_run(parts, arch), "data": None, "loss": "snca", "original": parts["script"]}
        weights, bank, epoch = parts["model"], parts["bank"], parts["epoch"]
    if dataset is not None:
        args["dataset"] = dataset
    classifier = weights.get("classifier.weight")
    model = build_model(
        args["arch"],
        int(args["low_dim"]),
        classes=0 if classifier is None else len(classifier),
        in_channels=input_channels(weights),
    )
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(
            f"{flag} {path}: the weights do not fit {args['arch']}: {str(error).strip().splitlines()[0]}"
        ) from error
    args["epoch"] = epoch
    args["checkpoint"] = str(path)
    args["bank"] = bank
    return model.to(device).eval(), args


def run_bundle(run_args: dict[str, Any], data_path: str | None = None) -> DataBundle:
    """The data of the checkpoint's run (``load_trained_model``'s args), read from ``data_path``
    (default: where the run read it), with the same Omniglot splits and held-out alphabets."""
    dataset = run_args.get("dataset")
    if dataset is None:
        raise ExportError(f"the checkpoint does not say its data set: pass --dataset (one of {DATASETS})")
    data_path = data_path if data_path is not None else run_args.get("data")
    if data_path is None and run_args.get("original") and dataset not in DEFAULT_LOCATION:
        raise ExportError(
            f"{run_args['checkpoint']} is an original {run_args['original']} checkpoint, which does not "
            f"record its data: pass --data PATH, the {dataset} folder (or --dataset and --data for another)"
        )
    return run_data(run_args, data_path)


def select_split(
    bundle: DataBundle, run_args: dict[str, Any], split: str, classes: str = "all"
) -> IndexedDataset:
    """The examples of ``split`` ("train": with the test-time transform, or "test") of ``bundle``,
    restricted to ``classes``: "all", or the run's "seen" / "novel" (held-out) classes."""
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    holdout = held_out_classes(bundle, str(run_args.get("holdout_classes") or ""))
    if classes != "all":
        if not holdout:
            raise ExportError(
                f"--classes {classes} needs a run trained with --holdout-classes (or omniglot's "
                "--omniglot-train / --holdout-alphabets)"
            )
        seen, novel = bundle.split_holdout(holdout)
        bundle = seen if classes == "seen" else novel
    return bundle.train_plain if split == "train" else bundle.test


def split_dataset(
    run_args: dict[str, Any], split: str, classes: str = "all", data_path: str | None = None
) -> IndexedDataset:
    """``select_split`` of the run's data (``run_bundle``)."""
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    return select_split(run_bundle(run_args, data_path), run_args, split, classes)


def dataset_indices(dataset: IndexedDataset) -> Tensor:
    """Each example's index in the split's full dataset."""
    if isinstance(dataset, ClassSubset):
        return dataset_indices(dataset.parent)[dataset.rows]
    return torch.arange(len(dataset))


# ----------------------------------------------------------------------------- file formats


def write_safetensors(
    path: str | Path,
    batches: Iterable[Tensor],
    rows: int,
    dim: int,
    labels: Tensor,
    indices: Tensor,
    metadata: dict[str, str],
) -> None:
    """Streams ``batches`` of [b, dim] float32 rows (``rows`` in all) into a safetensors file with
    ``features``, ``labels`` and ``indices``; written to a temporary file, renamed when complete."""
    path = Path(path)
    sizes = {"features": rows * dim * 4, "labels": rows * 8, "indices": rows * 8}
    header: dict[str, Any] = {"__metadata__": {key: str(value) for key, value in metadata.items()}}
    offset = 0
    for name, dtype, shape in (
        ("features", "F32", [rows, dim]),
        ("labels", "I64", [rows]),
        ("indices", "I64", [rows]),
    ):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format recommends 8-byte aligned data
    with atomic_write(path) as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        written = 0
        for batch in batches:
            if batch.dim() != 2 or batch.shape[1] != dim:
                raise ValueError(f"feature batches must be [b, {dim}], got {tuple(batch.shape)}")
            file.write(batch.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
            written += batch.shape[0]
        if written != rows:
            raise ValueError(f"expected {rows} feature rows, the batches held {written}")
        file.write(labels.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())
        file.write(indices.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())


def _valid_entry(entry: Any) -> bool:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(whole(size) for size in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(whole(offset) for offset in offsets)
        and offsets[0] <= offsets[1]
    )


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file, memory-mapped (pages are read on use), and its metadata."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ExportError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ExportError(f"{path}: not a safetensors file (header length {length} > file size)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ExportError(f"{path}: not a safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise ExportError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise ExportError(f"{path}: malformed safetensors header (__metadata__ is not an object)")
    tensors = {}
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise ExportError(
                f"{path}: malformed safetensors header: tensor {name!r} needs a dtype, a shape of "
                f"integers >= 0 and data_offsets [begin, end] with 0 <= begin <= end, got {entry!r}"[:400]
            )
        if entry["dtype"] not in _DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected F32 or I64")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        _, np_dtype = _DTYPES[entry["dtype"]]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * np.dtype(np_dtype).itemsize or 8 + length + end > size:
            raise ExportError(f"{path}: tensor {name} does not fit its offsets (truncated file?)")
        if count == 0:
            tensors[name] = torch.zeros(shape, dtype=_DTYPES[entry["dtype"]][0])
            continue
        # mode "c" (copy-on-write) gives a writable array without writing back to the file.
        array = np.memmap(
            path, dtype=np.dtype(np_dtype).newbyteorder("<"), mode="c", offset=8 + length + begin, shape=shape
        )
        tensors[name] = torch.from_numpy(array)
    return tensors, metadata


def load_features(path: str | Path) -> dict[str, Any]:
    """``{"features", "labels", "indices", "metadata", "paths"}`` of a file written by this module
    (``.safetensors``, memory-mapped, or ``.pt``); ``paths`` is the ``--images`` files' list, or
    None."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such feature file")
    if path.suffix == ".pt":
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ExportError(f"{path}: could not be read as a torch file ({error})") from error
        tensors, metadata = content, content.get("metadata", {})
    else:
        tensors, metadata = read_safetensors(path)
    missing = [name for name in ("features", "labels", "indices") if name not in tensors]
    if missing:
        raise ExportError(f"{path}: lacks {', '.join(missing)}; not written by python -m snca_ext.export")
    paths = tensors.get("paths")
    if paths is None and "paths" in metadata:
        try:
            paths = json.loads(metadata["paths"])
        except json.JSONDecodeError as error:
            raise ExportError(f"{path}: its paths metadata is not a JSON list ({error})") from error
    return {
        "features": tensors["features"],
        "labels": tensors["labels"],
        "indices": tensors["indices"],
        "metadata": dict(metadata),
        "paths": paths,
    }


# ----------------------------------------------------------------------------- export


def _run_metadata(run_args: dict[str, Any], **fields: Any) -> dict[str, str]:
    metadata = {
        "format": EXPORT_FORMAT,
        "checkpoint": run_args["checkpoint"],
        "dataset": run_args.get("dataset"),
        **fields,
        "arch": run_args["arch"],
        "low_dim": run_args["low_dim"],
        "loss": run_args.get("loss", "snca"),
        "epoch": run_args["epoch"],
    }
    return {key: str(value) for key, value in metadata.items()}


def _write(
    out: Path,
    batches: Iterable[Tensor],
    rows: int,
    dim: int,
    labels: Tensor,
    indices: Tensor,
    metadata: dict[str, str],
    paths: list[str] | None = None,
) -> None:
    """Writes the feature file ``out``: streamed to a ``.safetensors``, gathered for a ``.pt``
    (which holds ``paths`` as a list; the safetensors metadata as JSON)."""
    if out.suffix != ".pt":
        if paths is not None:
            metadata = {**metadata, "paths": json.dumps(paths)}
        write_safetensors(out, batches, rows, dim, labels, indices, metadata)
        return
    features = torch.empty(rows, dim)
    start = 0
    for batch in batches:
        features[start : start + len(batch)] = batch
        start += len(batch)
    content = {"features": features, "labels": labels, "indices": indices, "metadata": metadata}
    if paths is not None:
        content["paths"] = paths
    with atomic_write(out) as file:
        torch.save(content, file)


def export_features(
    checkpoint: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    classes: str = "all",
    data_path: str | None = None,
    dataset: str | None = None,
    arch: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    trust: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Writes the features of ``split`` (restricted to ``classes``) to ``out``; returns the
    metadata written. ``dataset`` and ``arch`` name what an original checkpoint does not say."""
    device = torch.device(device)
    model, run_args = load_trained_model(checkpoint, device, trust=trust, arch=arch, dataset=dataset)
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    bundle = run_bundle(run_args, data_path)
    examples = select_split(bundle, run_args, split, classes)
    labels, indices = examples.targets.clone(), dataset_indices(examples)
    metadata = _run_metadata(
        run_args, split=split, classes=classes, holdout_classes=run_args.get("holdout_classes") or ""
    )
    if bundle.classes is not None:
        metadata["class_names"] = json.dumps(bundle.classes)
    if run_args.get("dataset") in WITHIN_GROUPS and bundle.coarse_of is not None:
        metadata["groups"] = json.dumps(bundle.coarse_of.tolist())
        metadata["group_names"] = json.dumps(bundle.coarse_classes)
    batches = (
        features.cpu()
        for features, _ in iter_features(
            model, examples, device, batch_size=batch_size, workers=workers, progress=progress
        )
    )
    _write(Path(out), batches, len(examples), int(run_args["low_dim"]), labels, indices, metadata)
    return metadata


def image_files(folder: str | Path, skip_bad: bool = False) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted; ImageFolder's extensions), each
    header read: bad files stop here with their names (DataError), or with ``skip_bad`` are left
    out with a warning naming them."""
    import logging

    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--images {folder} does not exist or is not a folder")
    paths = sorted(
        path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS
    )
    if not paths:
        raise ExportError(f"--images {folder} holds no image file ({', '.join(IMG_EXTENSIONS)})")
    problems = header_problems([str(path) for path in paths])
    bad = [(str(path), problem) for path, problem in zip(paths, problems, strict=True) if problem is not None]
    if bad and not skip_bad:
        raise DataError(
            f"--images {folder}: {len(bad)} of the {len(paths)} image files cannot be read: {name_bad(bad)}. "
            "Remove or replace them, or pass --skip-bad-images to leave them out"
        )
    if bad:
        logging.getLogger(__name__).warning(
            f"warning: left out {len(bad)} of the {len(paths)} image files: {name_bad(bad)}"
        )
    kept = [path for path, problem in zip(paths, problems, strict=True) if problem is None]
    if not kept:
        raise DataError(f"--images {folder}: no readable image file left")
    return kept


def export_images(
    checkpoint: str | Path,
    folder: str | Path,
    out: str | Path,
    *,
    skip_bad: bool = False,
    dataset: str | None = None,
    arch: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    trust: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Writes the features of the image files under ``folder`` (``image_files``), through the
    test-time transform of the checkpoint's data set, to ``out`` with their paths relative to
    ``folder`` in row order; returns the metadata written."""
    paths = image_files(folder, skip_bad)
    device = torch.device(device)
    model, run_args = load_trained_model(checkpoint, device, trust=trust, arch=arch, dataset=dataset)
    if run_args.get("dataset") is None:
        raise ExportError(f"the checkpoint does not say its data set: pass --dataset (one of {DATASETS})")
    transform = image_file_transform(run_args["dataset"])
    files = ImageFiles([str(path) for path in paths], transform)
    metadata = _run_metadata(run_args, split="images", images=str(folder))
    batches = (
        features.cpu()
        for features, _ in iter_features(
            model, files, device, batch_size=batch_size, workers=workers, progress=progress
        )
    )
    relative = [path.relative_to(folder).as_posix() for path in paths]
    _write(
        Path(out),
        batches,
        len(files),
        int(run_args["low_dim"]),
        files.targets,
        torch.arange(len(files)),
        metadata,
        relative,
    )
    return metadata


def add_checkpoint_arguments(add) -> None:
    """The flags that say which network to load and on which data, shared by export and
    neighbors: --checkpoint, --trust-checkpoint, and --dataset/--data/--arch for what the
    checkpoint does not record."""
    add(
        "--checkpoint",
        required=True,
        help="a checkpoint.pt of python -m snca_ext.train (or its run folder), or an original SNCA "
        "checkpoint (main.py's .pth.tar, cifar.py's ckpt.t7; with --trust-checkpoint)",
    )
    add(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that need unpickling (the original project's): unpickling can run code",
    )
    add(
        "--dataset",
        choices=DATASETS,
        help="the data set, if not the checkpoint's run's (an original checkpoint records none: its arch "
        "implies imagefolder for main.py's ResNets, cifar10 for cifar.py's ckpt.t7)",
    )
    add(
        "--data",
        help="the dataset folder, if not where the checkpoint's run read it (original checkpoints: needed)",
    )
    add("--arch", type=arch_type, help="the network of an original checkpoint that does not say its arch")


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
