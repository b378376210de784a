"""The features of a split, or of a folder of image files, computed by a trained network and
written to a feature file: the work of ``python -m snca_ext.export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS, WITHIN_GROUPS, image_file_transform
from .data.imagefolder import ImageFiles, header_problems, name_bad
from .errors import DataError, ExportError
from .feature_files import run_metadata, write_features
from .features import iter_features
from .trained import (
    CLASS_SETS,
    SPLITS,
    dataset_indices,
    load_trained_model,
    original_data_check,
    run_bundle,
    select_split,
)


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
    model, run_args = load_trained_model(
        checkpoint,
        device,
        trust=trust,
        arch=arch,
        dataset=dataset,
        before_unpickling=original_data_check(data_path, dataset),
    )
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    bundle = run_bundle(run_args, data_path)
    examples = select_split(bundle, run_args, split, classes)
    labels, indices = examples.targets.clone(), dataset_indices(examples)
    metadata = run_metadata(
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
    write_features(Path(out), batches, len(examples), int(run_args["low_dim"]), labels, indices, metadata)
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
    metadata = run_metadata(run_args, split="images", images=str(folder))
    batches = (
        features.cpu()
        for features, _ in iter_features(
            model, files, device, batch_size=batch_size, workers=workers, progress=progress
        )
    )
    relative = [path.relative_to(folder).as_posix() for path in paths]
    write_features(
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
