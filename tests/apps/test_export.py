"""``python -m snca_ext.export``: the features written are the network's, in the documented layout,
for every class selection and both file formats; bad input is refused without leaving a file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers.models import forward_all
from PIL import Image

from snca_ext.apps.checkpoints import load_checkpoint, save_checkpoint
from snca_ext.apps.data import build_data, image_file_transform
from snca_ext.apps.errors import ExportError
from snca_ext.apps.export import run
from snca_ext.apps.feature_files import EXPORT_FORMAT, load_features, read_safetensors, write_safetensors
from snca_ext.apps.trained import load_trained_model

FAST = ["--threads", "1", "--no-progress"]
HOLDOUT = (5, 6, 7, 8, 9)


@pytest.fixture
def holdout_run(holdout_runs) -> Path:
    """The checkpoint of the session's SNCA holdout run (tests/apps/conftest.py)."""
    return holdout_runs["snca"] / "checkpoint.pt"


def _export(checkpoint: Path, out: Path, *extra: str) -> int:
    return run(
        ["--checkpoint", str(checkpoint), "--out", str(out), "--threads", "1", "--no-progress", *extra]
    )


def test_train_split_round_trips_with_the_network_features(holdout_run, tmp_path):
    out = tmp_path / "train.safetensors"
    # 100 does not divide 1347: the last, short batch is streamed too.
    assert _export(holdout_run, out, "--split", "train", "--batch-size", "100") == 0
    exported = load_features(out)
    model, _ = load_trained_model(holdout_run)
    bundle = build_data("digits")
    expected = forward_all(model, bundle.train_plain)
    torch.testing.assert_close(exported["features"], expected, rtol=1e-5, atol=1e-5)
    assert exported["features"].dtype == torch.float32 and exported["features"].shape == (1347, 128)
    torch.testing.assert_close(exported["features"].norm(dim=1), torch.ones(1347))
    assert torch.equal(exported["labels"], bundle.train_plain.targets)
    assert torch.equal(exported["indices"], torch.arange(1347))
    meta = exported["metadata"]
    assert meta["format"] == EXPORT_FORMAT and meta["split"] == "train" and meta["classes"] == "all"
    assert meta["holdout_classes"] == "5,6,7,8,9" and meta["loss"] == "snca" and meta["low_dim"] == "128"
    # The documented layout, byte for byte: u64 header length, JSON header, the three arrays.
    raw = out.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header["features"] == {"dtype": "F32", "shape": [1347, 128], "data_offsets": [0, 1347 * 128 * 4]}
    assert header["indices"]["data_offsets"][1] == len(raw) - 8 - length
    assert (8 + length) % 8 == 0


def test_pt_holds_the_same_tensors_and_loads_weights_only(holdout_run, tmp_path):
    assert _export(holdout_run, tmp_path / "a.safetensors", "--split", "test") == 0
    assert _export(holdout_run, tmp_path / "a.pt", "--split", "test") == 0
    content = torch.load(tmp_path / "a.pt", weights_only=True)
    streamed = load_features(tmp_path / "a.safetensors")
    for name in ("features", "labels", "indices"):
        assert torch.equal(content[name], streamed[name]), name
    assert content["metadata"] == streamed["metadata"] and len(content["labels"]) == 450


def test_novel_and_seen_classes_keep_their_dataset_indices(holdout_run, tmp_path):
    assert _export(holdout_run, tmp_path / "all.pt", "--split", "test") == 0
    assert _export(holdout_run, tmp_path / "novel.pt", "--split", "test", "--classes", "novel") == 0
    assert _export(holdout_run, tmp_path / "seen.pt", "--split", "test", "--classes", "seen") == 0
    everything, novel, seen = (load_features(tmp_path / f"{name}.pt") for name in ("all", "novel", "seen"))
    assert set(novel["labels"].tolist()) == set(HOLDOUT)
    assert set(seen["labels"].tolist()) == {0, 1, 2, 3, 4}
    assert sorted(novel["indices"].tolist() + seen["indices"].tolist()) == list(range(450))
    for part in (novel, seen):
        torch.testing.assert_close(part["features"], everything["features"][part["indices"]])
        assert torch.equal(part["labels"], everything["labels"][part["indices"]])


def test_official_safetensors_reader_agrees(holdout_run, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    out = tmp_path / "test.safetensors"
    assert _export(holdout_run, out, "--split", "test") == 0
    theirs = safetensors_torch.load_file(str(out))
    ours = load_features(out)
    assert set(theirs) == {"features", "labels", "indices"}
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name


def test_wrong_row_count_leaves_no_file(tmp_path):
    out = tmp_path / "bad.safetensors"
    batches = (torch.randn(4, 8) for _ in range(2))
    with pytest.raises(ValueError, match="expected 10 feature rows, the batches held 8"):
        write_safetensors(out, batches, 10, 8, torch.zeros(10), torch.arange(10), {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    out = tmp_path / "f.safetensors"
    write_safetensors(out, [torch.randn(5, 3)], 5, 3, torch.zeros(5), torch.arange(5), {"k": "v"})
    tensors, metadata = read_safetensors(out)
    assert tensors["features"].shape == (5, 3) and metadata == {"k": "v"}
    out.write_bytes(out.read_bytes()[:-8])
    with pytest.raises(ExportError, match="does not fit its offsets"):
        load_features(out)
    out.write_bytes(b"\x00" * 4)
    with pytest.raises(ExportError, match="too short"):
        load_features(out)


def test_bad_arguments_exit_2(holdout_run, tmp_path, capsys):
    state = load_checkpoint(holdout_run)
    state["args"]["holdout_classes"] = ""
    plain = tmp_path / "plain.pt"
    save_checkpoint(state, plain)
    assert _export(plain, tmp_path / "x.pt", "--classes", "novel") == 2
    assert "--classes novel needs a run trained with --holdout-classes" in capsys.readouterr().err
    assert _export(holdout_run, tmp_path / "x.npy") == 2
    assert "--out must end in .safetensors or .pt" in capsys.readouterr().err
    assert _export(tmp_path / "missing.pt", tmp_path / "x.pt") == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_an_unwritable_out_fails_up_front(holdout_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _export(holdout_run, blocker / "train.safetensors") == 2
    error = capsys.readouterr().err
    assert f"--out: {blocker} cannot be written" in error


def test_images_need_a_network_that_takes_pictures(holdout_run, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    assert _export(holdout_run, tmp_path / "x.pt", "--images", str(folder)) == 2
    assert "the digits network takes no image files" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert _export(holdout_run, tmp_path / "x.pt", "--images", str(tmp_path / "missing")) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dataset,shape",
    [("fashion-mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)), ("imagefolder", (3, 224, 224))],
)
def test_image_files_get_the_data_sets_test_shape(dataset, shape):
    picture = Image.new("RGB", (50, 37), (255, 255, 255))
    image = image_file_transform(dataset)(picture)
    assert image.shape == shape and image.dtype == torch.float32
    assert len(torch.unique(image)) == image.shape[0]  # a white picture: one value per channel
