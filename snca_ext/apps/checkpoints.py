"""Checkpoints that never lose work, and loading the original project's formats.

``save_checkpoint`` writes atomically (``files.atomic_write``), so a crash or a full disk during
the save leaves the previous checkpoint intact. ``load_checkpoint``
uses ``torch.load(weights_only=True)``; a file that needs full unpickling (the original project's
checkpoints pickle the whole memory module, CIFAR's ``ckpt.t7`` its network too) loads only with
``trust=True``, because unpickling can run arbitrary code. Then the files of Python 2 and PyTorch
0.4 load as well (the legacy serialisation, byte strings read as latin-1), without the original
code installed: its classes are read as stand-ins that keep their attributes, and ``from_original``
turns main.py's ``.pth.tar`` and cifar.py's ``ckpt.t7`` into this package's names.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.serialization import SourceChangeWarning

from snca_ext import MemoryBank

from .errors import CheckpointError, UsageError
from .files import atomic_write
from .models import ARCHS, RESNETS

FORMAT = "snca_ext.train/1"

__all__ = [
    "FORMAT",
    "IMPLIED_DATASET",
    "CheckpointError",
    "from_original",
    "is_original",
    "load_checkpoint",
    "load_original",
    "module_tensors",
    "original_arch",
    "original_run",
    "save_checkpoint",
]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to ``path`` atomically; on failure ``path`` keeps its previous content."""
    with atomic_write(path) as file:
        torch.save(state, file)


class _MissingClass:
    """Stand-in for a class whose code is not installed (the original's ``LinearAverage``,
    ``models.resnet_cifar.ResNet``, ...): created without running any code of the class, it keeps
    the pickled attributes (a module's ``_parameters``, ``_buffers`` and ``_modules``) so their
    tensors can be read. ``dump_patches`` is read by torch's legacy loader when a pickled module's
    saved source differs from the class's."""

    dump_patches = False
    pickled_as = "?"  # "module.Class" of the missing class, set on each stand-in subclass

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from __reduce_ex__
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_as}>"


_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    """One stand-in class per missing class, named after it (for messages)."""
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (_MissingClass,), {"pickled_as": f"{module}.{name}"})
    return _STAND_INS[key]


class TolerantUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose unknown classes become stand-ins (Python 2 names such as
    ``copy_reg`` are mapped by ``pickle`` itself)."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stand_in(module, name)


_TOLERANT_PICKLE = SimpleNamespace(
    Unpickler=TolerantUnpickler, load=pickle.load, loads=pickle.loads, __name__="pickle"
)


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def _torch_load(path: Path, **options) -> Any:
    """``torch.load`` on the CPU with Python 2's byte strings read as latin-1 (the original's
    checkpoints were written by Python 2; latin-1 reads any byte, and Python 3's strings are not
    affected), without the warnings of torch's legacy loader about the classes' source code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        warnings.filterwarnings("ignore", message="pickle_load_args only works if")
        return torch.load(path, map_location="cpu", encoding="latin1", **options)


def load_checkpoint(
    path: str | Path,
    *,
    trust: bool = False,
    flag: str = "--resume",
    before_unpickling: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded on the CPU.

    Tries ``weights_only=True`` first (nothing but tensors and plain containers is unpickled, in
    the zip format and the legacy one of PyTorch < 1.6); a file that needs full unpickling is
    loaded only when ``trust`` is set, with classes whose code is missing replaced by stand-ins
    that keep their attributes, and only once ``before_unpickling`` (the command's checks of its
    other arguments) has passed: a file's code must not run for a command that is then refused.
    Errors name the file as the command-line ``flag`` that gave it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{flag} {path} is an empty file, not a checkpoint")
    try:
        state = _torch_load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        # A global that weights_only=True does not admit (a class or function to call): the file is
        # intact but needs the full unpickler.
        unsupported = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))
        legacy_tar = "legacy .tar format" in str(error)  # PyTorch < 0.1.10: weights_only cannot read it
        if unsupported is None and not legacy_tar:  # not a pickle of allowed objects: a damaged file
            raise CheckpointError(
                f"{flag} {path} could not be read as a torch checkpoint (corrupt or not a "
                f"checkpoint: {_last_line(error)})"
            ) from error
        if not trust:
            what = "the oldest torch format"
            if unsupported:
                what = f"pickled Python objects ({unsupported.group(1)})"
            raise CheckpointError(
                f"{flag} {path} holds {what}, so it cannot be loaded with weights_only=True, which "
                f"unpickles nothing but tensors and plain containers (the original SNCA project's "
                f"checkpoints pickle their memory module, and CIFAR's ckpt.t7 its network too). If you "
                f"trust where the file comes from, pass --trust-checkpoint: it unpickles the whole "
                f"file, which can run arbitrary code; classes that are not installed (the original's "
                f"lib/ and models/) are read as plain attributes."
            ) from error
        if before_unpickling is not None:
            before_unpickling()
        try:
            state = _torch_load(path, weights_only=False, pickle_module=_TOLERANT_PICKLE)
        except Exception as second_error:
            raise CheckpointError(
                f"{flag} {path} could not be read ({_last_line(second_error)})"
            ) from second_error
    except Exception as error:
        raise CheckpointError(
            f"{flag} {path} could not be read as a torch checkpoint (corrupt or not a checkpoint: "
            f"{_last_line(error)})"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag} {path} holds a {type(state).__name__}, expected a dict checkpoint")
    return state


# ----------------------------------------------------------------------------- the original's formats


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def module_tensors(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters and buffers of a pickled module, by their ``state_dict`` names: of a real
    ``nn.Module`` or of a stand-in for a class that is not installed (both keep ``_parameters``,
    ``_buffers`` and ``_modules``); a dict is taken as a state dict already."""
    if isinstance(module, dict):
        return {f"{prefix}{key}": value for key, value in module.items() if isinstance(value, torch.Tensor)}
    attributes = getattr(module, "__dict__", {})
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (attributes.get(kind) or {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}"] = value.detach()
    for name, child in (attributes.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_tensors(child, f"{prefix}{name}."))
    return tensors


def _class_name(value: Any) -> str:
    kind = type(value)
    return getattr(kind, "pickled_as", None) or f"{kind.__module__}.{kind.__qualname__}"


def _memory_module(lemniscate: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(memory, params)`` of the original's ``LinearAverage`` (pickled module or state dict):
    the bank [N, D] and ``[T, momentum]``."""
    if lemniscate is None:
        return None, None
    tensors = module_tensors(lemniscate)
    return tensors.get("memory"), tensors.get("params")


_CIFAR_NAMES = ((re.compile(r"^linear\."), "fc."), (re.compile(r"\.shortcut\."), ".downsample."))


def _cifar_arch(weights: dict[str, torch.Tensor]) -> str:
    """``cifar_resnet18`` if ``weights`` (in torchvision's names) are the original CIFAR ResNet18's."""
    names = [key.split(".") for key in weights]
    blocks = [len({name[1] for name in names if name[0] == f"layer{i}"}) for i in range(1, 5)]
    bottleneck = any(".conv3." in key for key in weights)
    stem = weights.get("conv1.weight")
    if blocks != [2, 2, 2, 2] or bottleneck or stem is None or tuple(stem.shape[2:]) != (3, 3):
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise CheckpointError(
            f"the CIFAR checkpoint's network has {kind} blocks {blocks} per stage; this package builds "
            f"only the CIFAR ResNet18 (BasicBlock [2, 2, 2, 2], cifar_resnet18)"
        )
    return "cifar_resnet18"


def _decimal(value: torch.Tensor) -> float:
    """The shortest decimal of a float32 (``params`` holds ``T`` 0.05 as 0.0500000007...)."""
    return float(np.format_float_positional(np.float32(value.item()), unique=True, trim="-"))


def is_original(state: dict[str, Any]) -> bool:
    """Whether ``state`` is a checkpoint of the original project (main.py's or cifar.py's)."""
    return state.get("format") != FORMAT and ("state_dict" in state or "net" in state)


def from_original(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of an original SNCA checkpoint in this package's names:

    - ``script``: ``"main.py"`` (ImageNet: ``state_dict`` with DataParallel's ``module.``
      prefixes, ``arch``, ``lemniscate``, ``epoch`` = epochs done, ``best_prec1``, ``optimizer``)
      or ``"cifar.py"`` (``checkpoint/ckpt.t7``: ``net``, the pickled network, ``lemniscate``,
      ``acc``, ``epoch`` = the 0-based epoch it was saved after; names ``linear.*`` and
      ``layerX.Y.shortcut.*`` become ``fc.*`` and ``layerX.Y.downsample.*``);
    - ``model`` (weights), ``arch`` (None when the file does not say), ``low_dim``;
    - ``bank`` [N, D], ``temperature`` and ``memory_momentum`` (the memory's ``params``), or None;
    - ``epoch`` (epochs done), ``optimizer`` (state dict or None), ``accuracy`` (as recorded).
    """
    if "net" in state:
        script = "cifar.py"
        net = state["net"]
        if isinstance(net, torch.nn.Module | _MissingClass | dict):
            weights = _strip_prefix(module_tensors(net))
        else:
            raise CheckpointError(f"the CIFAR checkpoint's 'net' is a {_class_name(net)}, not a network")
        for pattern, replacement in _CIFAR_NAMES:
            weights = {pattern.sub(replacement, key): value for key, value in weights.items()}
        arch = _cifar_arch(weights)
        epoch = int(state.get("epoch", -1)) + 1
        accuracy = state.get("acc")
    elif "state_dict" in state:
        script = "main.py"
        weights = _strip_prefix(module_tensors(state["state_dict"]))
        arch = state.get("arch")
        arch = arch.decode("latin-1") if isinstance(arch, bytes) else arch
        epoch = int(state.get("epoch", 0))
        accuracy = state.get("best_prec1")
    else:
        raise CheckpointError(
            f"not a snca_ext checkpoint (no 'format': {FORMAT!r}) nor an original SNCA checkpoint "
            f"(no 'state_dict' as main.py saves, no 'net' as cifar.py saves); its keys are "
            f"{sorted(map(str, state))[:10]}"
        )
    bank, params = _memory_module(state.get("lemniscate"))
    head = weights.get("fc.weight")
    optimizer = state.get("optimizer")
    return {
        "script": script,
        "model": weights,
        "arch": arch,
        "low_dim": None if head is None else int(head.shape[0]),
        "bank": bank,
        "temperature": None if params is None else _decimal(params[0]),
        "memory_momentum": None if params is None or len(params) < 2 else _decimal(params[1]),
        "epoch": epoch,
        "optimizer": optimizer if isinstance(optimizer, dict) else None,
        "accuracy": float(accuracy) if isinstance(accuracy, int | float) else None,
    }


# The data set an original checkpoint implies by its architecture: main.py trains an ImageNet-style
# folder, cifar.py CIFAR-10 (the others are this package's own networks).
IMPLIED_DATASET = {
    **{arch: "imagefolder" for arch in RESNETS},
    "cifar_resnet18": "cifar10",
    "digits_cnn": "digits",
    "fashion_cnn": "fashion-mnist",
}


def original_arch(parts: dict[str, Any], arch: str | None = None) -> str:
    """The architecture of an original checkpoint: its own, else ``arch`` (the ``--arch`` flag)."""
    saved = parts["arch"]
    if saved is not None and arch is not None and arch != saved:
        raise UsageError(f"--arch {arch}: the checkpoint's network is a {saved}")
    chosen = saved or arch
    if chosen is None:
        raise UsageError(f"--arch is needed: the checkpoint does not say its architecture (one of {ARCHS})")
    if chosen not in ARCHS:
        raise CheckpointError(f"the checkpoint's network is a {chosen!r}; this package builds {ARCHS}")
    return chosen


def original_run(parts: dict[str, Any], arch: str | None = None) -> dict[str, Any]:
    """What an original checkpoint says of its run, in ``RunConfig``'s names: ``arch`` (its own, or
    the ``--arch`` flag where it does not say), ``dataset`` (the one its arch implies), ``low_dim``
    and the memory's ``temperature`` and ``memory_momentum`` where it has them."""
    chosen = original_arch(parts, arch)
    run = {"arch": chosen, "dataset": IMPLIED_DATASET[chosen]}
    for key in ("low_dim", "temperature", "memory_momentum"):
        if parts[key] is not None:
            run[key] = parts[key]
    return run


def load_original(
    state: dict[str, Any],
    *,
    model: nn.Module,
    memory: MemoryBank,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.StepLR,
    recompute_bank: bool,
) -> int:
    """Loads an original SNCA checkpoint into a run: the model, the bank (unless it has none and
    ``recompute_bank`` is set), the optimizer state when it fits, and the learning rate of the
    epoch it ends at (the step schedule's, set after the optimizer state, which holds the lr of
    the epoch before). Returns the epochs done."""
    parts = from_original(state)
    try:
        model.load_state_dict(parts["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"the original checkpoint's weights (of a {parts['arch'] or 'network it does not name'}) do "
            f"not fit the model: {str(error).strip().splitlines()[0]}"
        ) from error
    if parts["bank"] is not None:
        if tuple(parts["bank"].shape) != (memory.size, memory.dim):
            raise CheckpointError(
                f"the original checkpoint's memory has shape {tuple(parts['bank'].shape)}, but the "
                f"training set needs {(memory.size, memory.dim)}"
            )
        memory.fill(parts["bank"])
    elif not recompute_bank:
        raise CheckpointError(
            "the original checkpoint has no memory bank ('lemniscate'); pass --recompute-bank"
        )
    if parts["optimizer"] is not None:
        try:
            optimizer.load_state_dict(parts["optimizer"])
        except (ValueError, KeyError) as error:
            warnings.warn(
                f"the original optimizer state does not fit, starting it afresh ({error})", stacklevel=2
            )
    epoch = parts["epoch"]
    scheduler.last_epoch = epoch
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * scheduler.gamma ** (epoch // scheduler.step_size)
    return epoch
