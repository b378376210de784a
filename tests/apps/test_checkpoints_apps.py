"""The original project's checkpoints in the commands: ``train -e`` evaluates them with the
original's protocol (weighted kNN against the stored memory bank, its ``recompute_memory=0``),
``train --resume`` continues with their arch and memory (T, momentum) unless a flag says
otherwise, and ``export`` / ``neighbors`` use them with ``--dataset`` / ``--data`` / ``--arch``.

The files are written as Python 2 and PyTorch 0.4 wrote them (``test_checkpoints``'s writers).
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers.data_folders import make_cifar_folder, make_image_folder
from helpers.original_checkpoints import write_cifar_checkpoint, write_main_checkpoint

from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.data import build_data
from snca_ext.apps.export import run as export
from snca_ext.apps.feature_files import load_features
from snca_ext.apps.neighbors import run as neighbors
from snca_ext.apps.train.cli import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, run

FAST = ["--threads", "1", "--no-progress"]
SUMMARY = re.compile(
    r"kNN \(K=\d+, sigma=(\S+), memory bank\) after (\d+) epochs on (\d+) test examples: "
    r"top-1 ([\d.]+)%  top-5 ([\d.]+)%"
)


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@torch.no_grad()
def original_knn(queries, labels, memory, memory_labels, k=30, sigma=0.05) -> tuple[float, float]:
    """Top-1 and top-5 (%) of the original's evaluation, re-derived in plain torch: each of the
    ``k`` most similar memory rows votes for its class with exp(similarity / sigma), classes
    ``0 ... max label``, ranked by their votes."""
    similarities, rows = (queries @ memory.T).topk(min(k, len(memory)), dim=1)
    votes = torch.zeros(len(queries), int(memory_labels.max()) + 1)
    votes.scatter_add_(1, memory_labels[rows], (similarities / sigma).exp())
    correct = votes.argsort(dim=1, descending=True) == labels[:, None]
    return 100 * correct[:, :1].sum().item() / len(labels), 100 * correct[:, :5].sum().item() / len(labels)


def _summary(out: str) -> tuple[float, int, int, float, float]:
    found = SUMMARY.search(out)
    assert found, out
    sigma, epochs, count, top1, top5 = found.groups()
    return float(sigma), int(epochs), int(count), float(top1), float(top5)


# ----------------------------------------------------------------------------- train -e


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """An ImageNet-style folder (3 classes, 4 training and 2 validation images each) and
    ``snca_resnet18.pth.tar`` for it, whose memory holds, in each class's rows, the validation
    features of that class: against the memory every validation image finds its own class
    (100%), against features recomputed from the (random) training images it does not."""
    root = tmp_path_factory.mktemp("imagenet")
    data = make_image_folder(root / "data")
    bundle = build_data("imagefolder", data)
    validation = _images(bundle.test)
    rows_of_class = [(bundle.test.targets == label).nonzero().flatten() for label in bundle.train.targets]

    def memory(model):
        with torch.no_grad():
            features = model(validation)
        return torch.stack([features[rows[i % len(rows)]] for i, rows in enumerate(rows_of_class)])

    path, held = write_main_checkpoint(
        root / "snca_resnet18.pth.tar", rows=len(bundle.train), memory=memory, center_on=validation
    )
    return path, data, held, bundle


def test_evaluating_snca_resnet18_on_an_imagefolder_uses_the_memory_bank(imagenet, capsys):
    path, data, held, bundle = imagenet
    capsys.readouterr()
    assert run(["-e", "--resume", str(path), "--trust-checkpoint", "--data", str(data), *FAST]) == EXIT_OK
    out = capsys.readouterr().out
    assert (
        f"--resume {path}: an original main.py checkpoint, 130 epochs done, recorded accuracy 0.7059; "
        "from it: arch resnet18, low-dim 128, T 0.05, memory momentum 0.9, data set imagefolder (its arch's)"
    ) in out
    sigma, epochs, count, top1, top5 = _summary(out)
    with torch.no_grad():
        queries = held.model(_images(bundle.test))
        recomputed = held.model(_images(bundle.train_plain))
    expected = original_knn(queries, bundle.test.targets, held.memory, bundle.train.targets)
    assert (sigma, epochs, count) == (0.05, 130, 6)
    assert (top1, top5) == pytest.approx(expected, abs=0.006) and top1 == 100.0
    # The test tells the protocols apart: the bank recomputed from the network scores otherwise.
    assert original_knn(queries, bundle.test.targets, recomputed, bundle.train.targets)[0] < 100.0


def test_an_original_checkpoint_without_data_says_what_to_pass(imagenet, capsys):
    path = imagenet[0]
    assert run(["-e", "--resume", str(path), "--trust-checkpoint", *FAST]) == EXIT_USAGE
    error = capsys.readouterr().err
    # Said before the file is unpickled (its code must not run for a refused command): what the
    # file is cannot be read without unpickling it.
    assert f"--resume {path} needs unpickling: an original SNCA checkpoint, which records no data" in error
    assert "pass --data PATH" in error


def test_a_memory_bank_of_another_training_set_is_refused(imagenet, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_class=(3, 1))  # 9 training images, not 12
    argv = ["-e", "--resume", str(imagenet[0]), "--trust-checkpoint", "--data", str(other), *FAST]
    assert run(argv) == EXIT_USAGE
    error = capsys.readouterr().err
    assert (
        "the original checkpoint's memory has shape (12, 128), but the training set needs (9, 128)" in error
    )


def test_evaluating_a_cifar_ckpt_t7(tmp_path, capsys):
    data = make_cifar_folder(tmp_path / "data")
    bundle = build_data("cifar10", data)
    path, held = write_cifar_checkpoint(
        tmp_path / "ckpt.t7", rows=len(bundle.train), epoch=7, center_on=_images(bundle.test)
    )
    assert run(["-e", "--resume", str(path), "--data", str(data), *FAST]) == EXIT_USAGE
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert run(["-e", "--resume", str(path), "--trust-checkpoint", "--data", str(data), *FAST]) == EXIT_OK
    out = capsys.readouterr().out
    assert "an original cifar.py checkpoint, 8 epochs done (saved after its 0-based epoch 7)" in out
    assert "arch cifar_resnet18, low-dim 128, T 0.05, memory momentum 0.5, data set cifar10" in out
    sigma, epochs, count, top1, top5 = _summary(out)
    with torch.no_grad():
        queries = held.net(_images(bundle.test))  # the original network, not the package's
    expected = original_knn(queries, bundle.test.targets, held.memory, bundle.train.targets)
    assert (sigma, epochs, count) == (0.05, 8, len(bundle.test))
    assert (top1, top5) == pytest.approx(expected, abs=0.006)


# ----------------------------------------------------------------------------- train --resume


@pytest.fixture(scope="module")
def fashion_on_digits(tmp_path_factory):
    """main.py's format with a network that is not the digits recipe's (``fashion_cnn``, which also
    reads 8 x 8 grey images), T 0.07 and memory momentum 0.6, a bank of the digits' 1,347 rows."""
    folder = tmp_path_factory.mktemp("fashion")
    with_arch = write_main_checkpoint(
        folder / "fashion.pth.tar", arch="fashion_cnn", rows=1347, epoch=3, temperature=0.07, momentum=0.6
    )[0]
    without_arch = write_main_checkpoint(
        folder / "no_arch.pth.tar", arch="fashion_cnn", rows=1347, epoch=3, with_arch=False
    )[0]
    return with_arch, without_arch


def test_resuming_takes_the_checkpoints_arch_and_memory_and_says_so(fashion_on_digits, tmp_path, capsys):
    path = fashion_on_digits[0]
    argv = ["--resume", str(path), "--trust-checkpoint", "--dataset", "digits", "--stop-after-steps", "1"]
    assert run([*argv, "--out", str(tmp_path / "run"), *FAST]) == EXIT_STOPPED
    out = capsys.readouterr().out
    assert "from it: arch fashion_cnn, low-dim 128, T 0.07, memory momentum 0.6" in out
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["args"]["arch"] == "fashion_cnn" and state["args"]["dataset"] == "digits"
    assert state["args"]["temperature"] == 0.07 and state["args"]["memory_momentum"] == 0.6
    assert state["epoch"] == 3 and state["step"] == 1


def test_flags_override_the_checkpoints_memory_and_say_so(fashion_on_digits, tmp_path, capsys):
    path = fashion_on_digits[0]
    argv = ["--resume", str(path), "--trust-checkpoint", "--dataset", "digits", "--stop-after-steps", "1"]
    argv += ["--temperature", "0.2", "--memory-momentum", "0.5"]
    assert run([*argv, "--out", str(tmp_path / "run"), *FAST]) == EXIT_STOPPED
    out = capsys.readouterr().out
    assert "from it: arch fashion_cnn, low-dim 128; the flags override --temperature 0.2 (the " in out
    assert "--memory-momentum 0.5 (the checkpoint's: 0.6" in out
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["args"]["temperature"] == 0.2 and state["args"]["memory_momentum"] == 0.5


def test_arch_flag_of_an_original_checkpoint(fashion_on_digits, capsys):
    with_arch, without_arch = fashion_on_digits
    evaluate = ["-e", "--trust-checkpoint", "--dataset", "digits", *FAST]
    assert run(["--resume", str(with_arch), "--arch", "digits_cnn", *evaluate]) == EXIT_USAGE
    assert "--arch digits_cnn: the checkpoint's network is a fashion_cnn" in capsys.readouterr().err
    assert run(["--resume", str(without_arch), *evaluate]) == EXIT_USAGE
    assert "--arch is needed: the checkpoint does not say its architecture" in capsys.readouterr().err
    assert run(["--resume", str(without_arch), "--arch", "fashion_cnn", *evaluate]) == EXIT_OK
    assert "from it: arch fashion_cnn" in capsys.readouterr().out


# ----------------------------------------------------------------------------- export and neighbors


def test_export_and_neighbors_take_the_data_set_and_arch_a_file_lacks(fashion_on_digits, tmp_path, capsys):
    without_arch = fashion_on_digits[1]  # a fashion_cnn of main.py's format without 'arch'
    out = tmp_path / "test.safetensors"
    argv = [
        "--checkpoint",
        str(without_arch),
        "--trust-checkpoint",
        "--split",
        "test",
        "--out",
        str(out),
        *FAST,
    ]
    assert export([*argv, "--dataset", "digits"]) == EXIT_USAGE
    assert "--arch is needed: the checkpoint does not say its architecture" in capsys.readouterr().err
    assert export([*argv, "--dataset", "digits", "--arch", "fashion_cnn"]) == EXIT_OK
    meta = load_features(out)["metadata"]
    assert (meta["dataset"], meta["arch"], meta["epoch"]) == ("digits", "fashion_cnn", "3")
    page = tmp_path / "nn.html"
    argv = [
        "--checkpoint",
        str(without_arch),
        "--trust-checkpoint",
        "--out",
        str(page),
        "--queries",
        "2",
        *FAST,
    ]
    assert neighbors([*argv, "--arch", "fashion_cnn", "--dataset", "digits", "-k", "2"]) == EXIT_OK
    assert "digits test queries (2 random, seed 0) against the 1347 training images" in page.read_text()


def test_export_of_a_cifar_ckpt_t7_writes_the_original_networks_features(tmp_path, capsys):
    data = make_cifar_folder(tmp_path / "data")
    bundle = build_data("cifar10", data)
    path, held = write_cifar_checkpoint(tmp_path / "ckpt.t7", rows=len(bundle.train))
    out = tmp_path / "test.safetensors"
    argv = ["--checkpoint", str(path), "--trust-checkpoint", "--split", "test", "--out", str(out), *FAST]
    assert export(argv) == EXIT_USAGE
    assert (
        "an original SNCA checkpoint, which records no data set: pass --data PATH" in capsys.readouterr().err
    )
    assert export([*argv, "--data", str(data)]) == EXIT_OK
    exported = load_features(out)
    with torch.no_grad():
        expected = held.net(_images(bundle.test))
    torch.testing.assert_close(exported["features"], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(exported["labels"], bundle.test.targets)
    meta = exported["metadata"]
    assert (meta["dataset"], meta["arch"], meta["epoch"]) == ("cifar10", "cifar_resnet18", "8")


def test_neighbors_of_snca_resnet18_from_its_memory_bank(imagenet, tmp_path, capsys):
    path, data, held, bundle = imagenet
    out = tmp_path / "nn.html"
    argv = ["--checkpoint", str(path), "--trust-checkpoint", "--out", str(out), "-k", "3", *FAST]
    argv += ["--data", str(data), "--query-index", "0,3", "--memory-bank"]
    assert neighbors(argv) == EXIT_OK
    with torch.no_grad():
        queries = held.model(_images(bundle.test)[[0, 3]])
    best, rows = (queries @ held.memory.T).topk(3, dim=1)
    hits = (bundle.train.targets[rows] == bundle.test.targets[[0, 3], None]).sum()
    assert f"snca: snca_resnet18.pth.tar: {hits}/6 retrievals of the same class" in capsys.readouterr().out
    page = out.read_text()
    for position, query in enumerate((0, 3)):
        row = page[page.index(f'data-query="{query}"') :].split("</tr>")[0]
        shown = [int(index) for index in re.findall(r'alt="train (\d+)"', row)]
        # The rows shown are a top 3 of the memory bank (the bank holds each feature twice: ties).
        torch.testing.assert_close(queries[position] @ held.memory[shown].T, best[position])
    assert "(each checkpoint&#x27;s memory bank)" in page


def test_neighbors_memory_bank_of_another_size_is_refused(imagenet, tmp_path, capsys):
    path = imagenet[0]
    other = make_image_folder(tmp_path / "other", per_class=(3, 1))
    argv = ["--checkpoint", str(path), "--trust-checkpoint", "--out", str(tmp_path / "nn.html"), *FAST]
    assert neighbors([*argv, "--data", str(other), "--memory-bank", "--queries", "2"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "--memory-bank: the memory bank of" in error
    assert "has 12 rows, but the training split (--classes all) has 9 images" in error
