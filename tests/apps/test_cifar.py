"""CIFAR-10 and CIFAR-100 folders: read without ever running code from them, CIFAR-100's coarse
classes, and the original augmentation order."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data_folders import make_cifar_folder
from torchvision import transforms

from snca_ext.apps.data import DataError, build_data
from snca_ext.apps.data.cifar import cifar_train_transform
from snca_ext.apps.train.cli import EXIT_USAGE, run


def make_cifar100_folder(root: Path, train: int = 40, test: int = 20, protocol: int = 2) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with random images, 100 fine classes and
    fine class c in coarse class c // 5, as in the real files' layout (bytes keys, as Python 2
    wrote them)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(2)
    for name, count in (("train", train), ("test", test)):
        fine = [int(c) for c in generator.integers(0, 100, count)]
        content = {
            b"data": generator.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"fine_labels": fine,
            b"coarse_labels": [c // 5 for c in fine],
            b"filenames": [f"{i}.png".encode() for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(names, protocol=protocol))
    return root


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_fine_and_coarse_labels(tmp_path, protocol):
    make_cifar100_folder(tmp_path, protocol=protocol)
    data = build_data("cifar100", tmp_path)
    assert (len(data.train), len(data.test), data.num_classes) == (40, 20, 100)
    present = data.train.targets.unique()
    assert torch.equal(data.coarse_of[present], present // 5)
    coarse = data.coarse()
    assert coarse.num_classes == 20
    assert torch.equal(coarse.train.targets, data.train.targets // 5)
    image, label, index = coarse.test[3]
    assert image.shape == (3, 32, 32) and label == int(data.test.targets[3]) // 5 and index == 3


def test_a_data_file_that_would_run_code_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    make_cifar_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(), "labels": [0]}))
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR python-version batch .*posix\.system"):
        build_data("cifar10", tmp_path)
    assert run(["--dataset", "cifar10", "--data", str(tmp_path), "--epochs", "1"]) == EXIT_USAGE
    assert "data_batch_2" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_malformed_cifar_content_is_refused(tmp_path):
    make_cifar_folder(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataError, match=r"'data' must be a uint8 array \[n, 3072\]"):
        build_data("cifar10", tmp_path)
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}))
    with pytest.raises(DataError, match=r"'labels' must be in \[0, 10\)"):
        build_data("cifar10", tmp_path)


def test_the_augmentation_keeps_the_original_order():
    kinds = [type(step) for step in cifar_train_transform().transforms]
    assert kinds[:4] == [
        transforms.RandomResizedCrop,
        transforms.RandomGrayscale,  # before the colour jitter, as the original SNCA code
        transforms.ColorJitter,
        transforms.RandomHorizontalFlip,
    ]
