"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): handwritten characters of 50
alphabets, 20 drawers each, 105 x 105 one-bit images of black ink on white, read from a folder
holding Omniglot's zips (read with ``zipfile``, never unpacked) or their unzipped folders:

    images_background_small1.zip   5 alphabets, 136 characters  (split name: small1)
    images_background_small2.zip   5 alphabets, 156 characters  (small2)
    images_background.zip         30 alphabets, 964 characters  (background)
    images_evaluation.zip         20 alphabets, 659 characters  (evaluation)

each laid out ``<split>/<Alphabet>/characterNN/<id>_<drawer>.png``. One class per (alphabet,
character), counted once however many splits hold it (the two minimal splits both hold Greek and
Latin: together 242 characters, 4,840 images), named ``"Alphabet/characterNN"``; where two splits
hold the same file name, the first split in ``SPLITS`` order gives the image. Each class's
alphabet is its coarse class (``DataBundle.coarse_of``): within-alphabet few-shot episodes draw
their classes from one alphabet.

Images are inverted (ink 1, background 0, like MNIST: the zero padding of convolutions and of
the affine augmentation is then background) and reduced to 28 x 28 by area averaging (PIL's box
filter): each output pixel is the fraction of ink in its 3.75 x 3.75 source area, so a stroke two
source pixels wide stays visible as grey instead of vanishing between samples (nearest or an
unfiltered bilinear would alias it away), and no value leaves [0, 1] (Lanczos rings around
strokes).

Split of the examples: drawers 1-15 of every character train, drawers 16-20 test.
``train_splits`` trains on the characters of some splits only, and ``holdout_alphabets`` holds
whole alphabets out: every character not trained on is a novel class (``DataBundle.novel_classes``),
e.g. ``train_splits=("small1",)`` with both minimal splits leaves the 106 characters of
Japanese_(katakana), Sanskrit and Tagalog novel.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import DataError
from .base import DataBundle, IndexedDataset
from .fashion_mnist import GreyImages

# Short name -> the zip's stem and its root folder.
SPLITS = {
    "small1": "images_background_small1",
    "small2": "images_background_small2",
    "background": "images_background",
    "evaluation": "images_evaluation",
}
SIZE = 28
TRAIN_DRAWERS = 15  # drawers 1..15 train, 16..20 test
# Pixel statistics of the 28 x 28 ink images (in [0, 1]) of both minimal splits' training drawers.
MEAN, STD = 0.0805, 0.2360
_FILE_NAME = re.compile(r"^\d+_(\d+)\.png$")
_LAYOUT = "<split>/<Alphabet>/characterNN/<id>_<drawer>.png"
_EXPECTED = (
    f"expected Omniglot's zips or their folders ({', '.join(f'{name}[.zip]' for name in SPLITS.values())}), "
    f"laid out {_LAYOUT}"
)


def ink_image(image: Image.Image) -> Tensor:
    """A picture of dark ink on a light background as Omniglot's network input before
    standardisation: uint8 [28, 28], ink high, reduced by area averaging (module docstring)."""
    ink = ImageOps.invert(image.convert("L"))
    return torch.from_numpy(np.asarray(ink.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8).copy())


def decode(data: bytes, where: str) -> Tensor:
    """``ink_image`` of the PNG bytes ``data``; DataError naming ``where`` if they are not one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            ink = ink_image(image) if kind == "PNG" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: not a readable PNG image ({error})") from error
    if ink is None:
        raise DataError(f"{where}: not a PNG file (a {kind} image); {_EXPECTED}")
    return ink


@dataclass
class _Character:
    splits: list[str] = field(default_factory=list)
    images: dict[str, tuple[int, Callable[[], bytes], str]] = field(default_factory=dict)


def _entries(
    split: str, source: Path, files: ExitStack
) -> Iterator[tuple[tuple[str, ...], Callable[[], bytes] | None, str]]:
    """``(parts below the split folder, reader of the file's bytes or None for a folder, where)``
    of every entry of a split's zip (kept open by ``files``) or folder."""
    root = SPLITS[split]
    if source.suffix == ".zip":
        try:
            archive = files.enter_context(zipfile.ZipFile(source))
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(f"--data: {source} is not a readable zip file ({error})") from error
        for name in archive.namelist():
            parts = tuple(name.rstrip("/").split("/"))
            where = f"{source}:{name}"
            if parts[0] != root:
                raise DataError(f"{where}: outside the zip's {root}/ folder; {_EXPECTED}")
            yield parts[1:], None if name.endswith("/") else (lambda name=name: archive.read(name)), where
        return
    for path in sorted(source.rglob("*")):
        parts = path.relative_to(source).parts
        yield parts, None if path.is_dir() else path.read_bytes, str(path)


def _read_split(
    split: str, source: Path, characters: dict[tuple[str, str], _Character], files: ExitStack
) -> None:
    """Adds the characters of a split to ``characters`` (their images' readers, not yet read: a
    character another split already gave keeps those images), checking the layout."""
    folders: set[tuple[str, str]] = set()
    filled: set[tuple[str, str]] = set()
    for parts, reader, where in _entries(split, source, files):
        if reader is None:
            if len(parts) == 2:
                folders.add(parts)
            elif len(parts) > 2:
                raise DataError(f"{where}: a folder below a character folder; {_EXPECTED}")
            continue
        if len(parts) != 3:
            raise DataError(f"{where}: a file outside a character folder; {_EXPECTED}")
        alphabet, character, name = parts
        drawer = _FILE_NAME.match(name)
        if drawer is None:
            raise DataError(f"{where}: not an Omniglot image (expected <id>_<drawer>.png); {_EXPECTED}")
        folders.add((alphabet, character))
        filled.add((alphabet, character))
        entry = characters.setdefault((alphabet, character), _Character())
        if split not in entry.splits:
            entry.splits.append(split)
        entry.images.setdefault(name, (int(drawer.group(1)), reader, where))
    if not folders:
        raise DataError(f"--data: {source} holds no {_LAYOUT} at all; {_EXPECTED}")
    empty = sorted(f"{alphabet}/{character}" for alphabet, character in folders - filled)
    if empty:
        raise DataError(f"--data: {source}: character folder {empty[0]} holds no image ({len(empty)} such)")


def find_sources(path: str | Path) -> dict[str, Path]:
    """The splits found in ``path``: short name -> its folder (preferred: already unpacked) or zip."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist or is not a folder; {_EXPECTED}")
    found = {}
    for split, stem in SPLITS.items():
        for candidate in (path / stem, path / f"{stem}.zip"):
            if candidate.is_dir() or (candidate.suffix == ".zip" and candidate.is_file()):
                found[split] = candidate
                break
    if not found:
        raise DataError(f"--data {path} holds no Omniglot split; {_EXPECTED}")
    return found


def parse_names(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"A,B"`` (or a sequence) -> ``("A", "B")``, blanks dropped, order kept, no duplicates."""
    names = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(name.strip() for name in names if name.strip()))


def augmentation() -> Callable[[Tensor], Tensor]:
    """Mild affine jitter of a [1, 28, 28] ink image (small rotation, shear, scale and shift, the
    background filled with zeros): drawers vary in exactly these ways."""
    from torchvision import transforms

    return transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10)


def omniglot_data(
    path: str | Path,
    *,
    train_splits: str | Sequence[str] = (),
    holdout_alphabets: str | Sequence[str] = (),
    augment: bool = True,
) -> DataBundle:
    """The ``DataBundle`` of every Omniglot split found in ``path`` (module docstring);
    ``train_splits`` (short names, default all found) and ``holdout_alphabets`` (names as the
    folders spell them) say which characters are trained on, the rest are ``novel_classes``."""
    sources = find_sources(path)
    wanted = parse_names(train_splits) or tuple(sources)
    missing = [split for split in wanted if split not in sources]
    if missing:
        raise DataError(
            f"--omniglot-train {','.join(wanted)}: {', '.join(missing)} not in --data {path} "
            f"(found: {', '.join(sources)}; known split names: {', '.join(SPLITS)})"
        )
    characters: dict[tuple[str, str], _Character] = {}
    images, labels, drawers = [], [], []
    with ExitStack() as files:
        for split, source in sources.items():
            _read_split(split, source, characters, files)
        keys = sorted(characters)
        alphabets = sorted({alphabet for alphabet, _ in keys})
        held = parse_names(holdout_alphabets)
        unknown = [name for name in held if name not in alphabets]
        if unknown:
            raise DataError(
                f"--holdout-alphabets: no alphabet {', '.join(unknown)} in --data {path} "
                f"(found: {', '.join(alphabets)})"
            )
        for label, key in enumerate(keys):
            for name in sorted(characters[key].images):
                drawer, reader, where = characters[key].images[name]
                images.append(decode(reader(), where))
                labels.append(label)
                drawers.append(drawer)
    novel = tuple(
        label
        for label, key in enumerate(keys)
        if key[0] in held or not set(characters[key].splits) & set(wanted)
    )
    if len(novel) == len(keys):
        raise DataError(
            f"--omniglot-train {','.join(wanted)} and --holdout-alphabets {','.join(held)} leave no "
            "character to train on"
        )
    pixels, targets = torch.stack(images), torch.tensor(labels)
    is_train = torch.tensor(drawers) <= TRAIN_DRAWERS
    names = [f"{alphabet}/{character}" for alphabet, character in keys]

    def part(rows: Tensor, transform=None) -> IndexedDataset:
        dataset = GreyImages(
            pixels[rows], targets[rows], transform, mean=MEAN, std=STD, classes=names, inverted=True
        )
        return IndexedDataset(dataset, targets[rows])

    train_rows, test_rows = is_train.nonzero().flatten(), (~is_train).nonzero().flatten()
    return DataBundle(
        train=part(train_rows, augmentation() if augment else None),
        train_plain=part(train_rows),
        test=part(test_rows),
        num_classes=len(keys),
        coarse_of=torch.tensor([alphabets.index(alphabet) for alphabet, _ in keys]),
        coarse_classes=alphabets,
        classes=names,
        novel_classes=novel,
    )


def file_transform(image: Image.Image) -> Tensor:
    """A user's picture (dark ink on a light background, any size) as the network's test-time
    input: [1, 28, 28] standardised like the training images."""
    return ink_image(image).unsqueeze(0).float().div_(255.0).sub_(MEAN).div_(STD)
