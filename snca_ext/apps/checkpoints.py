"""Checkpoints that never lose work, and loading the original project's format.

``save_checkpoint`` writes atomically (``files.atomic_write``), so a crash or a full disk during
the save leaves the previous checkpoint intact. ``load_checkpoint``
uses ``torch.load(weights_only=True)``; a file that needs full unpickling (the original project's
checkpoints pickle the whole memory module) loads only with ``trust=True``, because unpickling can
run arbitrary code.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from snca_ext import MemoryBank

from .errors import CheckpointError
from .files import atomic_write

FORMAT = "snca_ext.train/1"

__all__ = [
    "FORMAT",
    "CheckpointError",
    "from_original",
    "load_checkpoint",
    "load_original",
    "save_checkpoint",
]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to ``path`` atomically; on failure ``path`` keeps its previous content."""
    with atomic_write(path) as file:
        torch.save(state, file)


class _MissingClass:
    """Stand-in for a class whose code is not installed (e.g. the original ``LinearAverage``):
    keeps the pickled attributes so their tensors can be read."""

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from __reduce_ex__
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _MissingClass


_TOLERANT_PICKLE = SimpleNamespace(
    Unpickler=_TolerantUnpickler, load=pickle.load, loads=pickle.loads, __name__="pickle"
)


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def load_checkpoint(path: str | Path, *, trust: bool = False, flag: str = "--resume") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded on the CPU.

    Tries ``weights_only=True`` first; a file that needs full unpickling is loaded only when
    ``trust`` is set, with classes whose code is missing replaced by an attribute holder. Errors
    name the file as the command-line ``flag`` that gave it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{flag} {path} is an empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported is None:  # not a pickle of allowed objects that failed: a damaged file
            raise CheckpointError(
                f"{flag} {path} could not be read as a torch checkpoint (corrupt or not a "
                f"checkpoint: {_last_line(error)})"
            ) from error
        if not trust:
            raise CheckpointError(
                f"{flag} {path} holds pickled Python objects ({unsupported.group(1)}), so it cannot "
                f"be loaded with weights_only=True (the original SNCA project's checkpoints pickle "
                f"their memory module). If you trust where the file comes from, pass "
                f"--trust-checkpoint: unpickling can run arbitrary code."
            ) from error
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)
        except Exception as second_error:
            raise CheckpointError(f"{flag} {path} could not be read ({second_error})") from second_error
    except Exception as error:
        raise CheckpointError(
            f"{flag} {path} could not be read as a torch checkpoint (corrupt or not a checkpoint: "
            f"{_last_line(error)})"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag} {path} holds a {type(state).__name__}, expected a dict checkpoint")
    return state


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def _original_memory(lemniscate) -> torch.Tensor | None:
    """The bank tensor of the original's pickled ``LinearAverage`` (or its state dict)."""
    if isinstance(lemniscate, dict):
        return lemniscate.get("memory")
    memory = getattr(lemniscate, "memory", None)
    if isinstance(memory, torch.Tensor):
        return memory
    buffers = getattr(lemniscate, "_buffers", None) or {}
    return buffers.get("memory")


def from_original(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of an original SNCA checkpoint (``state_dict`` with ``module.`` prefixes,
    ``lemniscate``, ``epoch``, ``optimizer``) in this package's names: ``model``, ``bank`` (or
    None), ``epoch`` (epochs done), ``optimizer`` (or None)."""
    if "state_dict" not in state:
        raise CheckpointError(
            f"not a snca_ext checkpoint (no 'format': {FORMAT!r}) nor an original SNCA checkpoint "
            f"(no 'state_dict'); its keys are {sorted(state)[:10]}"
        )
    return {
        "model": _strip_prefix(state["state_dict"]),
        "bank": _original_memory(state.get("lemniscate")),
        "epoch": int(state.get("epoch", 0)),
        "optimizer": state.get("optimizer"),
    }


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
            f"the original checkpoint's weights do not fit the model: {str(error).splitlines()[0]}"
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
