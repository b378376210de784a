"""The network of a trained checkpoint and the examples its run names: what ``python -m
snca_ext.export`` and ``python -m snca_ext.neighbors`` both load (``load_trained_model``,
``split_dataset``) and the flags that say which (``add_checkpoint_arguments``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arguments import arch_type
from .checkpoints import FORMAT, from_original, load_checkpoint, original_run
from .data import (
    DATASETS,
    DEFAULT_LOCATION,
    ClassSubset,
    DataBundle,
    IndexedDataset,
    held_out_classes,
    run_data,
)
from .errors import CheckpointError, ExportError, error_text
from .models import build_model, input_channels

SPLITS = ("train", "test")
CLASS_SETS = ("all", "seen", "novel")


def load_trained_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    trust: bool = False,
    flag: str = "--checkpoint",
    arch: str | None = None,
    dataset: str | None = None,
    before_unpickling: Callable[[], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a checkpoint, in eval mode on ``device``, and its run arguments: ``args`` of a
    ``python -m snca_ext.train`` checkpoint; for an original SNCA checkpoint (main.py's
    ``.pth.tar``, cifar.py's ``ckpt.t7``), its arch (``arch`` where the file does not say),
    low-dim and the data set its arch implies. ``dataset`` (the ``--dataset`` flag) replaces the
    run's data set (an original checkpoint records none, nor its folder: ``split_dataset``'s
    ``data_path``). The args also hold the checkpoint's memory bank as ``bank`` (None if it has
    none). ``before_unpickling`` checks the command's other arguments before a file that needs
    unpickling (``--trust-checkpoint``) is unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = load_checkpoint(path, trust=trust, flag=flag, before_unpickling=before_unpickling)
    if state.get("format") == FORMAT:
        args = dict(state["args"])
        weights, bank, epoch = state["model"], state["memory"].get("bank"), int(state["epoch"])
    else:
        parts = from_original(state)
        if parts["low_dim"] is None:
            raise CheckpointError(f"{flag} {path}: an original checkpoint without the network's fc weights")
        args = {**original_run(parts, arch), "data": None, "loss": "snca", "original": parts["script"]}
        weights, bank, epoch = parts["model"], parts["bank"], parts["epoch"]
    if dataset is not None:
        args["dataset"] = dataset
    classifier = weights.get("classifier.weight")
    cosine = classifier is not None and args.get("loss") == "cosine-softmax"
    model = build_model(
        args["arch"],
        int(args["low_dim"]),
        classes=0 if classifier is None else len(classifier),
        in_channels=input_channels(weights),
        cosine_temperature=float(args["temperature"]) if cosine else None,
    )
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(
            f"{flag} {path}: the weights do not fit {args['arch']}: {error_text(error)}"
        ) from error
    args["epoch"] = epoch
    args["checkpoint"] = str(path)
    args["model_digest"] = weights_digest(weights)
    args["bank"] = bank
    return model.to(device).eval(), args


def weights_digest(weights: dict[str, Tensor]) -> str:
    """A digest of a network's weights (names, dtypes, shapes and bytes): the identity a feature
    file records, so that features are never searched with another network's queries. Not the
    checkpoint's path or epoch: a run folder is reused by ``--resume`` and files are copied."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(weights[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def original_data_check(data: str | None, dataset: str | None) -> Callable[[], None]:
    """The check, before an original checkpoint is unpickled, that its data can be read: such a
    file records no data set (its arch implies imagefolder or cifar10, both local folders), so
    ``--data`` (or a ``--dataset`` read from its default place) is needed, and must exist."""

    def check() -> None:
        if data is None and dataset not in DEFAULT_LOCATION:
            raise ExportError(
                "the checkpoint needs unpickling: an original SNCA checkpoint, which records no data "
                "set: pass --data PATH (or --dataset for a data set read from its default place); "
                "checked before the file is unpickled"
            )
        if data is not None and not Path(data).is_dir():
            raise ExportError(f"--data {data}: no such folder (checked before the checkpoint is unpickled)")

    return check


def run_bundle(run_args: dict[str, Any], data_path: str | None = None) -> DataBundle:
    """The data of the checkpoint's run (``load_trained_model``'s args), read from ``data_path``
    (default: where the run read it), with the same Omniglot splits and held-out alphabets."""
    dataset = run_args.get("dataset")
    if dataset is None:
        raise ExportError(f"the checkpoint does not say its data set: pass --dataset (one of {DATASETS})")
    if dataset == "digits" and data_path is not None:
        # As train: the digits are embedded, and a --data that changes nothing must not pass silently.
        raise ExportError(f"--data is not used by --dataset digits (embedded), got --data {data_path}")
    data_path = data_path if data_path is not None else run_args.get("data")
    if data_path is None and run_args.get("original") and dataset not in DEFAULT_LOCATION:
        raise ExportError(
            f"{run_args['checkpoint']} is an original {run_args['original']} checkpoint, which does not "
            f"record its data: pass --data PATH, the {dataset} folder (or --dataset and --data for another)"
        )
    return run_data(run_args, data_path)


def select_split(
    bundle: DataBundle, run_args: dict[str, Any], split: str, classes: str = "all"
) -> IndexedDataset:
    """The examples of ``split`` ("train": with the test-time transform, or "test") of ``bundle``,
    restricted to ``classes``: "all", or the run's "seen" / "novel" (held-out) classes."""
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    holdout = held_out_classes(bundle, str(run_args.get("holdout_classes") or ""))
    if classes != "all":
        if not holdout:
            raise ExportError(
                f"--classes {classes} needs a run trained with --holdout-classes (or omniglot's "
                "--omniglot-train / --holdout-alphabets)"
            )
        seen, novel = bundle.split_holdout(holdout)
        bundle = seen if classes == "seen" else novel
    return bundle.train_plain if split == "train" else bundle.test


def split_dataset(
    run_args: dict[str, Any],
    split: str,
    classes: str = "all",
    data_path: str | None = None,
    train_limit: int | None = None,
) -> IndexedDataset:
    """``select_split`` of the run's data (``run_bundle``), with only its first ``train_limit``
    training examples where given (a ``--train-limit`` run's memory bank holds those)."""
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, got {split!r}")
    if classes not in CLASS_SETS:
        raise ExportError(f"--classes must be one of {CLASS_SETS}, got {classes!r}")
    return select_split(run_bundle(run_args, data_path).limit(train_limit), run_args, split, classes)


def dataset_indices(dataset: IndexedDataset) -> Tensor:
    """Each example's index in the split's full dataset."""
    if isinstance(dataset, ClassSubset):
        return dataset_indices(dataset.parent)[dataset.rows]
    return torch.arange(len(dataset))


def add_checkpoint_arguments(add) -> None:
    """The flags that say which network to load and on which data, shared by export and
    neighbors: --checkpoint, --trust-checkpoint, and --dataset/--data/--arch for what the
    checkpoint does not record."""
    add(
        "--checkpoint",
        required=True,
        help="a checkpoint.pt of python -m snca_ext.train (or its run folder), or an original SNCA "
        "checkpoint (main.py's .pth.tar, cifar.py's ckpt.t7; with --trust-checkpoint)",
    )
    add(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that need unpickling (the original project's): unpickling can run code",
    )
    add(
        "--dataset",
        choices=DATASETS,
        help="the data set, if not the checkpoint's run's (an original checkpoint records none: its arch "
        "implies imagefolder for main.py's ResNets, cifar10 for cifar.py's ckpt.t7)",
    )
    add(
        "--data",
        help="the dataset folder, if not where the checkpoint's run read it (original checkpoints: needed)",
    )
    add("--arch", type=arch_type, help="the network of an original checkpoint that does not say its arch")
