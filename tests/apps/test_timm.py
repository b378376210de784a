"""Any timm backbone: ``--arch timm:<name>`` trains, saves, exports, and ``--pretrained`` starts
from a local weights file (timm's tiny ``test_resnet``, random init)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import forward_all

from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.data import build_data
from snca_ext.apps.export import run as export
from snca_ext.apps.feature_files import load_features
from snca_ext.apps.models import build_model, input_channels
from snca_ext.apps.train.cli import EXIT_OK, EXIT_USAGE, build_parser
from snca_ext.apps.train.cli import run as train
from snca_ext.apps.train.config import RunConfig
from snca_ext.apps.train.trainer import Trainer
from snca_ext.distributed import DistEnv

timm = pytest.importorskip("timm")

FAST = ["--threads", "1", "--no-progress"]
SMALL = ["--train-limit", "256", "--test-limit", "60", "--epochs", "1", "-b", "32"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may be downloaded at run time: the hub is off for these tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_timm_backbone_trains_saves_and_exports(tmp_path):
    out = tmp_path / "run"
    assert train(["--arch", "timm:test_resnet", "--out", str(out), *SMALL, *FAST]) == EXIT_OK
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["args"]["arch"] == "timm:test_resnet"
    assert any(name.startswith("backbone.") for name in state["model"])
    assert input_channels(state["model"]) == 1  # the grey digits: timm's stem built for 1 channel
    assert json.loads((out / "summary.json").read_text())["test_examples"] == 60
    # Export rebuilds the same network from the checkpoint alone.
    features = tmp_path / "test.safetensors"
    argv = ["--checkpoint", str(out / "checkpoint.pt"), "--split", "test", "--out", str(features)]
    assert export([*argv, "--no-progress"]) == 0
    model = build_model("timm:test_resnet", 128, in_channels=1)
    model.load_state_dict(state["model"])
    test = build_data("digits").test
    torch.testing.assert_close(load_features(features)["features"], forward_all(model, test))


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    weights = {name: tensor.contiguous() for name, tensor in source.state_dict().items()}
    path = tmp_path / "backbone.safetensors"
    save_file(weights, str(path))
    argv = ["--arch", "timm:test_resnet", "--pretrained", str(path), "--out", str(tmp_path / "run")]
    config = RunConfig.resolve(build_parser().parse_args(argv))
    trainer = Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu")))
    loaded = trainer.model.backbone.state_dict()
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name
    # Without --pretrained the same seed gives other weights: the file was what was loaded.
    config.pretrained = None
    fresh = Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu"))).model.backbone
    assert not all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in weights.items())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "timm:no_such_model_xyz"], "argument --arch: timm has no model 'no_such_model_xyz'"),
        (["--arch", "vgg16"], "argument --arch: must be one of resnet18"),
        (["--pretrained", "weights.pth"], "--pretrained is for --arch timm:<name>, got --arch digits_cnn"),
        (["--arch", "timm:test_resnet", "--pretrained", "/no/such.pth"], "--pretrained /no/such.pth: no"),
    ],
)
def test_bad_arch_or_weights_exit_2(tmp_path, capsys, argv, message):
    try:
        status = train([*argv, "--out", str(tmp_path / "run"), *FAST])
    except SystemExit as exit_:
        status = exit_.code
    assert status == EXIT_USAGE
    assert message in capsys.readouterr().err
