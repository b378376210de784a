"""The original project's checkpoint files, written in their own formats: main.py's ``.pth.tar``
and cifar.py's ``ckpt.t7`` as Python 2 and PyTorch 0.4 wrote them (legacy serialisation, pickle
protocol 2 with Python 2 byte strings, classes importable only while the file is written:
``original_code``), for the tests of loading them (tests/apps/test_checkpoints*.py)."""

from __future__ import annotations

import contextlib
import importlib
import pickle
import struct
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from snca_ext.apps.models import build_model


class _Python2Pickler(pickle._Pickler):
    """Pickle protocol 2 as Python 2 wrote it: a ``str`` is a byte string (``SHORT_BINSTRING`` /
    ``BINSTRING``, here its latin-1 bytes), not the ``BINUNICODE`` of Python 3; module names are
    Python 2's (``copy_reg``, ``__builtin__``: ``fix_imports``)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_str(self, obj: str) -> None:
        try:
            data = obj.encode("latin-1")
        except UnicodeEncodeError:  # a Python 2 ``unicode`` object
            pickle._Pickler.save_str(self, obj)
            return
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_str


def _dump(obj, file, protocol=2, **_) -> None:
    _Python2Pickler(file, protocol).dump(obj)


PYTHON2_PICKLE = SimpleNamespace(Pickler=_Python2Pickler, dump=_dump, __name__="pickle")


def save_legacy(state: dict, path: Path) -> Path:
    """``torch.save`` as PyTorch 0.4 under Python 2 wrote it: the legacy format, protocol 2,
    byte strings; pickled modules carry their class's source (checked by torch on load)."""
    torch.save(
        state, path, pickle_module=PYTHON2_PICKLE, pickle_protocol=2, _use_new_zipfile_serialization=False
    )
    return path


# The layout of the original's modules, written for these tests (not the original code): what
# matters is the class names, the attribute names and the architecture. The files are latin-1, as
# Python 2 source often was, so the source torch stores with each module class is a latin-1 byte
# string.
ORIGINAL_CODE = {
    "lib/__init__.py": "",
    "lib/LinearAverage.py": """
        # -*- coding: latin-1 -*-
        import torch
        from torch import nn


        class LinearAverage(nn.Module):
            # Mémoire: the layout of the original's memory module (buffers params, memory).

            def __init__(self, dim, size, T=0.05, momentum=0.5):
                super().__init__()
                self.nLem = size
                self.register_buffer("params", torch.tensor([T, momentum]))
                self.register_buffer("memory", nn.functional.normalize(torch.randn(size, dim), dim=1))
    """,
    "lib/normalize.py": """
        from torch import nn


        class Normalize(nn.Module):
            def __init__(self, power=2):
                super().__init__()
                self.power = power

            def forward(self, x):
                return x / x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
    """,
    "models/__init__.py": "",
    "models/resnet_cifar.py": """
        # The layout of the original CIFAR ResNet: 3x3 stem, shortcut (not downsample), linear (not fc).
        from torch import nn
        from torch.nn import functional as F

        from lib.normalize import Normalize


        class BasicBlock(nn.Module):
            def __init__(self, inputs, planes, stride=1):
                super().__init__()
                self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.shortcut = nn.Sequential()
                if stride != 1 or inputs != planes:
                    self.shortcut = nn.Sequential(
                        nn.Conv2d(inputs, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                    )

            def forward(self, x):
                out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
                return F.relu(out + self.shortcut(x))


        class ResNet(nn.Module):
            def __init__(self, blocks, low_dim=128):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(64)
                inputs, stages = 64, []
                for planes, count, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
                    layers = []
                    for first in range(count):
                        layers.append(BasicBlock(inputs, planes, stride if first == 0 else 1))
                        inputs = planes
                    stages.append(nn.Sequential(*layers))
                self.layer1, self.layer2, self.layer3, self.layer4 = stages
                self.linear = nn.Linear(512, low_dim)
                self.l2norm = Normalize(2)

            def forward(self, x):
                out = F.relu(self.bn1(self.conv1(x)))
                out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
                out = F.avg_pool2d(out, 4).flatten(1)
                return self.l2norm(self.linear(out))


        def ResNet18(low_dim=128):
            return ResNet([2, 2, 2, 2], low_dim)
    """,
}


@contextlib.contextmanager
def original_code(folder: Path) -> Iterator[SimpleNamespace]:
    """The original project's ``lib`` and ``models`` packages, importable inside the block only:
    afterwards they are gone, as on the machine of a user who switched to this package."""
    for relative, text in ORIGINAL_CODE.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="latin-1")
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield SimpleNamespace(
            LinearAverage=importlib.import_module("lib.LinearAverage").LinearAverage,
            resnet_cifar=importlib.import_module("models.resnet_cifar"),
        )
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] in ("lib", "models")]:
            del sys.modules[name]


def _without_num_batches_tracked(module: nn.Module) -> None:
    """Batch norm as PyTorch 0.4.0 had it (the counter came in 0.4.1)."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            del layer._buffers["num_batches_tracked"]


def _random_statistics(module: nn.Module, generator: torch.Generator) -> None:
    """Batch-norm statistics and affine parameters away from their initial values, so that a
    layer loaded into the wrong place changes the output."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1, generator=generator)
                layer.running_var.uniform_(0.5, 1.5, generator=generator)
                layer.weight.uniform_(0.5, 1.5, generator=generator)
                layer.bias.normal_(0, 0.1, generator=generator)


def _center_head(net: nn.Module, head: nn.Linear, images: torch.Tensor | None) -> None:
    """Sets the head's bias so that the features of ``images`` are centred before normalisation: a
    network at its random initialisation maps every image to nearly the same direction (cosines
    above 0.998), which would leave a kNN vote to rounding."""
    if images is None:
        return
    seen = []
    handle = head.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        net.eval()(images)
        head.bias.copy_(-head.weight @ seen[0].mean(0))
    handle.remove()


def optimizer_state_04(model: nn.Module, lr: float, weight_decay: float = 1e-4) -> dict:
    """SGD's state dict as PyTorch 0.4 saved it: keyed by ``id(parameter)``, no ``foreach`` /
    ``maximize`` / ``differentiable`` / ``fused`` options."""
    parameters = list(model.parameters())
    ids = [140_000_000_000 + 64 * i for i in range(len(parameters))]
    return {
        "state": {
            key: {"momentum_buffer": torch.full_like(p, 0.01)} for key, p in zip(ids, parameters, strict=True)
        },
        "param_groups": [
            {
                "lr": lr,
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": weight_decay,
                "nesterov": True,
                "params": ids,
            }
        ],
    }


def write_main_checkpoint(
    path: Path,
    *,
    arch: str = "resnet18",
    rows: int = 12,
    dim: int = 128,
    epoch: int = 130,
    temperature: float = 0.05,
    momentum: float = 0.9,
    lr: float = 0.001,
    memory: torch.Tensor | Callable[[nn.Module], torch.Tensor] | None = None,
    with_arch: bool = True,
    center_on: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[Path, SimpleNamespace]:
    """A checkpoint as main.py saves it (``snca_resnet18.pth.tar``), in the legacy format of
    Python 2 / PyTorch 0.4: the DataParallel model's ``state_dict``, the whole ``LinearAverage``
    pickled, ``epoch`` (epochs done), ``best_prec1`` and the 0.4 optimizer state. ``memory`` is the
    bank, or makes it from the network. Returns the path and what it holds (``model``: the
    network, ``memory``, ``params``)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(arch, dim)
    _random_statistics(model, generator)
    _center_head(model, model.fc, center_on)
    with original_code(path.parent / f"original_code_{path.stem}") as code:
        lemniscate = code.LinearAverage(dim, rows, temperature, momentum)
        if memory is not None:
            lemniscate.memory.copy_(memory(model.eval()) if callable(memory) else memory)
        state = {
            "epoch": epoch,
            "arch": arch,
            "state_dict": OrderedDict(nn.DataParallel(model).state_dict()),
            "lemniscate": lemniscate,
            "best_prec1": 0.7059,
            "optimizer": optimizer_state_04(model, lr),
        }
        if not with_arch:
            del state["arch"]
        save_legacy(state, path)
    held = SimpleNamespace(
        model=model.eval(), memory=lemniscate.memory.clone(), params=lemniscate.params.clone()
    )
    return path, held


def write_cifar_checkpoint(
    path: Path,
    *,
    rows: int = 40,
    epoch: int = 7,
    temperature: float = 0.05,
    momentum: float = 0.5,
    data_parallel: bool = False,
    center_on: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[Path, SimpleNamespace]:
    """``checkpoint/ckpt.t7`` as cifar.py saves it: ``{'net': the network module, 'lemniscate':
    the memory module, 'acc', 'epoch'}`` (``epoch``: the 0-based epoch it was saved after), the
    network of the original CIFAR ResNet18 class (optionally inside ``nn.DataParallel``), in the
    legacy format of Python 2 / PyTorch 0.4.0. Returns the path and ``net`` (the original-layout
    network, still usable as an oracle), ``memory`` and ``params``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with original_code(path.parent / f"original_code_{path.stem}") as code:
        net = code.resnet_cifar.ResNet18(128)
        _random_statistics(net, generator)
        _center_head(net, net.linear, center_on)
        net.eval()
        _without_num_batches_tracked(net)
        lemniscate = code.LinearAverage(128, rows, temperature, momentum)
        state = {
            "net": nn.DataParallel(net) if data_parallel else net,
            "lemniscate": lemniscate,
            "acc": 0.8125,
            "epoch": epoch,
        }
        save_legacy(state, path)
    return path, SimpleNamespace(net=net, memory=lemniscate.memory.clone(), params=lemniscate.params.clone())
