"""Checkpoints that never lose work, and loading the original project's format.

``save_checkpoint`` writes a temporary file next to the target and renames it over the target, so
a crash or a full disk during the save leaves the previous checkpoint intact. ``load_checkpoint``
uses ``torch.load(weights_only=True)``; a file that needs full unpickling (the original project's
checkpoints pickle the whole memory module) loads only with ``trust=True``, because unpickling can
run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

FORMAT = "snca_ext.train/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or is not in a format this package understands."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to ``path`` atomically: to a temporary file in the same folder, flushed to
    disk, then renamed over ``path``. On failure the temporary file is removed and ``path`` keeps
    its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    return lines[-1] if lines else type(error).__name__


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded on the CPU.

    Tries ``weights_only=True`` first; a file that needs full unpickling is loaded only when
    ``trust`` is set, with classes whose code is missing replaced by an attribute holder.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported is None:  # not a pickle of allowed objects that failed: a damaged file
            raise CheckpointError(
                f"--resume {path} could not be read as a torch checkpoint (corrupt or not a "
                f"checkpoint: {_last_line(error)})"
            ) from error
        if not trust:
            raise CheckpointError(
                f"--resume {path} holds pickled Python objects ({unsupported.group(1)}), so it cannot "
                f"be loaded with weights_only=True (the original SNCA project's checkpoints pickle "
                f"their memory module). If you trust where the file comes from, pass "
                f"--trust-checkpoint: unpickling can run arbitrary code."
            ) from error
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)
        except Exception as second_error:
            raise CheckpointError(f"--resume {path} could not be read ({second_error})") from second_error
    except Exception as error:
        raise CheckpointError(f"--resume {path} could not be read as a torch checkpoint ({error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume {path} holds a {type(state).__name__}, expected a dict checkpoint")
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
