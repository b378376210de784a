"""An ImageNet-style ``train/<class>/`` and ``val/<class>/`` tree, with the original ImageNet
augmentation."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets, transforms

from ..errors import DataError
from .base import DataBundle, IndexedDataset, with_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        train_plain=IndexedDataset(with_transform(train, imagenet_test_transform(image_size)), train_targets),
        test=IndexedDataset(test, torch.tensor(test.targets, dtype=torch.long)),
        num_classes=len(train.classes),
    )
