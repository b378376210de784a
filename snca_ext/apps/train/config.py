"""The run configuration: the paper's recipe per data set, every value a flag, merged with a
checkpoint's run on ``--resume`` and checked as a whole."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snca_ext.distributed import DEFAULT_TIMEOUT_S

from ..data import COARSE_LABELLED, DEFAULT_LOCATION
from ..errors import UsageError
from ..models import TIMM_PREFIX

# The paper's recipe per dataset (the original main.py / cifar.py); digits is this package's own,
# sized to reach >= 99% kNN top-1 in under a minute on two CPU cores.
RECIPES: dict[str, dict[str, Any]] = {
    "imagefolder": {
        "arch": "resnet18",
        "low_dim": 128,
        "temperature": 0.05,
        "batch_size": 256,
        "lr": 0.1,
        "lr_step": 40,
        "epochs": 130,
        "weight_decay": 1e-4,
        "memory_momentum": 0.5,
        "memory_schedule": "80:0.8,120:0.9",
        "workers": min(32, os.cpu_count() or 1),
        "threads": None,
    },
    "cifar10": {
        "arch": "cifar_resnet18",
        "low_dim": 128,
        "temperature": 0.05,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 50,
        "epochs": 200,
        "weight_decay": 5e-4,
        "memory_momentum": 0.5,
        "memory_schedule": "",
        "workers": min(8, os.cpu_count() or 1),
        "threads": None,
    },
    "fashion-mnist": {
        # This package's recipe for 2 CPU cores (experiments/fidelity.py): a small CNN, the
        # paper's temperature and momenta, a short step schedule (9 epochs: 91.7% kNN, seed 0;
        # 6 epochs: 91.2%; the README has the runs and their times).
        "arch": "fashion_cnn",
        "low_dim": 128,
        "temperature": 0.05,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 6,
        "epochs": 9,
        "weight_decay": 5e-4,
        "memory_momentum": 0.5,
        "memory_schedule": "",
        "workers": 0,
        "threads": None,
    },
    "omniglot": {
        # Found by experiment on small1 -> small2 (README, "Omniglot"): with 20 images a class the
        # positives a query sees are otherwise only bank rows written by older networks, and SNCA
        # learns slowly (37 % 20-way one-shot after 15 epochs); the batch's own rows fresh
        # (fresh_batch) and a slow bank (momentum 0.95: a smoothed anchor beside the fresh batch)
        # fix it. T 0.07 (0.05 to 0.1 alike, 0.03 worse), 30 epochs, lr / 10 after 21 (70 %); mild
        # affine augmentation (snca_ext/apps/data/omniglot.py; strong augmentation hurt).
        "arch": "fashion_cnn",
        "low_dim": 128,
        "temperature": 0.07,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 21,
        "epochs": 30,
        "weight_decay": 5e-4,
        "memory_momentum": 0.95,
        "memory_schedule": "",
        "fresh_batch": True,
        "workers": 0,
        "threads": None,
    },
    "digits": {
        "arch": "digits_cnn",
        "low_dim": 128,
        "temperature": 0.1,
        "batch_size": 64,
        "lr": 0.1,
        "lr_step": 10,
        "epochs": 25,
        "weight_decay": 5e-4,
        "memory_momentum": 0.5,
        "memory_schedule": "",
        "workers": 0,
        # The network is tiny: a second thread gains little, and on a shared, loaded machine
        # OpenMP threads that wait on each other make an epoch ten times slower. One thread also
        # makes the result the same on every machine.
        "threads": 1,
    },
}
COMMON_DEFAULTS: dict[str, Any] = {
    "lr_gamma": 0.1,
    "sgd_momentum": 0.9,
    "nesterov": True,
    "margin": 0.0,
    "iter_size": 1,
    "knn_k": 30,
    "knn_sigma": None,  # the temperature
    "monitor_k": 1,
    "bank_dtype": "float32",
    "seed": 0,
    "backend": "auto",
    "loss": "snca",
    "holdout_classes": "",  # canonical "5,6,7,8,9"; "" trains on every class
    "train_labels": "fine",  # or "coarse": train on the coarse classes (sub-category discovery)
    "omniglot_train": "",  # Omniglot: the splits trained on, "small1,small2" ("": every split found)
    "holdout_alphabets": "",  # Omniglot: alphabets held out by name ("": none)
    "train_limit": None,  # None: every example
    "test_limit": None,
    "fresh_batch": False,  # the loss sees the batch's own rows fresh (MemoryBank.loss(fresh_rows=...))
}
RECIPES["cifar100"] = dict(RECIPES["cifar10"])  # the same recipe, 100 classes (or 20 coarse ones)
# The novel-class few-shot episodes' classes per episode, where not 5: Omniglot's headline is
# 20-way (Lake et al.), within one alphabet.
FEWSHOT_WAYS: dict[str, tuple[int, ...]] = {"omniglot": (20, 5)}
# What defines a run: saved in the checkpoint, and taken from it on --resume unless given again.
RUN_KEYS = (*RECIPES["digits"], *COMMON_DEFAULTS, "dataset", "data")


@dataclass
class RunConfig:
    """Everything a run of ``python -m snca_ext.train`` is told: the run (``RUN_KEYS``, saved in
    its checkpoint) and how this invocation runs it."""

    # the run
    dataset: str = "digits"
    data: str | None = None
    arch: str = "digits_cnn"
    low_dim: int = 128
    temperature: float = 0.1
    batch_size: int = 64
    lr: float = 0.1
    lr_step: int = 10
    lr_gamma: float = 0.1
    epochs: int = 25
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    nesterov: bool = True
    memory_momentum: float = 0.5
    memory_schedule: str = ""
    margin: float = 0.0
    iter_size: int = 1
    knn_k: int = 30
    knn_sigma: float | None = None
    monitor_k: int = 1
    bank_dtype: str = "float32"
    fresh_batch: bool = False
    seed: int = 0
    backend: str = "auto"
    loss: str = "snca"
    holdout_classes: str = ""
    omniglot_train: str = ""
    holdout_alphabets: str = ""
    train_labels: str = "fine"
    train_limit: int | None = None
    test_limit: int | None = None
    workers: int = 0
    threads: int | None = 1
    # this invocation
    fewshot_ways: tuple[int, ...] | None = None  # None: FEWSHOT_WAYS of the data set
    fewshot_shots: tuple[int, ...] = (1, 5)
    fewshot_episodes: int = 1000
    recompute_bank: bool | None = None
    resume: str | None = None
    evaluate: bool = False
    trust_checkpoint: bool = False
    skip_bad_images: bool = False
    # how this invocation computes (not saved with the run: a resume may choose otherwise)
    pretrained: str | None = None
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    out: str | None = None
    stop_after_steps: int | None = None
    no_progress: bool = False
    tensorboard: str | None = None
    bank_sharding: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S

    @classmethod
    def resolve(cls, args: argparse.Namespace, saved: dict[str, Any] | None = None) -> RunConfig:
        """The configuration of the command line ``args``: every flag left unset comes from the
        checkpoint's run (``saved``) on resume, else from the data set's recipe."""
        given = {key: value for key, value in vars(args).items() if value is not None}
        if saved is not None:
            base = {key: saved[key] for key in RUN_KEYS if key in saved}
        else:
            dataset = given.get("dataset", "digits")
            base = {"dataset": dataset, **COMMON_DEFAULTS, **RECIPES[dataset]}
        merged = {**base, **given}
        for key, value in {**COMMON_DEFAULTS, **RECIPES[merged["dataset"]]}.items():
            merged.setdefault(key, value)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{key: value for key, value in merged.items() if key in names})
        if config.knn_sigma is None:
            config.knn_sigma = config.temperature
        if config.fewshot_ways is None:
            config.fewshot_ways = FEWSHOT_WAYS.get(config.dataset, (5,))
        if config.recompute_bank is None:
            config.recompute_bank = not config.evaluate
        config.validate()
        return config

    def validate(self) -> None:
        """Checks what single flags cannot: their combinations."""
        if self.evaluate and self.resume is None:
            raise UsageError("--evaluate needs --resume CHECKPOINT (the model to evaluate)")
        if self.dataset == "digits" and self.data is not None:
            raise UsageError(f"--data is not used by --dataset digits (embedded), got --data {self.data}")
        if self.dataset not in DEFAULT_LOCATION and self.data is None:
            raise UsageError(
                f"--dataset {self.dataset} needs --data PATH (a local folder; nothing is downloaded)"
            )
        if self.train_labels == "coarse" and self.dataset not in COARSE_LABELLED:
            raise UsageError(
                f"--train-labels coarse needs a data set with coarse classes {COARSE_LABELLED}, "
                f"got --dataset {self.dataset}"
            )
        if self.dataset != "omniglot" and (self.omniglot_train or self.holdout_alphabets):
            raise UsageError(
                "--omniglot-train and --holdout-alphabets are for --dataset omniglot, "
                f"got --dataset {self.dataset}"
            )
        if self.fresh_batch and self.bank_sharding:
            raise UsageError(
                "--fresh-batch needs the whole bank in each process: it cannot be combined with "
                "--bank-sharding (use --no-fresh-batch, or no --bank-sharding)"
            )
        if self.train_labels == "coarse" and self.holdout_classes:
            raise UsageError("--train-labels coarse and --holdout-classes cannot be combined")
        if self.train_labels == "coarse" and (self.omniglot_train or self.holdout_alphabets):
            raise UsageError(
                "--train-labels coarse cannot be combined with --omniglot-train or --holdout-alphabets"
            )
        if self.pretrained is not None:
            if not self.arch.startswith(TIMM_PREFIX):
                raise UsageError(f"--pretrained is for --arch timm:<name>, got --arch {self.arch}")
            if not Path(self.pretrained).is_file():
                raise UsageError(f"--pretrained {self.pretrained}: no such file")
        if self.tensorboard is not None:
            if Path(self.tensorboard).exists() and not Path(self.tensorboard).is_dir():
                raise UsageError(
                    f"--tensorboard {self.tensorboard} is a file: give a folder for the event files"
                )
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError as error:
                raise UsageError(
                    "--tensorboard needs the tensorboard package: pip install 'snca_ext[tensorboard]' "
                    f"({error})"
                ) from error
        if self.margin >= 2.0:
            raise UsageError(
                f"--margin is in cosine units and must be < 2 (cosines lie in [-1, 1]), got {self.margin}"
            )

    def run_dict(self) -> dict[str, Any]:
        """What defines the run, as saved in its checkpoint."""
        return {key: getattr(self, key) for key in RUN_KEYS}
