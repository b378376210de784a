"""What a new user tripped over (issue 25): inputs that used to give a silent wrong answer, or a
traceback, end each command with exit status 2 and a message naming the argument. In-process
calls of each command's ``run(argv)`` on the session's holdout runs (tests/apps/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data_folders import make_image_folder

from snca_ext import available_backends
from snca_ext.apps.arguments import resolve_device
from snca_ext.apps.checkpoints import load_checkpoint, save_checkpoint
from snca_ext.apps.export import run as export
from snca_ext.apps.feature_files import load_features, write_safetensors
from snca_ext.apps.fewshot import run as fewshot
from snca_ext.apps.neighbors import run as neighbors
from snca_ext.apps.train.cli import run as train

FAST = ["--threads", "1", "--no-progress"]


@pytest.fixture
def runs(holdout_runs) -> dict[str, Path]:
    """The checkpoints of the session's digits runs without classes 5-9, one per loss."""
    return {loss: out / "checkpoint.pt" for loss, out in holdout_runs.items()}


@pytest.fixture(scope="module")
def bank(holdout_runs, tmp_path_factory) -> Path:
    """The SNCA run's training features, exported."""
    out = tmp_path_factory.mktemp("bank") / "train.safetensors"
    checkpoint = holdout_runs["snca"] / "checkpoint.pt"
    assert export(["--checkpoint", str(checkpoint), "--out", str(out), *FAST]) == 0
    return out


def _error(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("evaluate", [False, True])
def test_resume_with_another_dataset_is_refused(runs, tmp_path, capsys, evaluate):
    # Before: the digits network and bank went on training on (or were evaluated on) the other
    # data set, exit 0.
    argv = ["--resume", str(runs["snca"]), "--dataset", "fashion-mnist", "--data", str(tmp_path), *FAST]
    assert train([*argv, "--evaluate"] if evaluate else [*argv, "--out", str(tmp_path / "o")]) == 2
    error = _error(capsys)
    assert "--dataset fashion-mnist contradicts --resume" in error
    assert "trained on --dataset digits" in error


@pytest.mark.parametrize(
    "flags",
    [["--train-limit", "300"], ["--holdout-classes", "9,8"]],
    ids=["train-limit", "holdout-classes"],
)
def test_resume_on_other_training_examples_is_refused(runs, capsys, flags):
    # The bank's rows are the saved run's training examples: other examples contradict it.
    assert train(["--resume", str(runs["snca"]), "--evaluate", *flags, *FAST]) == 2
    error = _error(capsys)
    assert f"--resume {runs['snca']} was trained on" in error
    assert "not the data the checkpoint's memory bank was trained on" in error


def test_bank_features_of_another_network_are_refused(runs, bank, tmp_path, capsys):
    # Before: the softmax network's queries were searched in the SNCA network's features.
    out = tmp_path / "nn.html"
    assert (
        neighbors(["--checkpoint", str(runs["softmax"]), "--bank-features", str(bank), "--out", str(out)])
        == 2
    )
    error = _error(capsys)
    assert f"--bank-features {bank} was exported from another network" in error
    assert str(runs["softmax"]) in error and str(runs["snca"]) in error
    assert not out.exists()
    # The same file with the network it came from is accepted.
    argv = [
        "--checkpoint",
        str(runs["snca"]),
        "--bank-features",
        str(bank),
        "--out",
        str(out),
        "--queries",
        "2",
    ]
    assert neighbors([*argv, *FAST]) == 0


def test_non_finite_features_are_refused_by_every_reader(runs, bank, tmp_path, capsys):
    exported = load_features(bank)
    features = exported["features"].clone()
    features[7, 3] = float("nan")
    broken = tmp_path / "nan.safetensors"
    rows, dim = features.shape
    write_safetensors(
        broken, [features], rows, dim, exported["labels"], exported["indices"], exported["metadata"]
    )
    message = f"{broken}: feature row 7 of its {rows} holds NaN or inf"
    out = tmp_path / "nn.html"
    # Before: neighbors wrote a page of nan similarities, exit 0.
    assert (
        neighbors(["--checkpoint", str(runs["snca"]), "--bank-features", str(broken), "--out", str(out)]) == 2
    )
    assert message in _error(capsys)
    assert not out.exists()
    assert fewshot([str(broken), "--episodes", "5"]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize(
    "label, message",
    [
        (-2, "labels must be class ids >= 0 (or -1 for --images), got -2"),
        (10, "label 10 is not one of the 10 classes its class_names metadata names"),
    ],
)
def test_feature_file_labels_beyond_its_classes_are_refused(bank, tmp_path, capsys, label, message):
    exported = load_features(bank)
    labels = exported["labels"].clone()
    labels[0] = label
    metadata = {**exported["metadata"], "class_names": json.dumps([str(digit) for digit in range(10)])}
    broken = tmp_path / "labels.safetensors"
    rows, dim = exported["features"].shape
    write_safetensors(broken, [exported["features"]], rows, dim, labels, exported["indices"], metadata)
    assert fewshot([str(broken), "--episodes", "5"]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("png", [None, "same"])
def test_png_over_the_page_is_refused(runs, tmp_path, capsys, png):
    # Before: --out n.png wrote the PNG grid over the page ("wrote n.png and n.png").
    out = tmp_path / "n.png"
    argv = ["--checkpoint", str(runs["snca"]), "--out", str(out), *FAST]
    assert neighbors(argv + (["--png", str(out)] if png else [])) == 2
    assert f"--out {out} and the PNG grid" in _error(capsys)
    assert not out.exists()


def test_temperature_that_cannot_train_is_refused(capsys):
    # Before: -t 1e30 trained with a gradient of exactly zero, no word.
    with pytest.raises(SystemExit) as stopped:
        train(["-t", "1e30", *FAST])
    assert stopped.value.code == 2
    assert "argument -t/--temperature/--nce-t: expected a number in (0, 10]" in _error(capsys)


def test_fewshot_ways_beyond_the_novel_classes_are_refused(runs, capsys):
    # Before: 6-way episodes on the 5 held-out classes ran quietly as 5-way.
    assert train(["--resume", str(runs["snca"]), "--evaluate", "--fewshot-ways", "5,6", *FAST]) == 2
    error = _error(capsys)
    assert "--fewshot-ways 5,6 asks for 6-way episodes" in error
    assert "--holdout-classes 5,6,7,8,9 leaves 5 novel classes" in error


def test_knn_k_reported_is_the_k_used(runs, capsys):
    # Before: --knn-k 100000 on 500 examples reported K=100000.
    argv = ["--resume", str(runs["snca"]), "--evaluate", "--knn-k", "100000", "--fewshot-episodes", "5"]
    assert train([*argv, *FAST]) == 0
    bank_rows = len(torch.load(runs["snca"], weights_only=True)["memory"]["labels"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert f"--knn-k 100000 is more than the {bank_rows} training examples" in text
    assert f"kNN (K={bank_rows}," in text
    assert "K=100000" not in text


def _status(command, argv) -> int:
    """The exit status of ``command(argv)``, argparse's own errors (SystemExit 2) included."""
    try:
        return command(argv)
    except SystemExit as exit_:
        return exit_.code


UNUSABLE = [b for b in ("cuda", "triton") if b not in available_backends(resolve_device("auto"))]


@pytest.mark.parametrize("backend", UNUSABLE)
def test_unusable_backend_is_refused_by_name(runs, tmp_path, capsys, backend):
    # Before: a RuntimeError traceback (exit 1) at the first call of the fused op.
    assert train(["--backend", backend, "--epochs", "1", "--out", str(tmp_path / "run"), *FAST]) == 2
    assert f"--backend {backend} cannot run on" in _error(capsys)
    assert not (tmp_path / "run").exists()
    out = str(tmp_path / "nn.html")
    assert neighbors(["--checkpoint", str(runs["snca"]), "--backend", backend, "--out", out, *FAST]) == 2
    assert f"--backend {backend} cannot run on" in _error(capsys)


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("train", ["--tensorboard", "{file}"], "--tensorboard {file} is a file"),
        (
            "train",
            ["--dataset", "imagefolder", "--data", "{folder}", "--arch", "digits_cnn"],
            "--arch digits_cnn takes 1-channel images, but the data set's have 3 channel(s)",
        ),
        ("neighbors", ["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        ("neighbors", ["--out", "{tmp}"], "--out {tmp} is a folder"),
        ("export", ["--out", "{tmp}/x.pt", "--data", "{tmp}"], "--data is not used by --dataset digits"),
        ("export", ["--out", "{tmp}/dir.pt"], "--out {tmp}/dir.pt is a folder"),
    ],
    ids=[
        "tensorboard-file",
        "channels",
        "neighbors-backend",
        "neighbors-out-folder",
        "export-data",
        "export-out-folder",
    ],
)
def test_bad_input_exits_2_naming_the_argument(runs, tmp_path, capsys, command, argv, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir.pt").mkdir()
    fields = {"file": tmp_path / "file", "tmp": tmp_path, "folder": make_image_folder(tmp_path / "data")}
    argv = [part.format(**fields) for part in argv]
    if command == "train":
        argv += ["-b", "4", "--epochs", "1", "--out", str(tmp_path / "run")]
        status = _status(train, [*argv, *FAST])
    else:
        checkpoint = ["--checkpoint", str(runs["snca"])]
        out = [] if "--out" in argv else ["--out", str(tmp_path / "nn.html")]
        status = _status(neighbors if command == "neighbors" else export, [*checkpoint, *out, *argv, *FAST])
    assert status == 2
    assert message.format(**fields) in _error(capsys)


@pytest.mark.parametrize("content", [b"not weights at all", "other keys"])
def test_pretrained_that_is_not_weights_is_refused(tmp_path, capsys, content):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # a real safetensors file without the network's weights: timm's loader raised KeyError
        save_file({"unrelated.weight": torch.zeros(2, 2)}, str(path))
    argv = ["--arch", "timm:test_resnet", "--pretrained", str(path), "--out", str(tmp_path / "run")]
    assert train([*argv, "--epochs", "1", *FAST]) == 2
    assert f"--pretrained {path}: not weights of timm's test_resnet" in _error(capsys)


def test_a_state_dict_mismatch_says_what_does_not_fit(runs, capsys):
    # Before: the message stopped at its first line, "Error(s) in loading state_dict for ...:".
    assert train(["--resume", str(runs["snca"]), "--evaluate", "--low-dim", "64", *FAST]) == 2
    error = _error(capsys)
    assert "the checkpoint does not fit this run (--arch digits_cnn, --low-dim 64" in error
    assert "size mismatch for fc.weight" in error


def test_memory_bank_of_a_train_limit_run(tmp_path, capsys):
    # Before: refused, blaming --dataset / --data; the bank holds the run's first 200 examples.
    run = tmp_path / "run"
    assert train(["--epochs", "1", "--train-limit", "200", "-b", "32", "--out", str(run), *FAST]) == 0
    out = tmp_path / "nn.html"
    argv = ["--checkpoint", str(run), "--memory-bank", "--queries", "2", "--out", str(out), *FAST]
    assert neighbors(argv) == 0
    assert "against the 200 training images" in out.read_text()


def test_compare_of_another_data_set_names_both(runs, tmp_path, capsys):
    state = load_checkpoint(runs["softmax"])
    state["args"].update(dataset="fashion-mnist", data=None)
    other = tmp_path / "other.pt"
    save_checkpoint(state, other)
    argv = ["--checkpoint", str(runs["snca"]), "--compare", str(other), "--out", str(tmp_path / "nn.html")]
    assert neighbors([*argv, *FAST]) == 2
    error = _error(capsys)
    assert f"--compare {other} was trained on --dataset fashion-mnist, --checkpoint" in error
    assert "on --dataset digits: the same images are needed" in error
    assert "None" not in error


def test_an_image_cut_before_the_first_checkpoint_says_run_again(tmp_path, capsys):
    from io import BytesIO

    from PIL import Image

    data = make_image_folder(tmp_path / "data", per_class=(4, 1))
    damaged = data / "train" / "dog" / "2.png"
    encoded = BytesIO()
    Image.open(damaged).save(encoded, format="PNG")
    damaged.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])  # its header intact
    argv = ["--dataset", "imagefolder", "--data", str(data), "-b", "4", "--low-dim", "16", "--epochs", "1"]
    assert train([*argv, "--out", str(tmp_path / "run"), *FAST]) == 2
    error = _error(capsys)
    assert "no checkpoint was saved. Remove or replace the file, then run the same command again." in error
    assert "--resume" not in error


class _Evil:
    """A pickled object whose unpickling runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("train", ["-e", "--resume", "{evil}"], "pass --data PATH"),
        (
            "train",
            ["-e", "--resume", "{evil}", "--data", "{tmp}/missing"],
            "--data {tmp}/missing: no such folder",
        ),
        (
            "train",
            ["-e", "--resume", "{evil}", "--data", "{tmp}", "--backend", "cuda"],
            "--backend cuda cannot run",
        ),
        ("export", ["--checkpoint", "{evil}", "--out", "{tmp}/x.pt"], "pass --data PATH"),
        ("neighbors", ["--checkpoint", "{evil}", "--out", "{tmp}/nn.html"], "pass --data PATH"),
        (
            "neighbors",
            [
                "--checkpoint",
                "{evil}",
                "--data",
                "{tmp}",
                "--memory-bank",
                "--bank-features",
                "{tmp}/b.pt",
                "--out",
                "{tmp}/nn.html",
            ],
            "--memory-bank and --bank-features / --compare-bank-features exclude each other",
        ),
    ],
    ids=[
        "train-no-data",
        "train-missing-data",
        "train-backend",
        "export-no-data",
        "neighbors-no-data",
        "neighbors-banks",
    ],
)
def test_trusted_checkpoint_is_unpickled_only_after_the_other_checks(
    tmp_path, capsys, command, argv, message
):
    # Before: the file was unpickled (its code ran) and the command refused afterwards.
    if "cuda" in argv and "cuda" not in UNUSABLE:
        pytest.skip("CUDA runs here")
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, evil)
    fields = {"evil": evil, "tmp": tmp_path}
    argv = [part.format(**fields) for part in argv]
    commands = {"train": train, "export": export, "neighbors": neighbors}
    assert _status(commands[command], [*argv, "--trust-checkpoint", *FAST]) == 2
    assert message.format(**fields) in _error(capsys)
    assert not marker.exists()


def test_help_gives_every_recipes_epochs_and_the_temperature(capsys, monkeypatch):
    from snca_ext.apps.train.config import RECIPES

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens ("fashion-" / "mnist")
    with pytest.raises(SystemExit):
        train(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, recipe in RECIPES.items():
        assert f"{name} {recipe['epochs']}" in text
    assert "(the recipe's: 0.05; digits 0.1)" in text
