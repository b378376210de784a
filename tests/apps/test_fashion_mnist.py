"""Fashion-MNIST from the real IDX files (Debian's dataset-fashion-mnist, installed by CI): the
reader, the layouts it finds, bad files, and a short training run on a slice that learns."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from snca_ext import knn_accuracy
from snca_ext.apps.data import DataError, build_data
from snca_ext.apps.data.fashion_mnist import DEBIAN_FOLDER, FILES, fashion_mnist_data, read_idx
from snca_ext.apps.features import compute_features
from snca_ext.apps.models import build_model
from snca_ext.apps.train.cli import EXIT_OK, EXIT_USAGE, run

# CI installs the package (.ci/run), so there missing files are a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not DEBIAN_FOLDER.is_dir() and not os.environ.get("CI"),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def test_the_real_files_load_with_their_shapes_and_labels():
    data = build_data("fashion-mnist")
    assert (len(data.train), len(data.test), data.num_classes) == (60000, 10000, 10)
    assert torch.equal(torch.bincount(data.train.targets), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.test.targets), torch.full((10,), 1000))
    image, label, index = data.test[17]
    assert image.shape == (1, 28, 28) and index == 17 and label == int(data.test.targets[17])
    # Standardised by the training images' own statistics.
    plain = torch.stack([data.train_plain[i][0] for i in range(0, 60000, 60)])
    assert abs(float(plain.mean())) < 0.05 and abs(float(plain.std()) - 1.0) < 0.05
    # The augmentation (crop and flip) keeps the shape and the label, and changes the pixels.
    augmented = [data.train[3][0] for _ in range(8)]
    assert all(a.shape == (1, 28, 28) for a in augmented)
    assert any(not torch.equal(a, data.train_plain[3][0]) for a in augmented)


def test_torchvision_layout_and_uncompressed_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES.values():
        with gzip.open(DEBIAN_FOLDER / f"{name}.gz") as source, open(raw / name, "wb") as target:
            shutil.copyfileobj(source, target)
    data = fashion_mnist_data(tmp_path, augment=False)
    reference = fashion_mnist_data(augment=False)
    assert torch.equal(data.test.dataset.images, reference.test.dataset.images)
    assert torch.equal(data.train.targets, reference.train.targets)


def _idx(path: Path, magic: bytes, dims: tuple[int, ...], data: bytes) -> Path:
    path.write_bytes(magic + struct.pack(f">{len(dims)}I", *dims) + data)
    return path


def test_bad_idx_files_are_refused_with_the_file_named(tmp_path):
    good = _idx(tmp_path / "good", b"\x00\x00\x08\x01", (3,), b"\x01\x02\x03")
    assert read_idx(good, 1).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="not an IDX file of 1-D uint8"):
        read_idx(_idx(tmp_path / "magic", b"\x00\x00\x0d\x01", (3,), b"\x01\x02\x03"), 1)
    with pytest.raises(DataError, match=r"truncated\?"):
        read_idx(_idx(tmp_path / "short", b"\x00\x00\x08\x03", (2, 2, 2), b"\x01" * 7), 3)
    with pytest.raises(DataError, match="too short"):
        read_idx(_idx(tmp_path / "empty", b"", (), b""), 1)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.gz: could not be read"):
        read_idx(tmp_path / "bad.gz", 1)


def test_a_folder_without_the_files_says_how_to_get_them(tmp_path, capsys):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_data(tmp_path)
    assert (
        run(["--dataset", "fashion-mnist", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
        == EXIT_USAGE
    )
    assert "lacks the Fashion-MNIST files" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_run_on_a_slice_learns(tmp_path):
    limits = ["--train-limit", "3000", "--test-limit", "1000"]
    out = tmp_path / "run"
    argv = ["--dataset", "fashion-mnist", *limits, "--epochs", "3", "--lr-step", "2"]
    assert run([*argv, "--threads", "2", "--no-progress", "--out", str(out)]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    # The baseline that tells: the same network untrained (same seed), same slice, same kNN.
    torch.manual_seed(0)
    data = build_data("fashion-mnist").limit(3000, 1000)
    untrained = build_model("fashion_cnn", 128)
    bank, bank_labels = compute_features(untrained, data.train_plain, "cpu")
    queries, labels = compute_features(untrained, data.test, "cpu")
    before = knn_accuracy(queries, labels, bank, bank_labels, 10, k=30, sigma=0.05)
    assert summary["knn_recomputed_bank"]["count"] == 1000
    assert summary["knn_recomputed_bank"]["top1"] > before.top1 + 5.0, (summary, before)
