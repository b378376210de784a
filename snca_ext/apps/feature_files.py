"""The feature files of ``python -m snca_ext.export`` (layout in ``snca_ext.apps.export``'s
docstring): written streamed (``write_safetensors``, ``write_features``), read memory-mapped
without the ``safetensors`` package (``read_safetensors``), loaded and checked (``load_features``)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ExportError
from .files import atomic_write

EXPORT_FORMAT = "snca_ext.export/1"
_DTYPES = {"F32": (torch.float32, np.float32), "I64": (torch.int64, np.int64)}


def write_safetensors(
    path: str | Path,
    batches: Iterable[Tensor],
    rows: int,
    dim: int,
    labels: Tensor,
    indices: Tensor,
    metadata: dict[str, str],
) -> None:
    """Streams ``batches`` of [b, dim] float32 rows (``rows`` in all) into a safetensors file with
    ``features``, ``labels`` and ``indices``; written to a temporary file, renamed when complete."""
    path = Path(path)
    sizes = {"features": rows * dim * 4, "labels": rows * 8, "indices": rows * 8}
    header: dict[str, Any] = {"__metadata__": {key: str(value) for key, value in metadata.items()}}
    offset = 0
    for name, dtype, shape in (
        ("features", "F32", [rows, dim]),
        ("labels", "I64", [rows]),
        ("indices", "I64", [rows]),
    ):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format recommends 8-byte aligned data
    with atomic_write(path) as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        written = 0
        for batch in batches:
            if batch.dim() != 2 or batch.shape[1] != dim:
                raise ValueError(f"feature batches must be [b, {dim}], got {tuple(batch.shape)}")
            file.write(batch.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
            written += batch.shape[0]
        if written != rows:
            raise ValueError(f"expected {rows} feature rows, the batches held {written}")
        file.write(labels.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())
        file.write(indices.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())


def _valid_entry(entry: Any) -> bool:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(whole(size) for size in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(whole(offset) for offset in offsets)
        and offsets[0] <= offsets[1]
    )


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file, memory-mapped (pages are read on use), and its metadata."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ExportError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ExportError(f"{path}: not a safetensors file (header length {length} > file size)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ExportError(f"{path}: not a safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise ExportError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise ExportError(f"{path}: malformed safetensors header (__metadata__ is not an object)")
    tensors = {}
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise ExportError(
                f"{path}: malformed safetensors header: tensor {name!r} needs a dtype, a shape of "
                f"integers >= 0 and data_offsets [begin, end] with 0 <= begin <= end, got {entry!r}"[:400]
            )
        if entry["dtype"] not in _DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected F32 or I64")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        _, np_dtype = _DTYPES[entry["dtype"]]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * np.dtype(np_dtype).itemsize or 8 + length + end > size:
            raise ExportError(f"{path}: tensor {name} does not fit its offsets (truncated file?)")
        if count == 0:
            tensors[name] = torch.zeros(shape, dtype=_DTYPES[entry["dtype"]][0])
            continue
        # mode "c" (copy-on-write) gives a writable array without writing back to the file.
        array = np.memmap(
            path, dtype=np.dtype(np_dtype).newbyteorder("<"), mode="c", offset=8 + length + begin, shape=shape
        )
        tensors[name] = torch.from_numpy(array)
    return tensors, metadata


def load_features(path: str | Path) -> dict[str, Any]:
    """``{"features", "labels", "indices", "metadata", "paths"}`` of a file written by this module
    (``.safetensors``, memory-mapped, or ``.pt``); ``paths`` is the ``--images`` files' list, or
    None."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such feature file")
    if path.suffix == ".pt":
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ExportError(f"{path}: could not be read as a torch file ({error})") from error
        tensors, metadata = content, content.get("metadata", {})
    else:
        tensors, metadata = read_safetensors(path)
    missing = [name for name in ("features", "labels", "indices") if name not in tensors]
    if missing:
        raise ExportError(f"{path}: lacks {', '.join(missing)}; not written by python -m snca_ext.export")
    paths = tensors.get("paths")
    if paths is None and "paths" in metadata:
        try:
            paths = json.loads(metadata["paths"])
        except json.JSONDecodeError as error:
            raise ExportError(f"{path}: its paths metadata is not a JSON list ({error})") from error
    exported = {
        "features": tensors["features"],
        "labels": tensors["labels"],
        "indices": tensors["indices"],
        "metadata": dict(metadata),
        "paths": paths,
    }
    check_features(exported, path)
    return exported


# Rows checked for finiteness at a time: bounds the temporary [rows, D] mask of a memory-mapped
# file (ImageNet's 1.28 M rows would need a 164 MB mask at once).
_CHECK_ROWS = 65536


def check_features(exported: dict[str, Any], where: str | Path) -> None:
    """The check every command that reads a feature file makes (``load_features`` calls it):
    [N, D] floating features, all finite; [N] integer labels >= -1 (-1: ``--images`` rows) and
    below the number of ``class_names`` where the file names them; [N] indices >= 0. A NaN row
    would otherwise be searched (NaN similarities) or averaged into a class mean silently."""
    features, labels, indices = exported["features"], exported["labels"], exported["indices"]
    if features.dim() != 2 or not features.is_floating_point():
        raise ExportError(
            f"{where}: features must be a floating [N, D] tensor, got {features.dtype} "
            f"{tuple(features.shape)}"
        )
    rows = features.shape[0]
    for name, tensor in (("labels", labels), ("indices", indices)):
        if tensor.dim() != 1 or tensor.shape[0] != rows or tensor.is_floating_point():
            raise ExportError(
                f"{where}: {name} must be an integer [N] tensor with N = {rows} (the features' rows), "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
    for first in range(0, rows, _CHECK_ROWS):
        finite = torch.isfinite(features[first : first + _CHECK_ROWS]).all(dim=1)
        if not bool(finite.all()):
            row = first + int((~finite).nonzero()[0])
            raise ExportError(
                f"{where}: feature row {row} of its {rows} holds NaN or inf; "
                "export the features again from a checkpoint that did not diverge"
            )
    if rows == 0:
        return
    if int(labels.min()) < -1:
        raise ExportError(
            f"{where}: labels must be class ids >= 0 (or -1 for --images), got {int(labels.min())}"
        )
    if int(indices.min()) < 0:
        raise ExportError(f"{where}: indices must be >= 0, got {int(indices.min())}")
    names = exported["metadata"].get("class_names")
    if names is not None:
        try:
            count = len(json.loads(names))
        except (json.JSONDecodeError, TypeError) as error:
            raise ExportError(f"{where}: its class_names metadata is not a JSON list ({error})") from error
        if int(labels.max()) >= count:
            raise ExportError(
                f"{where}: label {int(labels.max())} is not one of the {count} classes its class_names "
                "metadata names"
            )


def run_metadata(run_args: dict[str, Any], **fields: Any) -> dict[str, str]:
    """The metadata of a feature file: the format, the checkpoint's run and ``fields`` (the split or
    the images), as strings."""
    metadata = {
        "format": EXPORT_FORMAT,
        "checkpoint": run_args["checkpoint"],
        "dataset": run_args.get("dataset"),
        **fields,
        "arch": run_args["arch"],
        "low_dim": run_args["low_dim"],
        "loss": run_args.get("loss", "snca"),
        "epoch": run_args["epoch"],
        "model_digest": run_args["model_digest"],
    }
    return {key: str(value) for key, value in metadata.items()}


def write_features(
    out: Path,
    batches: Iterable[Tensor],
    rows: int,
    dim: int,
    labels: Tensor,
    indices: Tensor,
    metadata: dict[str, str],
    paths: list[str] | None = None,
) -> None:
    """Writes the feature file ``out``: streamed to a ``.safetensors``, gathered for a ``.pt``
    (which holds ``paths`` as a list; the safetensors metadata as JSON)."""
    if out.suffix != ".pt":
        if paths is not None:
            metadata = {**metadata, "paths": json.dumps(paths)}
        write_safetensors(out, batches, rows, dim, labels, indices, metadata)
        return
    features = torch.empty(rows, dim)
    start = 0
    for batch in batches:
        features[start : start + len(batch)] = batch
        start += len(batch)
    content = {"features": features, "labels": labels, "indices": indices, "metadata": metadata}
    if paths is not None:
        content["paths"] = paths
    with atomic_write(out) as file:
        torch.save(content, file)
