"""Data sets for SNCA training: every one yields ``(image, label, index)``, the index being the
example's row in the memory bank. ``digits`` is scikit-learn's handwritten digits (embedded: no
download); ``fashion-mnist`` reads Fashion-MNIST's IDX files (default: Debian's
``dataset-fashion-mnist``); ``cifar10`` and ``cifar100`` read CIFAR's python files from a local
folder (never running code from them);
``imagefolder`` reads an ImageNet-style ``train/`` and ``val/`` tree; ``omniglot`` reads
Omniglot's zips or folders (its alphabets are its coarse classes). Nothing here ever downloads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..arguments import parse_classes
from ..errors import DataError
from .base import ClassSubset, DataBundle, IndexedDataset, with_transform
from .cifar import cifar10_data, cifar100_data
from .digits import DigitsDataset, digits_data, load_digits_split
from .fashion_mnist import fashion_mnist_data
from .imagefolder import imagefolder_data
from .omniglot import omniglot_data

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "omniglot")
# The data sets that have a default location (--data optional).
DEFAULT_LOCATION = ("digits", "fashion-mnist")
# The data sets whose classes group into coarse ones (DataBundle.coarse_of).
COARSE_LABELLED = ("fashion-mnist", "cifar100", "omniglot")
# The data sets whose few-shot episodes draw their classes from one coarse class (Omniglot: one
# alphabet, the protocol of Lake et al.).
WITHIN_GROUPS = ("omniglot",)

__all__ = [
    "DATASETS",
    "WITHIN_GROUPS",
    "ClassSubset",
    "DataBundle",
    "DataError",
    "DigitsDataset",
    "IndexedDataset",
    "build_data",
    "cifar10_data",
    "cifar100_data",
    "digits_data",
    "fashion_mnist_data",
    "held_out_classes",
    "image_file_transform",
    "imagefolder_data",
    "load_digits_split",
    "omniglot_data",
    "run_data",
    "with_transform",
]


def build_data(
    name: str,
    path: str | Path | None = None,
    skip_bad_images: bool = False,
    *,
    omniglot_train: str = "",
    holdout_alphabets: str = "",
) -> DataBundle:
    """The ``DataBundle`` of dataset ``name`` (one of ``DATASETS``); ``path`` is required for
    ``cifar10``, ``imagefolder`` and ``omniglot``, optional for ``fashion-mnist`` and not used by
    ``digits``. ``skip_bad_images``: an image folder's unreadable files are left out instead of
    refused. ``omniglot_train`` (split names, "" for all found) and ``holdout_alphabets`` (names):
    which Omniglot characters are trained on (the others are the bundle's ``novel_classes``)."""
    if name not in DATASETS:
        raise DataError(f"--dataset must be one of {DATASETS}, got {name!r}")
    if name != "omniglot" and (omniglot_train or holdout_alphabets):
        raise DataError(f"--omniglot-train and --holdout-alphabets are for --dataset omniglot, got {name}")
    if name == "digits":
        return digits_data()
    if name == "fashion-mnist":
        return fashion_mnist_data(path)
    if path is None:
        raise DataError(f"--dataset {name} needs --data PATH (a local folder; nothing is downloaded)")
    if name == "cifar10":
        return cifar10_data(path)
    if name == "cifar100":
        return cifar100_data(path)
    if name == "omniglot":
        return omniglot_data(path, train_splits=omniglot_train, holdout_alphabets=holdout_alphabets)
    return imagefolder_data(path, skip_bad=skip_bad_images)


def run_data(
    run: Mapping[str, Any], path: str | Path | None = None, skip_bad_images: bool = False
) -> DataBundle:
    """The data of a run (a ``RunConfig.run_dict()`` or a checkpoint's ``args``), read from
    ``path`` (default: the run's own folder)."""
    return build_data(
        run["dataset"],
        run.get("data") if path is None else path,
        skip_bad_images,
        omniglot_train=run.get("omniglot_train") or "",
        holdout_alphabets=run.get("holdout_alphabets") or "",
    )


def held_out_classes(data: DataBundle, holdout_classes: str) -> tuple[int, ...]:
    """The novel classes of a run: ``--holdout-classes`` (ids, "5,6,7") and the data set's own
    (``DataBundle.novel_classes``: Omniglot's alphabets not trained on), sorted."""
    return tuple(sorted(set(parse_classes(holdout_classes)) | set(data.novel_classes)))


def image_file_transform(name: str) -> Callable:
    """The test-time transform of data set ``name`` for a picture read from a file (an RGB PIL
    image of any size; ``export --images``): the same resizing and standardisation as its test
    images. Omniglot's expects dark ink on a light background, as Omniglot's files are."""
    from torchvision import transforms

    from .cifar import cifar_test_transform
    from .fashion_mnist import MEAN, STD
    from .imagefolder import imagenet_test_transform
    from .omniglot import file_transform

    if name == "omniglot":
        return file_transform
    if name == "imagefolder":
        return imagenet_test_transform()
    if name in ("cifar10", "cifar100"):
        return transforms.Compose([transforms.Resize((32, 32)), cifar_test_transform()])
    if name == "fashion-mnist":
        return transforms.Compose(
            [
                transforms.Grayscale(),
                transforms.Resize((28, 28)),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )
    raise DataError(
        f"--images: the {name} network takes no image files (scikit-learn's 8 x 8 digits are arrays, not "
        "pictures); use a network trained on omniglot, fashion-mnist, cifar10, cifar100 or imagefolder"
    )
