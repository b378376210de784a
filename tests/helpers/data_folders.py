"""Data folders in the layouts the applications read, with random images: CIFAR-10's python
batches, an ImageNet-style tree, and a PNG header (what a decompression bomb shows)."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from snca_ext.apps.data.cifar import CIFAR_FILES


def make_cifar_folder(root: Path, per_batch: int = 8, test_size: int = 10, meta: bool = True) -> Path:
    """A CIFAR-10 python-version folder with random images: ``root/cifar-10-batches-py/...``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in CIFAR_FILES:
        count = test_size if name == "test_batch" else per_batch
        batch = {
            "data": generator.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": [int(label) for label in generator.integers(0, 10, count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    if meta:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=(4, 2), size=40) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` with random images."""
    generator = np.random.default_rng(1)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature, an IHDR chunk claiming ``width`` x ``height`` RGB pixels and a first
    IDAT chunk: what a decompression bomb shows before its pixels are decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
