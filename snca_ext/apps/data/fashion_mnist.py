"""Fashion-MNIST (Zalando: 60,000 training and 10,000 test images, 28 x 28 grey, 10 classes of
clothing) from its four IDX files in a local folder; nothing is downloaded.

The files are read by a small IDX parser (magic number, dimensions, raw uint8 data; gzip or not),
so a data folder is never unpickled. Where they are searched: ``--data DIR`` holding the files,
or torchvision's layout ``DIR/FashionMNIST/raw/``; without ``--data``, Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .base import DataBundle, IndexedDataset

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# A grouping of the ten classes into four (sub-category discovery: train on these, evaluate the
# kNN with the ten): tops, trousers and dresses, footwear, bags.
COARSE_CLASSES = ("tops", "trousers and dresses", "footwear", "bags")
COARSE_OF = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
# Pixel statistics of the training images (in [0, 1]).
MEAN, STD = 0.2860, 0.3530
_HOW_TO_GET = (
    "expected the four Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte"
    "[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in the folder or in its "
    "FashionMNIST/raw/; on Debian `apt-get install dataset-fashion-mnist` puts them in "
    f"{DEBIAN_FOLDER}"
)


def read_idx(path: Path, dims: int) -> Tensor:
    """The uint8 array of an IDX file (gzip-compressed when the name ends in .gz) with ``dims``
    dimensions: a 4-byte magic number (0x0000, type 0x08 = uint8, the number of dimensions), the
    dimensions as big-endian int32, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            head = file.read(4 + 4 * dims)
            if len(head) < 4 + 4 * dims:
                raise DataError(f"{path}: too short to be an IDX file")
            zero, kind, count = struct.unpack(">HBB", head[:4])
            if zero != 0 or kind != 0x08 or count != dims:
                raise DataError(
                    f"{path}: not an IDX file of {dims}-D uint8 data (magic {head[:4].hex()}, "
                    f"expected 000008{dims:02x})"
                )
            shape = struct.unpack(f">{dims}I", head[4:])
            expected = 1
            for size in shape:
                expected *= size
            data = file.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: could not be read ({error})") from error
    if len(data) != expected:
        raise DataError(f"{path}: holds {len(data)} bytes of data, its header says {expected} (truncated?)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def find_files(path: str | Path | None) -> dict[str, Path]:
    """The four files (``FILES`` keys) under ``path`` (default: Debian's folder)."""
    if path is None:
        if not DEBIAN_FOLDER.is_dir():
            raise DataError(f"--dataset fashion-mnist needs --data DIR (no {DEBIAN_FOLDER}); {_HOW_TO_GET}")
        path = DEBIAN_FOLDER
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {_HOW_TO_GET}")
    for folder in (path, path / "FashionMNIST" / "raw", path / "raw"):
        found = {}
        for key, name in FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
    raise DataError(f"--data {path} lacks the Fashion-MNIST files; {_HOW_TO_GET}")


class GreyImages(Dataset):
    """uint8 images [n, H, W] as float [1, H, W] tensors in [0, 1], standardised by ``mean`` and
    ``std`` (Fashion-MNIST's by default), with an optional tensor transform; ``(image, label)``."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable | None = None,
        *,
        mean: float = MEAN,
        std: float = STD,
        classes: Sequence[str] = CLASSES,
        inverted: bool = False,
    ) -> None:
        self.images = images
        # The images were inverted when read (Omniglot's ink made bright): shown inverted back.
        self.inverted = inverted
        self.targets = labels
        self.transform = transform
        self.mean, self.std = mean, std
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image.sub_(self.mean).div_(self.std), int(self.targets[index])


class RandomCropFlip:
    """The standard Fashion-MNIST augmentation: a random crop of the image padded by ``padding``
    zeros (background) on each side, and a horizontal flip with probability 1/2 (clothes are
    left-right symmetric; digits, where a flip would change the class, are not)."""

    def __init__(self, padding: int = 2) -> None:
        self.padding = padding

    def __call__(self, image: Tensor) -> Tensor:
        size = self.padding
        padded = torch.nn.functional.pad(image, (size, size, size, size))
        top, left, flip = torch.randint(0, 2 * size + 1, (3,)).tolist()
        image = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        return image.flip(-1) if flip % 2 else image


def fashion_mnist_data(path: str | Path | None = None, *, augment: bool = True) -> DataBundle:
    """The ``DataBundle`` of Fashion-MNIST read from ``path`` (see the module docstring)."""
    files = find_files(path)
    arrays = {key: read_idx(file, 3 if key.endswith("images") else 1) for key, file in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise DataError(
                f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels in "
                f"{files[f'{split}_images'].parent}"
            )
        if int(labels.max()) >= len(CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels must be in [0, 10), got {int(labels.max())}")
    train_labels = arrays["train_labels"].long()
    test_labels = arrays["test_labels"].long()
    train_images, test_images = arrays["train_images"], arrays["test_images"]
    return DataBundle(
        train=IndexedDataset(
            GreyImages(train_images, train_labels, RandomCropFlip(2) if augment else None), train_labels
        ),
        train_plain=IndexedDataset(GreyImages(train_images, train_labels), train_labels),
        test=IndexedDataset(GreyImages(test_images, test_labels), test_labels),
        num_classes=len(CLASSES),
        coarse_of=torch.tensor(COARSE_OF),
        coarse_classes=list(COARSE_CLASSES),
    )
