"""Datasets: the digits split, a tiny CIFAR-10-format folder and a tiny ImageFolder tree, and the
errors for folders that are missing or malformed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers.data_folders import make_cifar_folder, make_image_folder, png_header

from snca_ext.apps.arguments import configure_logging
from snca_ext.apps.data import DataError, build_data, digits_data, load_digits_split
from snca_ext.apps.data.digits import RandomShift


def test_digits_split_is_75_25_stratified_and_fixed():
    train_images, train_labels, test_images, test_labels = load_digits_split()
    assert train_images.shape == (1347, 1, 8, 8) and test_images.shape == (450, 1, 8, 8)
    assert 0.0 <= float(train_images.min()) and float(train_images.max()) <= 1.0
    train_counts, test_counts = Counter(train_labels.tolist()), Counter(test_labels.tolist())
    for digit in range(10):  # stratified: every class about 3:1
        assert abs(train_counts[digit] / (train_counts[digit] + test_counts[digit]) - 0.75) < 0.01
    again = load_digits_split()
    assert torch.equal(again[1], train_labels) and torch.equal(again[2], test_images)


def test_raw_pixel_knn_baseline_on_the_digits_split():
    """The baseline the README quotes: 1-NN on raw pixels gets 98.2% on this split."""
    train_images, train_labels, test_images, test_labels = load_digits_split()
    distances = torch.cdist(test_images.flatten(1), train_images.flatten(1))
    accuracy = float((train_labels[distances.argmin(1)] == test_labels).float().mean())
    assert accuracy == pytest.approx(0.98222, abs=1e-4)


def test_digits_items_are_image_label_index():
    data = digits_data()
    image, label, index = data.train[5]
    assert image.shape == (1, 8, 8) and isinstance(label, int) and index == 5
    assert label == int(data.train_labels[5])
    plain_image, _, _ = data.train_plain[5]
    assert torch.equal(plain_image, load_digits_split()[0][5])
    assert data.num_classes == 10 and len(data.test) == 450


def test_random_shift_moves_by_at_most_one_pixel():
    torch.manual_seed(0)
    image = torch.zeros(1, 8, 8)
    image[0, 4, 4] = 1.0
    seen = set()
    for _ in range(200):
        shifted = RandomShift(1)(image)
        assert shifted.shape == image.shape and float(shifted.sum()) == 1.0
        row, column = (int(x) for x in torch.nonzero(shifted[0])[0])
        seen.add((row - 4, column - 4))
    assert seen == {(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}


@pytest.mark.parametrize("meta", [True, False])
def test_cifar10_folder(tmp_path, meta):
    make_cifar_folder(tmp_path, per_batch=3, test_size=4, meta=meta)
    data = build_data("cifar10", tmp_path)
    assert len(data.train) == 15 and len(data.test) == 4 and data.num_classes == 10
    image, label, index = data.train[7]
    assert image.shape == (3, 32, 32) and index == 7 and label == int(data.train_labels[7])
    plain, _, _ = data.train_plain[7]
    assert torch.equal(plain, data.train_plain[7][0])  # the plain transform is deterministic
    # The folder itself may be given too.
    assert len(build_data("cifar10", tmp_path / "cifar-10-batches-py").train) == 15


def test_cifar10_errors_say_what_layout_was_expected(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*cifar-10-batches-py"):
        build_data("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="has no cifar-10-batches-py/ folder"):
        build_data("cifar10", tmp_path)
    make_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        build_data("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python-version batch"):
        build_data("cifar10", tmp_path)


def test_image_folder_tree(tmp_path):
    make_image_folder(tmp_path)
    data = build_data("imagefolder", tmp_path)
    assert len(data.train) == 12 and len(data.test) == 6 and data.num_classes == 3
    image, label, index = data.train[11]
    assert image.shape == (3, 224, 224) and label == 2 and index == 11
    test_image, _, _ = data.test[0]
    assert test_image.shape == (3, 224, 224)
    assert torch.equal(data.train_plain[3][0], data.train_plain[3][0])


def test_image_folder_errors_say_what_layout_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder; expected an ImageNet-style tree"):
        build_data("imagefolder", tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"train/ is not a valid image tree.*train/<class>/<image>"):
        build_data("imagefolder", tmp_path)
    make_image_folder(tmp_path / "other")
    with pytest.raises(DataError, match="has no val/ folder"):
        build_data("imagefolder", _only_train(tmp_path / "other"))
    make_image_folder(tmp_path / "mismatch", classes=("cat", "dog"))
    (tmp_path / "mismatch" / "val" / "dog").rename(tmp_path / "mismatch" / "val" / "wolf")
    with pytest.raises(DataError, match=r"different class folders \(only in train/: \['dog'\]"):
        build_data("imagefolder", tmp_path / "mismatch")


def test_image_folder_checks_every_header_before_training(tmp_path, capsys):
    """A text file named .jpg, an empty file, a header cut short and two decompression bombs (one
    PIL only warns about, one it refuses) are found before any training step, named, and either
    stop the run or, with skip_bad_images, are left out."""
    configure_logging()  # the warnings on stderr, as the commands print them
    root = make_image_folder(tmp_path / "data")
    bad = {
        root / "train" / "cat" / "notes.jpg": b"this is not an image",
        root / "train" / "dog" / "empty.png": b"",
        root / "train" / "dog" / "cut.png": png_header(40, 47)[:20],
        root / "train" / "fox" / "bomb.png": png_header(10_000, 10_000),  # 1e8 > 89.5e6: PIL warns
        root / "val" / "fox" / "huge.png": png_header(100_000, 100_000),  # PIL raises
    }
    for path, content in bad.items():
        path.write_bytes(content)
    with pytest.raises(DataError) as error:
        build_data("imagefolder", root)
    message = str(error.value)
    assert f"--data {root}: 4 of the 16 files in train/ cannot be used as images" in message
    for name in ("notes.jpg", "empty.png", "cut.png"):
        assert f"{name} (not a readable image" in message
    assert "bomb.png (decompression bomb: 10000 x 10000 = 100000000 pixels" in message
    assert "--skip-bad-images" in message

    data = build_data("imagefolder", root, skip_bad_images=True)
    assert (len(data.train), len(data.test)) == (12, 6)
    warnings = capsys.readouterr().err
    assert "left out 4 of the 16 files in train/" in warnings
    assert "left out 1 of the 7 files in val/: " in warnings and "huge.png (decompression bomb" in warnings
    # The labels follow the files that remain.
    assert data.train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test.targets.tolist() == [0, 0, 1, 1, 2, 2]


def _only_train(root: Path) -> Path:
    for path in sorted((root / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "val").rmdir()
    return root


def test_build_data_argument_errors(tmp_path):
    with pytest.raises(DataError, match="--dataset must be one of"):
        build_data("mnist")
    with pytest.raises(DataError, match="--dataset cifar10 needs --data PATH"):
        build_data("cifar10")
