"""Data sets for SNCA training: every one yields ``(image, label, index)``, the index being the
example's row in the memory bank. ``digits`` is scikit-learn's handwritten digits (embedded: no
download); ``fashion-mnist`` reads Fashion-MNIST's IDX files (default: Debian's
``dataset-fashion-mnist``); ``cifar10`` and ``cifar100`` read CIFAR's python files from a local
folder (never running code from them);
``imagefolder`` reads an ImageNet-style ``train/`` and ``val/`` tree. Nothing here ever downloads.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import ClassSubset, DataBundle, IndexedDataset, with_transform
from .cifar import cifar10_data, cifar100_data
from .digits import DigitsDataset, digits_data, load_digits_split
from .fashion_mnist import fashion_mnist_data
from .imagefolder import imagefolder_data

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
# The data sets that have a default location (--data optional).
DEFAULT_LOCATION = ("digits", "fashion-mnist")
# The data sets whose classes group into coarse ones (DataBundle.coarse_of).
COARSE_LABELLED = ("fashion-mnist", "cifar100")

__all__ = [
    "DATASETS",
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
    "imagefolder_data",
    "load_digits_split",
    "with_transform",
]


def build_data(name: str, path: str | Path | None = None, skip_bad_images: bool = False) -> DataBundle:
    """The ``DataBundle`` of dataset ``name`` (one of ``DATASETS``); ``path`` is required for
    ``cifar10`` and ``imagefolder``, optional for ``fashion-mnist`` and not used by ``digits``.
    ``skip_bad_images``: an image folder's unreadable files are left out instead of refused."""
    if name not in DATASETS:
        raise DataError(f"--dataset must be one of {DATASETS}, got {name!r}")
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
    return imagefolder_data(path, skip_bad=skip_bad_images)
