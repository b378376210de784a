"""Datasets for SNCA training: every one yields ``(image, label, index)``.

The index is the example's row in the memory bank. ``digits`` is scikit-learn's handwritten digits
(shipped inside scikit-learn, so it needs no download); ``cifar10`` reads torchvision's CIFAR-10
files from a local folder; ``imagefolder`` reads an ImageNet-style ``train/`` and ``val/`` tree.
Nothing here ever downloads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.vision import StandardTransform, VisionDataset

DATASETS = ("digits", "cifar10", "imagefolder")

# The original CIFAR-10 normalisation.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """A data folder that is missing or does not have the expected layout."""


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` to yield ``(image, label, index)``."""

    def __init__(self, dataset: Dataset, targets: Tensor) -> None:
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


class ClassSubset(IndexedDataset):
    """The examples of ``parent`` at ``rows``, yielding ``(image, label, position in the subset)``
    (so the position is the bank row); ``rows[position]`` is the example's index in ``parent``.
    Labels keep their class ids."""

    def __init__(self, parent: IndexedDataset, rows: Tensor) -> None:
        super().__init__(Subset(parent.dataset, rows.tolist()), parent.targets[rows])
        self.parent = parent
        self.rows = rows


def parse_classes(text: str) -> tuple[int, ...]:
    """``"5,6,7"`` -> ``(5, 6, 7)`` (sorted, no duplicates); ``""`` -> ``()``."""
    try:
        classes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"expected comma-separated class ids like '5,6,7,8,9', got {text!r}") from None
    if any(c < 0 for c in classes):
        raise ValueError(f"class ids must be >= 0, got {text!r}")
    return tuple(sorted(classes))


@dataclass
class DataBundle:
    """What training needs: the augmented training set, the same images with the test transform
    (to recompute the bank), the test set, the bank labels and the class count."""

    train: IndexedDataset
    train_plain: IndexedDataset
    test: IndexedDataset
    num_classes: int

    @property
    def train_labels(self) -> Tensor:
        return self.train.targets

    def select_classes(self, classes: Sequence[int]) -> DataBundle:
        """The same data restricted to the examples of ``classes`` (train, train_plain and test),
        with the class ids and ``num_classes`` unchanged; yielded indices are positions in the
        subset (``ClassSubset.rows`` maps them back)."""
        wanted = torch.tensor(sorted(set(classes)), dtype=torch.long)
        bad = [c for c in wanted.tolist() if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(f"class ids must be in [0, {self.num_classes}), got {bad}")

        def subset(dataset: IndexedDataset) -> ClassSubset:
            return ClassSubset(dataset, torch.isin(dataset.targets, wanted).nonzero().flatten())

        return DataBundle(
            train=subset(self.train),
            train_plain=subset(self.train_plain),
            test=subset(self.test),
            num_classes=self.num_classes,
        )

    def split_holdout(self, holdout: Sequence[int]) -> tuple[DataBundle, DataBundle]:
        """``(seen, novel)``: the bundle without the ``holdout`` classes (to train on) and the
        bundle of only those (the novel-class evaluation)."""
        held = set(holdout)
        seen = [c for c in range(self.num_classes) if c not in held]
        return self.select_classes(seen), self.select_classes(sorted(held))


# ----------------------------------------------------------------------------- digits


class DigitsDataset(Dataset):
    """8 x 8 grey images in [0, 1] as [1, 8, 8] tensors, with an optional tensor transform."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable | None = None) -> None:
        self.images = images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class RandomShift:
    """Moves the image by up to ``pixels`` in each direction, filling with zeros (the background).

    Handwriting is not centred exactly; on 8 x 8 images a one-pixel shift is the cheapest useful
    augmentation.
    """

    def __init__(self, pixels: int = 1) -> None:
        self.pixels = pixels

    def __call__(self, image: Tensor) -> Tensor:
        size = self.pixels
        padded = torch.nn.functional.pad(image, (size, size, size, size))
        top, left = torch.randint(0, 2 * size + 1, (2,)).tolist()
        return padded[:, top : top + image.shape[1], left : left + image.shape[2]]


def load_digits_split(seed: int = DIGITS_SPLIT_SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits split 75/25 stratified: (train_images, train_labels, test_images,
    test_labels), images [n, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_rows, test_rows = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=seed
    )
    train_rows, test_rows = torch.from_numpy(train_rows), torch.from_numpy(test_rows)
    return images[train_rows], labels[train_rows], images[test_rows], labels[test_rows]


def digits_data(augment: bool = True) -> DataBundle:
    train_images, train_labels, test_images, test_labels = load_digits_split()
    train = DigitsDataset(train_images, train_labels, RandomShift(1) if augment else None)
    return DataBundle(
        train=IndexedDataset(train, train_labels),
        train_plain=IndexedDataset(DigitsDataset(train_images, train_labels), train_labels),
        test=IndexedDataset(DigitsDataset(test_images, test_labels), test_labels),
        num_classes=10,
    )


# ----------------------------------------------------------------------------- CIFAR-10


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


def _with_transform(dataset: VisionDataset, transform) -> VisionDataset:
    """The same dataset (images shared, not re-read) with another transform."""
    other = copy.copy(dataset)
    other.transform = transform
    other.transforms = StandardTransform(transform, dataset.target_transform)
    return other


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
        train_plain=IndexedDataset(_with_transform(train, cifar_test_transform()), train_targets),
        test=IndexedDataset(test, torch.tensor(test.targets, dtype=torch.long)),
        num_classes=10,
    )


# ----------------------------------------------------------------------------- ImageFolder


def imagenet_train_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_test_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(size * 256 // 224),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _image_folder(path: Path, split: str, transform, expected: str) -> datasets.ImageFolder:
    folder = path / split
    if not folder.is_dir():
        raise DataError(f"--data {path} has no {split}/ folder; {expected}")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:  # no class folder / a class with no image
        raise DataError(f"--data {path}: {split}/ is not a valid image tree ({error}); {expected}") from error


def imagefolder_data(path: str | Path, image_size: int = 224) -> DataBundle:
    path = Path(path)
    expected = (
        "expected an ImageNet-style tree: train/<class>/<image> and val/<class>/<image> with the same "
        "class folders in both (images .jpg, .jpeg, .png, ...)"
    )
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {expected}")
    train = _image_folder(path, "train", imagenet_train_transform(image_size), expected)
    test = _image_folder(path, "val", imagenet_test_transform(image_size), expected)
    if test.classes != train.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_val = sorted(set(test.classes) - set(train.classes))[:5]
        raise DataError(
            f"--data {path}: train/ and val/ have different class folders "
            f"(only in train/: {only_train}, only in val/: {only_val}); {expected}"
        )
    train_targets = torch.tensor(train.targets, dtype=torch.long)
    return DataBundle(
        train=IndexedDataset(train, train_targets),
        train_plain=IndexedDataset(
            _with_transform(train, imagenet_test_transform(image_size)), train_targets
        ),
        test=IndexedDataset(test, torch.tensor(test.targets, dtype=torch.long)),
        num_classes=len(train.classes),
    )


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
