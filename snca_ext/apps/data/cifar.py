"""CIFAR-10 from a local ``cifar-10-batches-py/`` folder (the python version; nothing is
downloaded), with the original SNCA augmentation."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets, transforms

from ..errors import DataError
from .base import DataBundle, IndexedDataset, with_transform

# The original CIFAR-10 normalisation.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def cifar_train_transform() -> transforms.Compose:
    """The original augmentation (the lemniscate / SNCA CIFAR-10 code)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(32, scale=(0.2, 1.0)),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def cifar_test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _LocalCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader that only checks that the files exist.

    torchvision also compares MD5 sums with the official archive's, which rejects any other
    CIFAR-10-format folder (a subset, a re-export); the layout was checked by ``cifar10_data``.
    ``batches.meta`` (class names only) is optional.
    """

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / name).is_file() for name in CIFAR_FILES)

    def _load_meta(self) -> None:
        if (Path(self.root) / self.base_folder / self.meta["filename"]).is_file():
            self.meta = {**self.meta, "md5": None}  # check_integrity(md5=None) checks existence only
            super()._load_meta()
        else:
            self.classes = list(CIFAR_CLASSES)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _cifar_root(path: Path) -> Path:
    """The folder that holds ``cifar-10-batches-py``; ``path`` may also be that folder itself."""
    expected = (
        f"expected the CIFAR-10 python version: a folder holding {CIFAR_FOLDER}/ with "
        f"{', '.join(CIFAR_FILES)} (extract cifar-10-python.tar.gz there; nothing is downloaded)"
    )
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {expected}")
    root = path.parent if path.name == CIFAR_FOLDER else path
    folder = root / CIFAR_FOLDER
    if not folder.is_dir():
        raise DataError(f"--data {path} has no {CIFAR_FOLDER}/ folder; {expected}")
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"--data {path}: {folder} lacks {', '.join(missing)}; {expected}")
    return root


def cifar10_data(path: str | Path) -> DataBundle:
    root = _cifar_root(Path(path))
    try:
        train = _LocalCIFAR10(str(root), train=True, transform=cifar_train_transform())
        test = _LocalCIFAR10(str(root), train=False, transform=cifar_test_transform())
    except Exception as error:  # a corrupt batch file surfaces as any of pickle's many errors
        raise DataError(
            f"--data {path}: could not read the CIFAR-10 batches in {root / CIFAR_FOLDER} ({error}); "
            f"expected the python version of CIFAR-10 (pickled dicts with b'data' [n, 3072] uint8 "
            f"and b'labels')"
        ) from error
    for name, dataset in (("train", train), ("test", test)):
        if len(dataset) == 0 or dataset.data.shape[1:] != (32, 32, 3):
            raise DataError(
                f"--data {path}: the CIFAR-10 {name} batches hold images of shape "
                f"{tuple(dataset.data.shape)}, expected [n > 0, 32, 32, 3]"
            )
    train_targets = torch.tensor(train.targets, dtype=torch.long)
    if int(train_targets.min()) < 0 or int(train_targets.max()) >= 10:
        raise DataError(
            f"--data {path}: CIFAR-10 labels must be in [0, 10), got {train_targets.unique().tolist()}"
        )
    return DataBundle(
        train=IndexedDataset(train, train_targets),
        train_plain=IndexedDataset(with_transform(train, cifar_test_transform()), train_targets),
        test=IndexedDataset(test, torch.tensor(test.targets, dtype=torch.long)),
        num_classes=10,
    )
