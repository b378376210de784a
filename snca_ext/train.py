"""Train an SNCA embedding and evaluate it by weighted kNN: ``python -m snca_ext.train``.

With no argument it trains a small CNN on scikit-learn's digits (embedded, no download). With
``--dataset cifar10 --data PATH`` or ``--dataset imagefolder --data PATH`` it follows the paper's
recipe for that dataset; every recipe value is a flag. The run directory (``--out``) gets
``checkpoint.pt``, ``metrics.csv``, ``curves.png`` and ``summary.json``.

Exit status: 0 done, 1 the loss diverged (NaN), 2 a bad argument, data folder or checkpoint,
130 stopped by Ctrl-C / SIGTERM / ``--stop-after-steps`` (a checkpoint to ``--resume`` from was
written), 3 another rank of a distributed run failed or timed out.

Under ``torchrun`` with several processes it trains data-parallel (DDP): ``--batch-size`` is the
global batch, split over the ranks; the bank is replicated, or with ``--bank-sharding`` split in
row blocks over the ranks (snca_ext/distributed.py). Rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import FORMAT, CheckpointError, from_original, load_checkpoint, save_checkpoint
from .data import DATASETS, DataBundle, DataError, build_data, parse_classes
from .fewshot import novel_class_evaluation
from .knn import KnnResult, compute_features, knn_evaluate
from .memory import BANK_DTYPES, MomentumSchedule
from .models import ARCHS, build_model

# The paper's recipe per dataset (the original main.py / cifar.py); digits is this package's own,
# sized to reach >= 99% kNN top-1 in under a minute on two CPU cores (99.56% in ~45 s).
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
    "knn_k": 30,
    "knn_sigma": None,  # the temperature
    "monitor_k": 1,
    "bank_dtype": "float32",
    "seed": 0,
    "backend": "auto",
    "loss": "snca",
    "holdout_classes": "",  # canonical "5,6,7,8,9"; "" trains on every class
}
# What defines a run: taken from the checkpoint on --resume unless given on the command line.
RUN_KEYS = (*RECIPES["digits"], *COMMON_DEFAULTS, "dataset", "data")
METRIC_FIELDS = ("epoch", "lr", "memory_momentum", "loss", "knn1_top1")

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
EXIT_PEER_FAILED = 3


class UsageError(ValueError):
    """A bad command-line argument combination (single arguments are checked by argparse)."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- arguments


def _number(kind, minimum=None, maximum=None, *, min_open=False, max_open=False, what=""):
    """An argparse type: ``kind`` within bounds, with an error that says what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what} (finite), got {text!r}")
        low_ok = minimum is None or (value > minimum if min_open else value >= minimum)
        high_ok = maximum is None or (value < maximum if max_open else value <= maximum)
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, 1, what="an integer >= 1")
NON_NEGATIVE_INT = _number(int, 0, what="an integer >= 0")
POSITIVE_FLOAT = _number(float, 0.0, min_open=True, what="a number > 0")
NON_NEGATIVE_FLOAT = _number(float, 0.0, what="a number >= 0")
FRACTION = _number(float, 0.0, 1.0, max_open=True, what="a number in [0, 1)")
FINITE_FLOAT = _number(float, what="a finite number")


def _schedule(text: str) -> str:
    try:
        MomentumSchedule.parse(0.5, text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _class_list(text: str) -> str:
    try:
        return ",".join(map(str, parse_classes(text)))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shot_list(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 like '1,5', got {text!r}")
    return shots


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m snca_ext.train",
        description="Train an SNCA embedding (Wu, Efros & Yu, ECCV 2018) and evaluate it by weighted "
        "kNN. With no argument: a small CNN on scikit-learn's digits. Unset recipe flags take the "
        "paper's values for the dataset (see RECIPES in snca_ext/train.py), or on --resume the "
        "checkpoint's.",
    )
    add = parser.add_argument
    add("--dataset", choices=DATASETS, help="default: digits (embedded, no download)")
    add(
        "--data",
        help="local data folder for cifar10 (holds cifar-10-batches-py/) or imagefolder (train/, val/)",
    )
    add("--arch", choices=ARCHS, help="digits: digits_cnn, cifar10: cifar_resnet18, imagefolder: resnet18")
    add("--low-dim", type=POSITIVE_INT, help="feature dimension (128)")
    add("-t", "--temperature", "--nce-t", dest="temperature", type=POSITIVE_FLOAT, help="T (0.05)")
    add("--margin", type=NON_NEGATIVE_FLOAT, help="margin in cosine units, divided by T for the loss (0)")
    add("-b", "--batch-size", type=POSITIVE_INT, help="imagefolder 256, cifar10 128")
    add("--lr", type=POSITIVE_FLOAT, help="initial learning rate (0.1)")
    add("--lr-step", type=POSITIVE_INT, help="divide the lr by 1/--lr-gamma every this many epochs")
    add("--lr-gamma", type=POSITIVE_FLOAT, help="lr decay factor (0.1)")
    add("--epochs", type=POSITIVE_INT, help="imagefolder 130, cifar10 200")
    add("--weight-decay", "--wd", dest="weight_decay", type=NON_NEGATIVE_FLOAT, help="1e-4 / 5e-4")
    add("--sgd-momentum", type=FRACTION, help="SGD momentum (0.9)")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov SGD (on)")
    add("--memory-momentum", "--nce-m", dest="memory_momentum", type=FRACTION, help="bank momentum (0.5)")
    add(
        "--memory-schedule",
        type=_schedule,
        help="bank momentum milestones 'epoch:momentum,...' (imagefolder '80:0.8,120:0.9'; '' for none)",
    )
    add("--bank-dtype", choices=tuple(BANK_DTYPES), help="bank storage (float32)")
    add("--knn-k", type=POSITIVE_INT, help="neighbours of the final kNN evaluation (30)")
    add("--knn-sigma", type=POSITIVE_FLOAT, help="kNN vote temperature (default: --temperature)")
    add("--monitor-k", type=POSITIVE_INT, help="neighbours of the per-epoch kNN monitor (1)")
    add(
        "--loss",
        choices=("snca", "softmax"),
        help="snca (default), or softmax: the baseline, a linear classifier on the embedding trained by "
        "cross-entropy, evaluated on the same normalised embedding",
    )
    add(
        "--holdout-classes",
        type=_class_list,
        metavar="C,C,...",
        help="train without these classes; the final evaluation adds kNN and N-way K-shot accuracy on "
        "them (novel classes)",
    )
    add("--fewshot-ways", type=POSITIVE_INT, default=5, help="classes per few-shot episode (5)")
    add("--fewshot-shots", type=_shot_list, default=(1, 5), help="support examples per class (1,5)")
    add("--fewshot-episodes", type=POSITIVE_INT, default=1000, help="few-shot episodes (1000)")
    add(
        "--recompute-bank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="final kNN against features recomputed over the training set (default: on after "
        "training, off with --evaluate, which then uses the checkpoint's bank)",
    )
    add("--resume", metavar="CHECKPOINT", help="continue (or with -e evaluate) from this checkpoint")
    add("-e", "--evaluate", action="store_true", help="only evaluate the --resume checkpoint by kNN")
    add(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that need unpickling (original format)",
    )
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add("-j", "--workers", type=NON_NEGATIVE_INT, help="data loader processes")
    add("--threads", type=POSITIVE_INT, help="CPU threads of torch (digits: 1; else torch's default)")
    add("--seed", type=NON_NEGATIVE_INT, help="seeds every random number generator (0)")
    add("--out", help="run directory (default: runs/<dataset>-<time>; on --resume the checkpoint's)")
    add("--backend", choices=("auto", "reference", "cpu", "cuda", "triton"), help="fused op backend (auto)")
    add(
        "--stop-after-steps",
        type=POSITIVE_INT,
        help="stop like Ctrl-C after this many steps of this invocation (for time-limited job slots)",
    )
    add(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when not a terminal)",
    )
    add(
        "--bank-sharding",
        action="store_true",
        help="under torchrun: split the memory bank in row blocks over the ranks (bank memory per "
        "rank / world size) instead of a whole copy per rank",
    )
    add(
        "--dist-timeout",
        type=POSITIVE_FLOAT,
        default=distributed.DEFAULT_TIMEOUT_S,
        help="under torchrun: seconds a collective may wait for the other ranks before the run stops "
        "with an error (a rank died or hung) (600)",
    )
    return parser


def resolve_args(args: argparse.Namespace, saved: dict[str, Any] | None) -> argparse.Namespace:
    """Fills every unset flag: from the checkpoint's run (``saved``) on resume, else the recipe."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    if saved is not None:
        base = {key: saved[key] for key in RUN_KEYS if key in saved}
    else:
        dataset = given.get("dataset", "digits")
        base = {"dataset": dataset, **RECIPES[dataset], **COMMON_DEFAULTS}
    merged = {**vars(args), **base, **given}
    resolved = argparse.Namespace(**merged)
    dataset_recipe = RECIPES[resolved.dataset]
    for key, value in {**dataset_recipe, **COMMON_DEFAULTS}.items():
        if getattr(resolved, key, None) is None and value is not None:
            setattr(resolved, key, value)
    if resolved.knn_sigma is None:
        resolved.knn_sigma = resolved.temperature
    if resolved.recompute_bank is None:
        resolved.recompute_bank = not resolved.evaluate
    _check_combinations(resolved)
    return resolved


def _check_combinations(args: argparse.Namespace) -> None:
    if args.evaluate and args.resume is None:
        raise UsageError("--evaluate needs --resume CHECKPOINT (the model to evaluate)")
    if args.dataset == "digits" and args.data is not None:
        raise UsageError(f"--data is not used by --dataset digits (embedded), got --data {args.data}")
    if args.dataset != "digits" and args.data is None:
        raise UsageError(
            f"--dataset {args.dataset} needs --data PATH (a local folder; nothing is downloaded)"
        )
    if args.margin >= 2.0:
        raise UsageError(
            f"--margin is in cosine units and must be < 2 (cosines lie in [-1, 1]), got {args.margin}"
        )


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available in this torch install / machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return device


# ----------------------------------------------------------------------------- run state


class StopSignal:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step;
    a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One run: model, bank, optimizer, schedules and the position in the run, checkpointed
    together so a resumed run continues the same curve."""

    def __init__(
        self,
        args: argparse.Namespace,
        data: DataBundle,
        device: torch.device,
        dist_env: distributed.DistEnv | None = None,
    ) -> None:
        self.args = args
        self.dist = dist_env  # None: one process
        self.is_main = dist_env is None or dist_env.is_main
        self.data = data
        self.device = device
        self.out = Path(args.out)
        # --loss softmax: a classifier over the classes present in training (all but the held-out
        # ones), so head_labels maps a class id to its output.
        seen = torch.unique(data.train_labels)
        self.head_labels = torch.full((data.num_classes,), -1, dtype=torch.long)
        self.head_labels[seen] = torch.arange(len(seen))
        self.head_labels = self.head_labels.to(device)
        head = len(seen) if args.loss == "softmax" else 0
        self.model = build_model(args.arch, args.low_dim, classes=head).to(device)
        # The forward of training goes through DDP under torchrun; checkpoints keep the bare model.
        self.net = self.model
        if dist_env is not None:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        bank_generator = torch.Generator().manual_seed(args.seed)
        self.memory = distributed.memory_bank_class(dist_env, args.bank_sharding)(
            data.train_labels,
            args.low_dim,
            temperature=args.temperature,
            momentum=args.memory_momentum,
            dtype=BANK_DTYPES[args.bank_dtype],
            device=device,
            generator=bank_generator,
        )
        self.momentum_schedule = MomentumSchedule.parse(args.memory_momentum, args.memory_schedule)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=args.lr,
            momentum=args.sgd_momentum,
            nesterov=args.nesterov and args.sgd_momentum > 0,
            weight_decay=args.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, args.lr_step, gamma=args.lr_gamma)
        # Shuffling has its own generator so that its state at the start of an epoch, saved in the
        # checkpoint, replays the epoch's order on a resume from the middle of the epoch.
        self.shuffle_generator = torch.Generator().manual_seed(args.seed + 1)
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in the current epoch
        self.epoch_start_shuffle_state = self.shuffle_generator.get_state()
        self.epoch_loss_sum = 0.0
        self.epoch_seen = 0
        self.metrics: list[dict[str, Any]] = []
        self.steps_this_run = 0

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "args": {key: getattr(self.args, key) for key in RUN_KEYS},
            "epoch": self.epoch,
            "step": self.step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_seen": self.epoch_seen,
            "model": self.model.state_dict(),
            "memory": self.memory.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # Mid-epoch: the state that replays this epoch's order; at an epoch boundary: the next's.
            "shuffle_state": self.epoch_start_shuffle_state
            if self.step
            else self.shuffle_generator.get_state(),
            "rng": rng_state(self.device),
            "metrics": self.metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.memory.load_state_dict(state["memory"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_loss_sum, self.epoch_seen = float(state["epoch_loss_sum"]), int(state["epoch_seen"])
        self.epoch_start_shuffle_state = state["shuffle_state"]
        self.shuffle_generator.set_state(self.epoch_start_shuffle_state)
        self.metrics = [dict(row) for row in state["metrics"]]
        set_rng_state(state["rng"], self.device)

    def load_original(self, state: dict[str, Any]) -> None:
        """Model, bank and epoch of an original SNCA checkpoint (optimizer when it fits)."""
        parts = from_original(state)
        try:
            self.model.load_state_dict(parts["model"])
        except RuntimeError as error:
            raise CheckpointError(
                f"the original checkpoint's weights do not fit --arch {self.args.arch} --low-dim "
                f"{self.args.low_dim}: {str(error).splitlines()[0]}"
            ) from error
        if parts["bank"] is not None:
            if tuple(parts["bank"].shape) != tuple(self.memory.bank.shape):
                raise CheckpointError(
                    f"the original checkpoint's memory has shape {tuple(parts['bank'].shape)}, but the "
                    f"training set needs {tuple(self.memory.bank.shape)}"
                )
            self.memory.fill(parts["bank"])
        elif not self.args.recompute_bank:
            raise CheckpointError(
                "the original checkpoint has no memory bank ('lemniscate'); pass --recompute-bank"
            )
        self.epoch = parts["epoch"]
        self.scheduler.last_epoch = self.epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.args.lr_gamma ** (self.epoch // self.args.lr_step)
        if parts["optimizer"] is not None:
            try:
                self.optimizer.load_state_dict(parts["optimizer"])
            except (ValueError, KeyError) as error:
                print(f"warning: the original optimizer state does not fit, starting it afresh ({error})")

    def save(self) -> None:
        path = self.out / "checkpoint.pt"
        state = self.state_dict()  # on every rank: a sharded bank is gathered collectively
        if not self.is_main:
            return
        try:
            save_checkpoint(state, path)
        except Exception as error:  # keep training: the previous checkpoint is intact
            print(
                f"warning: could not save {path} ({error}); the previous checkpoint is kept", file=sys.stderr
            )

    # ------------------------------------------------------------------ training

    def _loader(self, dataset, *, shuffle: bool, skip_batches: int = 0) -> DataLoader:
        args = self.args
        common = {
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "pin_memory": self.device.type == "cuda",
            "persistent_workers": False,
        }
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **common)
        order = torch.randperm(len(dataset), generator=self.shuffle_generator).tolist()
        if self.dist is not None:
            # The single-process order in whole global batches; rank r takes every world-th example,
            # so global batch i is the single-process batch i at any world size (and on resume).
            rest = order[skip_batches * args.batch_size :]
            rest = rest[: len(rest) - len(rest) % args.batch_size]
            sampler = DistributedSampler(rest, self.dist.world_size, self.dist.rank, shuffle=False)
            common["batch_size"] = args.batch_size // self.dist.world_size
            return DataLoader(
                Subset(dataset, rest),
                sampler=sampler,
                drop_last=True,
                generator=self.shuffle_generator,
                **common,
            )
        # drop_last: a last batch of one example would break batch norm.
        return DataLoader(
            dataset,
            sampler=order[skip_batches * args.batch_size :],
            drop_last=True,
            generator=self.shuffle_generator,
            **common,
        )

    def _loss(self, images: torch.Tensor, indices: torch.Tensor, margin_logits: float):
        """The step's features and loss: SNCA against the bank, or with --loss softmax the
        cross-entropy of the classifier head (the bank then only serves the kNN monitor)."""
        if self.args.loss == "softmax":
            features, logits = self.net(images, logits=True)
            return features, F.cross_entropy(logits, self.head_labels[self.memory.labels[indices]])
        features = self.net(images)
        return features, self.memory.loss(features, indices, margin=margin_logits, backend=self.args.backend)

    def train_epoch(self, stop: StopSignal, progress: bool) -> bool:
        """Trains the rest of the current epoch; False if it stopped early (on request)."""
        args, epoch = self.args, self.epoch
        momentum = self.momentum_schedule(epoch)
        if self.step == 0:
            self.epoch_start_shuffle_state = self.shuffle_generator.get_state()
        # else resuming mid-epoch: the generator holds the epoch's start state (load_state_dict), so
        # the epoch's order replays and the batches already done are skipped.
        loader = self._loader(self.data.train, shuffle=True, skip_batches=self.step)
        total_steps = len(self.data.train) // args.batch_size
        margin_logits = args.margin / args.temperature  # the original divides the margin by T
        self.model.train()
        started = time.perf_counter()
        images_done = 0
        bar = tqdm(
            total=total_steps,
            initial=self.step,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=None if progress else True,  # None: only on a terminal
            leave=False,
        )
        last_monitor = self.metrics[-1]["knn1_top1"] if self.metrics else float("nan")
        with bar:
            for images, _, indices in loader:
                images, indices = images.to(self.device, non_blocking=True), indices.to(self.device)
                features, loss = self._loss(images, indices, margin_logits)
                # The global batch's loss: every rank must agree to raise Diverged.
                loss_value = float(loss.detach()) if self.dist is None else distributed.global_mean(loss)
                if not math.isfinite(loss_value):
                    raise Diverged(
                        f"the loss became {loss_value} at epoch {epoch + 1}, step {self.step + 1} "
                        f"(lr {self.optimizer.param_groups[0]['lr']:g}, temperature {args.temperature:g})"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                if self.dist is None:
                    loss.backward()
                else:
                    distributed.backward(loss)
                self.optimizer.step()
                # After the step's loss, as the original (its update sits in the op's backward).
                self.memory.update(features.detach(), indices, momentum)
                self.step += 1
                self.steps_this_run += 1
                self.epoch_loss_sum += loss_value * len(indices)
                self.epoch_seen += len(indices)
                images_done += len(indices)
                rate = images_done / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.epoch_loss_sum / self.epoch_seen:.4f}",
                    img_s=f"{rate:.0f}",
                    knn1=f"{last_monitor:.2f}",
                )
                if args.stop_after_steps is not None and self.steps_this_run >= args.stop_after_steps:
                    stop.requested = True
                if self.agree_to_stop(stop) and self.step < total_steps:
                    return False
        return True

    def finish_epoch(self, progress: bool) -> dict[str, Any]:
        """kNN monitor against the bank, schedule step, metrics row, checkpoint."""
        args = self.args
        monitor = self._knn(self.memory.bank, args.monitor_k, progress)
        row = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "memory_momentum": self.momentum_schedule(self.epoch),
            "loss": self.epoch_loss_sum / max(self.epoch_seen, 1),
            "knn1_top1": monitor.top1,
        }
        self.metrics.append(row)
        self.scheduler.step()
        self.epoch += 1
        self.step, self.epoch_loss_sum, self.epoch_seen = 0, 0.0, 0
        self.save()
        if self.is_main:
            write_metrics(self.metrics, self.out / "metrics.csv")
        return row

    def final_evaluation(self, progress: bool) -> tuple[KnnResult, bool]:
        args = self.args
        bank = self.memory.bank
        if args.recompute_bank and self.dist is not None:
            sharded = isinstance(self.memory, distributed.ShardedMemoryBank)
            bank = distributed.bank_features(
                self.model,
                self.data.train_plain,
                sharded=sharded,
                batch_size=args.batch_size,
                workers=args.workers,
                device=self.device,
            )
        elif args.recompute_bank:
            plain = self._loader(self.data.train_plain, shuffle=False)
            bank = compute_features(
                self.model, plain, len(self.data.train_plain), self.device, progress=progress
            )
        result = self._knn(bank, args.knn_k, progress)
        return result, bool(args.recompute_bank)

    def _knn(self, bank: torch.Tensor, k: int, progress: bool) -> KnnResult:
        """kNN accuracy of the test set against ``bank``; under torchrun the test set is split over
        the ranks and the counts summed (``bank`` is this rank's block when the bank is sharded)."""
        args = self.args
        if self.dist is not None:
            return distributed.knn_evaluate_distributed(
                self.model,
                self.data.test,
                self.memory,
                self.data.num_classes,
                k=k,
                sigma=args.knn_sigma,
                batch_size=args.batch_size,
                workers=args.workers,
                device=self.device,
                bank=bank,
                backend=args.backend,
            )
        return knn_evaluate(
            self.model,
            self._loader(self.data.test, shuffle=False),
            bank,
            self.memory.labels,
            self.data.num_classes,
            k=k,
            sigma=args.knn_sigma,
            device=self.device,
            backend=args.backend,
            progress=progress,
        )

    def agree_to_stop(self, stop: StopSignal) -> bool:
        """Whether to stop now; under torchrun every rank stops when any was asked to."""
        if self.dist is not None:
            stop.requested = distributed.any_rank(stop.requested, self.device)
        return stop.requested


# ----------------------------------------------------------------------------- outputs


def _format(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_metrics(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row[key]) for key in METRIC_FIELDS})
    _write_text_atomic(path, buffer.getvalue())


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """``curves.png``: training loss and kNN-1 test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    loss_axes.plot(epochs, [row["loss"] for row in rows], marker=".")
    loss_axes.set(xlabel="epoch", ylabel="SNCA loss (train)", title="loss")
    accuracy_axes.plot(epochs, [row["knn1_top1"] for row in rows], marker=".", color="tab:green")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 (%)", title="kNN-1 accuracy (test vs bank)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def _load_resume(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.resume is None:
        return None
    path = Path(args.resume)
    if path.is_dir():  # a run directory
        path = path / "checkpoint.pt"
    args.resume = str(path)
    return load_checkpoint(path, trust=args.trust_checkpoint)


def run(argv: Sequence[str] | None = None) -> int:
    """The command line; under torchrun with several processes, one rank of the distributed run."""
    if not distributed.launched_distributed():
        return _run(argv, None)
    raw = build_parser().parse_args(argv)
    env = distributed.init_from_env(raw.device, raw.dist_timeout)
    try:
        # One log per job: rank 0's (errors and warnings of every rank still go to stderr).
        with contextlib.redirect_stdout(None) if not env.is_main else contextlib.nullcontext():
            status = _run(argv, env)
    except distributed.PeerFailure as error:
        distributed.exit_after_peer_failure(error, EXIT_PEER_FAILED)
    distributed.shutdown()
    return status


def _run(argv: Sequence[str] | None, env: distributed.DistEnv | None) -> int:
    wall_started = time.perf_counter()
    parser = build_parser()
    raw = parser.parse_args(argv)
    try:
        checkpoint = _load_resume(raw)
        native = checkpoint is not None and checkpoint.get("format") == FORMAT
        args = resolve_args(raw, checkpoint["args"] if native else None)
        if args.out is None:
            if args.resume is not None and not args.evaluate:
                args.out = str(Path(args.resume).parent)
            else:
                args.out = str(Path("runs") / f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if env is not None:  # the ranks' clocks may straddle a second
            args.out = distributed.broadcast_object(args.out)
        device = resolve_device(args.device) if env is None else env.device
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        seed_everything(args.seed)
        data = build_data(args.dataset, args.data)
        data, novel = _holdout(data, args.holdout_classes)
        if args.batch_size > len(data.train):
            raise UsageError(
                f"--batch-size must be at most the training set size {len(data.train)} (the last "
                f"incomplete batch is dropped), got {args.batch_size}"
            )
        if env is not None and args.batch_size % env.world_size:
            raise UsageError(
                f"--batch-size (the global batch) must be a multiple of the {env.world_size} ranks, "
                f"got {args.batch_size}"
            )
        if args.bank_sharding and env is None:
            raise UsageError("--bank-sharding needs a distributed run: torchrun --nproc_per_node N ...")
        trainer = Trainer(args, data, device, env)
        if checkpoint is not None:
            if native:
                trainer.load_state_dict(checkpoint)
            else:
                trainer.load_original(checkpoint)
    except (UsageError, DataError, CheckpointError) as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    progress = not args.no_progress
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = True

    if args.evaluate:
        result, recomputed = trainer.final_evaluation(progress)
        print(_summary_line(args, result, recomputed, trainer.epoch))
        if novel is not None:
            _novel_evaluation(trainer, novel, progress)
        return EXIT_OK

    if trainer.is_main:
        trainer.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = trainer.out / "checkpoint.pt"
    print(
        f"run {trainer.out}: {args.dataset}, {args.arch}, N={len(data.train)} train / {len(data.test)} test, "
        f"T={args.temperature}, batch {args.batch_size}, lr {args.lr}, {args.epochs} epochs, {device}"
    )
    status = EXIT_OK
    train_started = time.perf_counter()
    try:
        with StopSignal() as stop:
            while trainer.epoch < args.epochs:
                epoch_started = time.perf_counter()
                if not trainer.train_epoch(stop, progress):
                    trainer.save()
                    print(
                        f"stopped in epoch {trainer.epoch + 1} after step {trainer.step}; checkpoint "
                        f"saved: continue with --resume {trainer.out / 'checkpoint.pt'}"
                    )
                    status = EXIT_STOPPED
                    break
                row = trainer.finish_epoch(progress)
                seconds = time.perf_counter() - epoch_started
                print(
                    f"epoch {row['epoch']}/{args.epochs}  loss {row['loss']:.4f}  "
                    f"kNN-{args.monitor_k} {row['knn1_top1']:.2f}%  lr {row['lr']:g}  {seconds:.1f} s",
                    flush=True,
                )
                if trainer.agree_to_stop(stop) and trainer.epoch < args.epochs:
                    print(f"stopped after epoch {trainer.epoch}: continue with --resume {checkpoint_path}")
                    status = EXIT_STOPPED
                    break
    except Diverged as error:
        print(
            f"error: {error}. Training stopped; the last good checkpoint is kept at "
            f"{trainer.out / 'checkpoint.pt'} (end of epoch {trainer.epoch}). Try a lower --lr or a "
            f"higher --temperature.",
            file=sys.stderr,
        )
        status = EXIT_DIVERGED
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C; the last saved checkpoint is kept", file=sys.stderr)
        status = EXIT_STOPPED
    train_seconds = time.perf_counter() - train_started
    if trainer.metrics and trainer.is_main:
        plot_curves(trainer.metrics, trainer.out / "curves.png", f"SNCA {args.dataset} {args.arch}")
    if status != EXIT_OK:
        return status

    result, recomputed = trainer.final_evaluation(progress)
    summary = {
        "dataset": args.dataset,
        "arch": args.arch,
        "epochs": trainer.epoch,
        "knn_k": args.knn_k,
        "knn_sigma": args.knn_sigma,
        "recomputed_bank": recomputed,
        "top1": result.top1,
        "top5": result.top5,
        "test_examples": result.count,
        "train_seconds_this_invocation": round(train_seconds, 2),
        "wall_seconds_this_invocation": round(time.perf_counter() - wall_started, 2),
    }
    print(_summary_line(args, result, recomputed, trainer.epoch))
    summary["loss"] = args.loss
    if novel is not None:
        summary["novel_classes"] = _novel_evaluation(trainer, novel, progress)
    if trainer.is_main:
        _write_text_atomic(trainer.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"wall time {summary['wall_seconds_this_invocation']:.1f} s; files in {trainer.out}")
    return EXIT_OK


def _holdout(data: DataBundle, holdout_classes: str) -> tuple[DataBundle, DataBundle | None]:
    """``(data to train on, novel-class data or None)`` for ``--holdout-classes``."""
    holdout = parse_classes(holdout_classes)
    if not holdout:
        return data, None
    if max(holdout) >= data.num_classes or data.num_classes - len(holdout) < 2 or len(holdout) < 2:
        raise UsageError(
            f"--holdout-classes must name at least 2 of the {data.num_classes} class ids 0..."
            f"{data.num_classes - 1} and leave at least 2 to train on, got {holdout_classes}"
        )
    return data.split_holdout(holdout)


def _novel_evaluation(trainer: Trainer, novel: DataBundle, progress: bool) -> dict[str, Any]:
    args = trainer.args
    report = novel_class_evaluation(
        trainer.model,
        novel,
        k=args.knn_k,
        sigma=args.knn_sigma,
        device=trainer.device,
        batch_size=args.batch_size,
        ways=args.fewshot_ways,
        shots=args.fewshot_shots,
        episodes=args.fewshot_episodes,
        seed=args.seed,
        backend=args.backend,
        progress=progress,
    )
    print(
        f"novel classes {report['classes']} (never trained on): kNN (K={args.knn_k}) on "
        f"{report['test_examples']} test images against a bank of their {report['bank_size']} "
        f"training images: top-1 {report['knn_top1']:.2f}%"
    )
    for row in report["fewshot"]:
        print(
            f"novel classes {row['ways']}-way {row['shots']}-shot ({row['episodes']} episodes, "
            f"nearest class mean): {row['mean']:.2f}% ± {row['ci95']:.2f} (95% interval)"
        )
    return report


def _summary_line(args: argparse.Namespace, result: KnnResult, recomputed: bool, epochs: int) -> str:
    bank = "bank recomputed from the network" if recomputed else "memory bank"
    return (
        f"kNN (K={args.knn_k}, sigma={args.knn_sigma:g}, {bank}) after {epochs} epochs on "
        f"{result.count} test examples: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%"
    )


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
