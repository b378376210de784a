"""The original project's checkpoint files, written here in their own formats, load without the
original code and become this package's: main.py's ``.pth.tar`` (DataParallel ``module.`` keys, a
pickled ``LinearAverage``, the optimizer state of PyTorch 0.4) and cifar.py's ``ckpt.t7`` (the
pickled network, ``linear.*`` / ``shortcut.*`` names, a 0-based epoch).

The files are what Python 2 and PyTorch 0.4 wrote: torch's legacy (pre-zip) serialisation, pickle
protocol 2 with Python 2 byte strings (``_Python2Pickler``; one holds a latin-1 byte, so only
``encoding="latin1"`` reads it), module objects whose classes (``lib.LinearAverage.LinearAverage``,
``models.resnet_cifar.ResNet``) are importable only while the file is written (``original_code``),
and batch-norm layers without ``num_batches_tracked`` (PyTorch 0.4.0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.original_checkpoints import (
    original_code,
    save_legacy,
    write_cifar_checkpoint,
    write_main_checkpoint,
)
from torch import nn

from snca_ext.apps.checkpoints import (
    CheckpointError,
    TolerantUnpickler,
    from_original,
    load_checkpoint,
    module_tensors,
)
from snca_ext.apps.models import build_model

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory) -> tuple[Path, SimpleNamespace]:
    return write_cifar_checkpoint(tmp_path_factory.mktemp("cifar") / "ckpt.t7")


@pytest.fixture(scope="module")
def main_checkpoint(tmp_path_factory) -> tuple[Path, SimpleNamespace]:
    return write_main_checkpoint(
        tmp_path_factory.mktemp("imagenet") / "snca_resnet18.pth.tar", arch="resnet18"
    )


def test_the_fixtures_are_of_the_old_kind(main_checkpoint, cifar_checkpoint, tmp_path):
    """The files are legacy-format protocol-2 pickles with Python 2 byte strings and classes that
    are not installed: torch.load as such cannot read them, even with the original code."""
    for path in (main_checkpoint[0], cifar_checkpoint[0]):
        content = path.read_bytes()
        assert not content.startswith(b"PK")  # not the zip format
        assert content.startswith(b"\x80\x02")  # pickle protocol 2
        assert b"U\x05epoch" in content  # SHORT_BINSTRING 'epoch': a Python 2 str
        assert "lib" not in sys.modules and "models" not in sys.modules
        with pytest.raises(ModuleNotFoundError, match=r"No module named '(lib|models)'"):
            torch.load(path, weights_only=False)
        with original_code(tmp_path / "code"), pytest.raises(UnicodeDecodeError):
            torch.load(path, weights_only=False)  # the latin-1 source read as UTF-8, torch's default


class _RunsCode:
    """Unpickling it creates a folder: a stand-in for what an untrusted file could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


@pytest.mark.parametrize("which", ["main", "cifar"])
def test_untrusted_original_files_are_not_unpickled_and_the_error_says_why(
    which, main_checkpoint, cifar_checkpoint, monkeypatch
):
    path = (main_checkpoint if which == "main" else cifar_checkpoint)[0]
    found = []
    monkeypatch.setattr(TolerantUnpickler, "find_class", lambda self, *name: found.append(name))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, flag="--checkpoint")
    message = str(error.value)
    pickled = "lib.LinearAverage.LinearAverage" if which == "main" else "models.resnet_cifar.ResNet"
    assert f"--checkpoint {path} holds pickled Python objects ({pickled})" in message
    assert "weights_only=True" in message and "--trust-checkpoint" in message
    assert "can run arbitrary code" in message
    assert found == []  # the full unpickler never ran


def test_an_untrusted_legacy_file_runs_no_code(tmp_path):
    target = tmp_path / "created_by_unpickling"
    path = save_legacy(
        {"epoch": 1, "state_dict": {}, "payload": _RunsCode(target)}, tmp_path / "evil.pth.tar"
    )
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert not target.exists()
    load_checkpoint(path, trust=True)  # what the flag allows: the file's code runs
    assert target.exists()


def test_a_legacy_main_checkpoint_loads_with_trust_without_the_original_code(main_checkpoint):
    path, held = main_checkpoint
    state = load_checkpoint(path, trust=True)
    assert type(state["lemniscate"]).__name__ == "LinearAverage"  # a stand-in: no code of it ran
    parts = from_original(state)
    assert parts["script"] == "main.py" and parts["arch"] == "resnet18" and parts["low_dim"] == 128
    expected = held.model.state_dict()
    assert set(parts["model"]) == set(expected)  # the module. prefixes are gone
    for name, value in expected.items():
        assert torch.equal(parts["model"][name], value), name
    assert torch.equal(parts["bank"], held.memory)
    assert parts["temperature"] == pytest.approx(0.05) and parts["memory_momentum"] == pytest.approx(0.9)
    assert parts["epoch"] == 130 and parts["accuracy"] == pytest.approx(0.7059)
    assert len(parts["optimizer"]["state"]) == len(list(held.model.parameters()))
    model = build_model("resnet18", 128)
    model.load_state_dict(parts["model"])


def test_a_cifar_ckpt_t7_maps_to_cifar_resnet18_with_the_same_outputs(cifar_checkpoint):
    path, held = cifar_checkpoint
    parts = from_original(load_checkpoint(path, trust=True))
    assert parts["script"] == "cifar.py" and parts["arch"] == "cifar_resnet18"
    assert parts["epoch"] == 8  # saved after the 0-based epoch 7: 8 epochs done
    assert parts["accuracy"] == pytest.approx(0.8125) and parts["optimizer"] is None
    assert torch.equal(parts["bank"], held.memory)
    assert not [name for name in parts["model"] if "linear" in name or "shortcut" in name]
    model = build_model("cifar_resnet18", 128)
    model.load_state_dict(parts["model"])  # strict: every name mapped, 0.4.0's missing counters too
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), held.net(images), rtol=1e-4, atol=1e-5)


def test_a_data_parallel_network_in_ckpt_t7_loses_its_prefix(tmp_path):
    path, held = write_cifar_checkpoint(tmp_path / "ckpt.t7", data_parallel=True, epoch=0)
    state = load_checkpoint(path, trust=True)
    assert type(state["net"]) is nn.DataParallel
    parts = from_original(state)
    assert parts["epoch"] == 1
    expected = {
        name.replace("linear.", "fc.").replace("shortcut.", "downsample."): value
        for name, value in module_tensors(held.net).items()
    }
    assert parts["model"].keys() == expected.keys()


def test_an_original_network_this_package_does_not_build_is_named(tmp_path):
    with original_code(tmp_path / "code") as code:
        net = code.resnet_cifar.ResNet([3, 4, 6, 3], 128)  # the original's CIFAR ResNet34
        path = save_legacy({"net": net, "lemniscate": None, "acc": 0.5, "epoch": 3}, tmp_path / "ckpt.t7")
    with pytest.raises(CheckpointError, match=r"BasicBlock blocks \[3, 4, 6, 3\] per stage.*cifar_resnet18"):
        from_original(load_checkpoint(path, trust=True))


def test_a_file_that_is_neither_format_is_named(tmp_path):
    path = save_legacy({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(
        CheckpointError, match=r"no 'state_dict' as main\.py saves, no 'net' as cifar\.py saves"
    ):
        from_original(load_checkpoint(path))
