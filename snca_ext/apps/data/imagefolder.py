"""An ImageNet-style ``train/<class>/`` and ``val/<class>/`` tree, with the original ImageNet
augmentation."""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ..errors import DataError
from .base import DataBundle, IndexedDataset, with_transform

log = logging.getLogger(__name__)

# Up to this many bad files are named in a message.
_NAMED = 5


class BadImageError(DataError):
    """An image file that could not be decoded when a loader reached it (its header was fine)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Raised in a DataLoader worker, it is re-raised in the main process with the worker's
        # traceback before the message; the reason is the text after the last class name.
        self.reason = message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip()


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` in RGB (torchvision's loader, with an error that names the file)."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"{path} could not be read as an image ({error})") from error


def header_problem(path: str) -> str | None:
    """Why the image at ``path`` cannot be used, from its header alone (cheap: no pixel is
    decoded), or None. More pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` is refused as a
    decompression bomb."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        return f"decompression bomb: {error}"
    except (OSError, SyntaxError, ValueError) as error:  # not an image, truncated header, empty
        return f"not a readable image: {error}"
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return (
            f"decompression bomb: {width} x {height} = {width * height} pixels, more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}"
        )
    return None


def header_problems(paths: list[str]) -> list[str | None]:
    """``header_problem`` of every path, in order, read by a pool of threads."""
    with warnings.catch_warnings():
        # The pixel limit is checked explicitly; PIL's own warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=16) as pool:  # file reads: threads overlap the waits
            return list(pool.map(header_problem, paths))


def name_bad(bad: list[tuple[str, str]]) -> str:
    """The first bad files and their problems, for a message: ``"a.jpg (why); b.png (why) and 3
    more"``."""
    named = "; ".join(f"{path} ({problem})" for path, problem in bad[:_NAMED])
    return named + (f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else "")


def check_images(folder: datasets.ImageFolder, where: str, split: str, skip_bad: bool) -> None:
    """Reads every image's header before training starts; a file that is not an image, is
    truncated before its pixels or is a decompression bomb stops the run here with the files
    named, or with ``skip_bad`` is left out (named on stderr). Files whose pixels are damaged
    past a sound header are found by ``load_rgb`` when the loader reaches them."""
    paths = [path for path, _ in folder.samples]
    problems = header_problems(paths)
    bad = [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None]
    if not bad:
        return
    named = name_bad(bad)
    if not skip_bad:
        raise DataError(
            f"{where}: {len(bad)} of the {len(paths)} files in {split}/ cannot be used as images: "
            f"{named}. "
            "Remove or replace them, or pass --skip-bad-images to leave them out"
        )
    log.warning(f"warning: left out {len(bad)} of the {len(paths)} files in {split}/: {named}")
    keep = [problem is None for problem in problems]
    folder.samples = [sample for sample, kept in zip(folder.samples, keep, strict=True) if kept]
    folder.imgs = folder.samples
    folder.targets = [target for _, target in folder.samples]
    if not folder.samples:
        raise DataError(f"{where}: {split}/ has no usable image left")


class ImageFiles(Dataset):
    """Image files, in the given order, read by ``load_rgb`` and put through ``transform``:
    ``(image, -1, index)`` (they have no class)."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths = paths
        self.transform = transform
        self.targets = torch.full((len(paths),), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), -1, index


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


def _image_folder(path: Path, split: str, transform, expected: str, skip_bad: bool) -> datasets.ImageFolder:
    folder = path / split
    if not folder.is_dir():
        raise DataError(f"--data {path} has no {split}/ folder; {expected}")
    try:
        images = datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as error:  # no class folder / a class with no image
        raise DataError(f"--data {path}: {split}/ is not a valid image tree ({error}); {expected}") from error
    check_images(images, f"--data {path}", split, skip_bad)
    return images


def imagefolder_data(path: str | Path, image_size: int = 224, skip_bad: bool = False) -> DataBundle:
    """The train/ and val/ trees under ``path``; every image's header is checked first
    (``check_images``; ``skip_bad`` leaves the bad files out instead of stopping)."""
    path = Path(path)
    expected = (
        "expected an ImageNet-style tree: train/<class>/<image> and val/<class>/<image> with the same "
        "class folders in both (images .jpg, .jpeg, .png, ...)"
    )
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {expected}")
    train = _image_folder(path, "train", imagenet_train_transform(image_size), expected, skip_bad)
    test = _image_folder(path, "val", imagenet_test_transform(image_size), expected, skip_bad)
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
