"""Data sets for SNCA training: every one yields ``(image, label, index)``, the index being the
example's row in the memory bank. ``digits`` is scikit-learn's handwritten digits (embedded: no
download); ``cifar10`` reads CIFAR-10's python files from a local folder; ``imagefolder`` reads an
ImageNet-style ``train/`` and ``val/`` tree. Nothing here ever downloads.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import ClassSubset, DataBundle, IndexedDataset, with_transform
from .cifar import cifar10_data
from .digits import DigitsDataset, digits_data, load_digits_split
from .imagefolder import imagefolder_data

DATASETS = ("digits", "cifar10", "imagefolder")

__all__ = [
    "DATASETS",
    "ClassSubset",
    "DataBundle",
    "DataError",
    "DigitsDataset",
    "IndexedDataset",
    "build_data",
    "cifar10_data",
    "digits_data",
    "imagefolder_data",
    "load_digits_split",
    "with_transform",
]


def build_data(name: str, path: str | Path | None = None) -> DataBundle:
    """The ``DataBundle`` of dataset ``name`` (one of ``DATASETS``); ``path`` is required for
    ``cifar10`` and ``imagefolder``."""
    if name == "digits":
        return digits_data()
    if name not in DATASETS:
        raise DataError(f"--dataset must be one of {DATASETS}, got {name!r}")
    if path is None:
        raise DataError(f"--dataset {name} needs --data PATH (a local folder; nothing is downloaded)")
    if name == "cifar10":
        return cifar10_data(path)
    return imagefolder_data(path)
