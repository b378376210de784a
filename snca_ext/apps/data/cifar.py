"""CIFAR-10 and CIFAR-100 from local folders of their python versions (``cifar-10-batches-py/``,
``cifar-100-python/``; nothing is downloaded), with the original SNCA augmentation.

The batch files are Python pickles. They are read by an unpickler that admits only what CIFAR
files contain (dicts, lists, bytes, strings, numbers and numpy arrays), so a data folder can never
run code: a file that names any other Python object is refused with the file named.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import DataError
from .base import DataBundle, IndexedDataset, with_transform

# The original CIFAR normalisation.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The only globals a CIFAR pickle needs: numpy's array reconstructors (their numpy 1 and numpy 2
# module names) and _codecs.encode, through which Python 3 pickles bytes at protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR files never hold")
        return super().find_class(module, name)


def read_cifar_file(path: Path) -> dict[str, Any]:
    """The dict of a CIFAR python-version file, keys as str, read without running any code."""
    try:
        with open(path, "rb") as file:
            content = _DataUnpickler(file, encoding="bytes").load()
    except Exception as error:  # a damaged or hostile file surfaces as any of pickle's many errors
        raise DataError(
            f"{path}: not a CIFAR python-version batch ({error}); nothing in it was executed"
        ) from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: holds a {type(content).__name__}, expected a dict of a CIFAR batch")
    return {
        key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in content.items()
    }


def _images(path: Path, content: dict[str, Any]) -> np.ndarray:
    data = content.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array [n, 3072], got {type(data).__name__} {shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(path: Path, content: dict[str, Any], key: str, count: int, classes: int) -> list[int]:
    labels = content.get(key)
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != count:
        raise DataError(f"{path}: '{key}' must list {count} labels, got {type(labels).__name__}")
    labels = [int(label) for label in labels]
    if labels and (min(labels) < 0 or max(labels) >= classes):
        raise DataError(f"{path}: '{key}' must be in [0, {classes}), got {min(labels)}..{max(labels)}")
    return labels


def _names(path: Path, key: str, count: int) -> list[str] | None:
    """Class names from a meta file when it is there and sane (they are only for display)."""
    if not path.is_file():
        return None
    names = read_cifar_file(path).get(key)
    if not isinstance(names, list) or len(names) != count:
        return None
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


class CifarImages(Dataset):
    """uint8 images [n, 32, 32, 3] as PIL images through ``transform``: ``(image, label)``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str], transform=None):
        self.data = images
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform: Callable | None = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def cifar_train_transform() -> transforms.Compose:
    """The original SNCA CIFAR augmentation, in its order: a random resized crop, random grayscale,
    then colour jitter (on the possibly grey image), horizontal flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(32, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def cifar_test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])


def _folder(path: Path, folder_name: str, files: Sequence[str], what: str) -> Path:
    """The folder ``folder_name`` under ``path`` (or ``path`` itself), checked to hold ``files``."""
    expected = (
        f"expected the {what} python version: a folder holding {folder_name}/ with {', '.join(files)} "
        f"(extract the python version's archive there; nothing is downloaded)"
    )
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {expected}")
    folder = path if path.name == folder_name else path / folder_name
    if not folder.is_dir():
        raise DataError(f"--data {path} has no {folder_name}/ folder; {expected}")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"--data {path}: {folder} lacks {', '.join(missing)}; {expected}")
    return folder


def _bundle(train: CifarImages, test: CifarImages, num_classes: int, **extra) -> DataBundle:
    train.transform, test.transform = cifar_train_transform(), cifar_test_transform()
    train_targets = torch.tensor(train.targets, dtype=torch.long)
    return DataBundle(
        train=IndexedDataset(train, train_targets),
        train_plain=IndexedDataset(with_transform(train, cifar_test_transform()), train_targets),
        test=IndexedDataset(test, torch.tensor(test.targets, dtype=torch.long)),
        num_classes=num_classes,
        **extra,
    )


def cifar10_data(path: str | Path) -> DataBundle:
    """CIFAR-10 from ``path``/cifar-10-batches-py (or that folder); ``batches.meta`` is optional."""
    folder = _folder(Path(path), CIFAR_FOLDER, CIFAR_FILES, "CIFAR-10")
    classes = _names(folder / "batches.meta", "label_names", 10) or list(CIFAR_CLASSES)
    splits = {}
    for split, names in (("train", CIFAR_FILES[:5]), ("test", CIFAR_FILES[5:])):
        images, labels = [], []
        for name in names:
            content = read_cifar_file(folder / name)
            batch = _images(folder / name, content)
            images.append(batch)
            labels += _labels(folder / name, content, "labels", len(batch), 10)
        splits[split] = CifarImages(np.concatenate(images), labels, classes)
        if len(labels) == 0:
            raise DataError(f"--data {path}: the CIFAR-10 {split} batches hold no image")
    return _bundle(splits["train"], splits["test"], 10)


def cifar100_data(path: str | Path) -> DataBundle:
    """CIFAR-100 from ``path``/cifar-100-python (or that folder): 100 fine classes, each in one of
    20 coarse superclasses (``DataBundle.coarse_of``); ``meta`` (the names) is optional."""
    folder = _folder(Path(path), CIFAR100_FOLDER, CIFAR100_FILES, "CIFAR-100")
    fine_names = _names(folder / "meta", "fine_label_names", 100) or [str(i) for i in range(100)]
    coarse_names = _names(folder / "meta", "coarse_label_names", 20) or [str(i) for i in range(20)]
    splits, coarse = {}, {}
    for split in CIFAR100_FILES:
        content = read_cifar_file(folder / split)
        images = _images(folder / split, content)
        fine = _labels(folder / split, content, "fine_labels", len(images), 100)
        coarse[split] = _labels(folder / split, content, "coarse_labels", len(images), 20)
        if not fine:
            raise DataError(f"--data {path}: the CIFAR-100 {split} file holds no image")
        splits[split] = CifarImages(images, fine, fine_names)
    coarse_of = torch.full((100,), -1, dtype=torch.long)  # -1: a class with no example here
    for split in CIFAR100_FILES:
        pairs = torch.tensor([splits[split].targets, coarse[split]]).T.unique(dim=0)
        known = coarse_of[pairs[:, 0]]
        if len(pairs[:, 0].unique()) != len(pairs) or bool(((known >= 0) & (known != pairs[:, 1])).any()):
            raise DataError(f"--data {path}: a CIFAR-100 fine class is in two coarse classes ('{split}')")
        coarse_of[pairs[:, 0]] = pairs[:, 1]
    return _bundle(splits["train"], splits["test"], 100, coarse_of=coarse_of, coarse_classes=coarse_names)
