"""scikit-learn's handwritten digits (8 x 8, shipped inside scikit-learn, so nothing is
downloaded): the embedded default data set, split 75/25 stratified with a fixed seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataBundle, IndexedDataset

DIGITS_SPLIT_SEED = 0


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
