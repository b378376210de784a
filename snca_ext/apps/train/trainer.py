"""One training run: the model, the memory bank, the optimizer, the schedules and the position in
the run, checkpointed together so that a resumed run continues the same curve. The same code runs
one process or many (DDP under torchrun): a single process is the world of size one."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from snca_ext import KnnResult, MomentumSchedule, distributed
from snca_ext.memory import BANK_DTYPES

from ..checkpoints import FORMAT, load_original, save_checkpoint
from ..data import DataBundle
from ..errors import CheckpointError, error_text
from ..models import build_model
from .config import RunConfig
from .evaluation import bank_features, classifier_accuracy, knn_evaluate
from .outputs import write_metrics
from .sampler import EpochSampler
from .signals import StopSignal

log = logging.getLogger(__name__)

# --amp: the dtype the network's forward runs in under torch.autocast (None: no autocast).
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class SaveFailed(RuntimeError):
    """Two checkpoint saves in a row failed (a full or read-only disk does not heal itself)."""


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
    """Builds the run from its configuration, trains it epoch by epoch, and saves and restores
    its whole state. ``model`` is the bare network (what checkpoints hold); ``net`` is what the
    forward of training goes through (DDP with more than one process)."""

    def __init__(self, config: RunConfig, data: DataBundle, env: distributed.DistEnv) -> None:
        self.config = config
        self.env = env
        self.data = data
        self.device = env.device
        self.out = Path(config.out)
        # --loss softmax / cosine-softmax: a classifier over the classes present in training (all
        # but the held-out ones), so head_labels maps a class id to its output.
        seen = torch.unique(data.train_labels)
        head_labels = torch.full((data.num_classes,), -1, dtype=torch.long)
        head_labels[seen] = torch.arange(len(seen))
        self.head_labels = head_labels.to(self.device)
        head = len(seen) if config.loss != "snca" else 0
        self.model = build_model(
            config.arch,
            config.low_dim,
            classes=head,
            in_channels=data.channels,
            weights=config.pretrained,
            cosine_temperature=config.temperature if config.loss == "cosine-softmax" else None,
        ).to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.net = self.model
        if env.world_size > 1:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        # The training forward; checkpoints keep saving the bare model's parameter names.
        self.forward = torch.compile(self.net) if config.compile else self.net
        self.amp_dtype = AMP_DTYPES[config.amp]
        # fp16 needs its gradients scaled (its range is narrow); with bf16 or none this is a no-op.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.memory = distributed.memory_bank_class(env, config.bank_sharding)(
            data.train_labels,
            config.low_dim,
            temperature=config.temperature,
            momentum=config.memory_momentum,
            dtype=BANK_DTYPES[config.bank_dtype],
            device=self.device,
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.momentum_schedule = MomentumSchedule.parse(config.memory_momentum, config.memory_schedule)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.sgd_momentum,
            nesterov=config.nesterov and config.sgd_momentum > 0,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, config.lr_step, gamma=config.lr_gamma
        )
        # Shuffling has its own generator so that its state at the start of an epoch, saved in the
        # checkpoint, replays the epoch's order on a resume from the middle of the epoch.
        self.shuffle_generator = torch.Generator().manual_seed(config.seed + 1)
        # A step is --iter-size micro-batches of --batch-size (each split over the processes).
        self.sampler = EpochSampler(
            len(data.train),
            config.batch_size * config.iter_size,
            self.shuffle_generator,
            rank=env.rank,
            world_size=env.world_size,
        )
        self.loader = DataLoader(
            data.train,
            batch_size=config.batch_size // env.world_size,
            sampler=self.sampler,
            num_workers=config.workers,
            pin_memory=self.device.type == "cuda",
            # Seeds the workers from the run's generator, so a resumed epoch augments the same way.
            generator=self.shuffle_generator,
        )
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in the current epoch
        self.epoch_start_shuffle_state = self.shuffle_generator.get_state()
        self.epoch_loss_sum = 0.0
        self.epoch_seen = 0
        self.metrics: list[dict[str, Any]] = []
        self.steps_this_run = 0
        self.save_failures = 0  # consecutive failed saves
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the last save that worked
        self.tensorboard = None  # --tensorboard: rank 0's writer
        if config.tensorboard is not None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(config.tensorboard)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def loader_options(self) -> dict[str, Any]:
        """How evaluation runs the network over a data set."""
        return {"batch_size": self.config.batch_size, "workers": self.config.workers}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "args": self.config.run_dict(),
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
        try:
            self.model.load_state_dict(state["model"])
            self.memory.load_state_dict(state["memory"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"the checkpoint does not fit this run (--arch {self.config.arch}, --low-dim "
                f"{self.config.low_dim}, {len(self.data.train)} training examples): {error_text(error)}"
            ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_loss_sum, self.epoch_seen = float(state["epoch_loss_sum"]), int(state["epoch_seen"])
        self.epoch_start_shuffle_state = state["shuffle_state"]
        self.shuffle_generator.set_state(self.epoch_start_shuffle_state)
        self.metrics = [dict(row) for row in state["metrics"]]
        set_rng_state(state["rng"], self.device)

    def load_original(self, state: dict[str, Any]) -> None:
        """Model, bank, optimizer, epoch and lr of an original SNCA checkpoint."""
        self.epoch = load_original(
            state,
            model=self.model,
            memory=self.memory,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            recompute_bank=bool(self.config.recompute_bank),
        )

    def save(self) -> bool:
        """Saves the checkpoint (atomically: a failed save keeps the previous one); True if it was
        written. A failure is reported; a second one in a row raises ``SaveFailed``. Every process
        learns the outcome, so they stop together."""
        path = self.out / "checkpoint.pt"
        state = self.state_dict()  # on every process: a sharded bank is gathered collectively
        error = None
        if self.is_main:
            try:
                save_checkpoint(state, path)
            except Exception as failure:
                error = failure
                log.warning(f"warning: could not save {path} ({error}); {self.on_disk()}")
        if distributed.any_rank(error is not None, self.device):
            self.save_failures += 1
            if self.save_failures >= 2:
                raise SaveFailed(f"two checkpoint saves in a row failed ({error}); {self.on_disk()}")
            return False
        self.save_failures = 0
        self.saved_at = (self.epoch, self.step)
        return True

    def on_disk(self) -> str:
        """What the checkpoint file on disk holds, for messages."""
        path = self.out / "checkpoint.pt"
        if self.saved_at is None:
            return (
                f"{path} holds what it held before this run" if path.is_file() else "no checkpoint was saved"
            )
        epoch, step = self.saved_at
        where = f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1} step {step}"
        return f"{path} holds the run at {where}"

    # ------------------------------------------------------------------ training

    def step_loss(self, images: torch.Tensor, indices: torch.Tensor, margin_logits: float):
        """The step's features and loss: SNCA against the bank, or with --loss softmax or
        cosine-softmax the cross-entropy of the classifier head (the bank then only serves the kNN
        monitor)."""
        if self.config.loss != "snca":
            features, logits = self.forward(images, logits=True)
            return features, F.cross_entropy(logits, self.head_labels[self.memory.labels[indices]])
        features = self.forward(images)
        return features, self.memory.loss(
            features,
            indices,
            margin=margin_logits,
            backend=self.config.backend,
            fresh_rows=self.config.fresh_batch,
        )

    def train_epoch(self, stop: StopSignal, progress: bool) -> bool:
        """Trains the rest of the current epoch; False if it stopped early (on request)."""
        from tqdm.auto import tqdm

        config, epoch = self.config, self.epoch
        momentum = self.momentum_schedule(epoch)
        if self.step == 0:
            self.epoch_start_shuffle_state = self.shuffle_generator.get_state()
        # else resuming mid-epoch: the generator holds the epoch's start state (load_state_dict), so
        # the epoch's order replays and the batches already done are skipped.
        self.sampler.begin_epoch(skip_batches=self.step)
        total_steps = self.sampler.batches_per_epoch
        margin_logits = self.margin_logits
        self.model.train()
        started = time.perf_counter()
        images_done = 0
        bar = tqdm(
            total=total_steps,
            initial=self.step,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=None if progress else True,  # None: only on a terminal
            leave=False,
        )
        last_monitor = self.metrics[-1]["knn1_top1"] if self.metrics else float("nan")
        micro_batches = iter(self.loader)
        with bar:
            for _ in range(self.step, total_steps):
                batches = [next(micro_batches) for _ in range(config.iter_size)]
                seen, loss_sum = self.train_step(
                    [(images, indices) for images, _, indices in batches], momentum, margin_logits
                )
                self.step += 1
                self.steps_this_run += 1
                self.epoch_loss_sum += loss_sum
                self.epoch_seen += seen
                if self.tensorboard is not None:
                    global_step = self.epoch * total_steps + self.step
                    self.tensorboard.add_scalar("train/loss", loss_sum / seen, global_step)
                images_done += seen
                rate = images_done / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.epoch_loss_sum / self.epoch_seen:.4f}",
                    img_s=f"{rate:.0f}",
                    knn1=f"{last_monitor:.2f}",
                )
                if config.stop_after_steps is not None and self.steps_this_run >= config.stop_after_steps:
                    stop.requested = True
                if self.agree_to_stop(stop) and self.step < total_steps:
                    return False
        return True

    @property
    def margin_logits(self) -> float:
        """--margin (cosine units) in the op's logit units: divided by T, as the original does."""
        return self.config.margin / self.config.temperature

    def train_step(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], momentum: float, margin_logits: float
    ) -> tuple[int, float]:
        """One optimizer step over ``micro_batches`` of ``(images, indices)`` (``--iter-size`` of
        them): each one's loss against the bank as it was before the step, gradients accumulated
        as for the mean over all of them, then one momentum update of the bank with all their
        features, so the step equals one batch of ``iter_size`` x B. Returns the examples seen and
        the sum of their losses."""
        self.optimizer.zero_grad(set_to_none=True)
        features, rows = [], []
        seen, loss_sum = 0, 0.0
        for position, (images, indices) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            indices = indices.to(self.device)
            last = position == len(micro_batches) - 1
            # DDP all-reduces the gradients at the last micro-batch only.
            with contextlib.nullcontext() if last or self.net is self.model else self.net.no_sync():
                with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
                    batch_features, loss = self.step_loss(images, indices, margin_logits)
                # The global batch's loss: every process must agree to raise Diverged.
                loss_value = distributed.global_mean(loss)
                if not math.isfinite(loss_value):
                    raise Diverged(
                        f"the loss became {loss_value} at epoch {self.epoch + 1}, step {self.step + 1} "
                        f"(lr {self.optimizer.param_groups[0]['lr']:g}, temperature "
                        f"{self.config.temperature:g})"
                    )
                distributed.backward(self.grad_scaler.scale(loss / len(micro_batches)))
            features.append(batch_features.detach().float())
            rows.append(indices)
            seen += len(indices)
            loss_sum += loss_value * len(indices)
        self.grad_scaler.step(self.optimizer)  # optimizer.step(), skipped if fp16 overflowed
        self.grad_scaler.update()
        # After the step's loss, as the original (its update sits in the op's backward).
        self.memory.update(torch.cat(features), torch.cat(rows), momentum)
        return seen, loss_sum

    def finish_epoch(self, progress: bool) -> dict[str, Any]:
        """kNN monitor against the bank, schedule step, metrics row, checkpoint."""
        monitor = self.knn(self.memory.bank, self.config.monitor_k, progress)
        row = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "memory_momentum": self.momentum_schedule(self.epoch),
            "loss": self.epoch_loss_sum / max(self.epoch_seen, 1),
            "knn1_top1": monitor.top1,
        }
        self.metrics.append(row)
        if self.tensorboard is not None:
            for name in ("loss", "knn1_top1", "lr", "memory_momentum"):
                self.tensorboard.add_scalar(f"epoch/{name}", row[name], row["epoch"])
            self.tensorboard.flush()
        self.scheduler.step()
        self.epoch += 1
        self.step, self.epoch_loss_sum, self.epoch_seen = 0, 0.0, 0
        if self.save() and self.is_main:
            write_metrics(self.metrics, self.out / "metrics.csv")
        return row

    def bank(self, progress: bool, *, recompute: bool) -> torch.Tensor:
        """The memory bank (the original's evaluation protocol, its ``recompute_memory=0``) or,
        with ``recompute``, the training set's features recomputed by the network (this process's
        block when the bank is sharded)."""
        if not recompute:
            return self.memory.bank
        return bank_features(
            self.model,
            self.data.train_plain,
            sharded=isinstance(self.memory, distributed.ShardedMemoryBank),
            dim=self.config.low_dim,
            device=self.device,
            progress=progress,
            **self.loader_options,
        )

    def knn(
        self,
        bank: torch.Tensor,
        k: int,
        progress: bool,
        *,
        test: DataBundle | None = None,
    ) -> KnnResult:
        """kNN accuracy of ``test``'s test set (default: the run's) against ``bank``, the bank's
        rows voting with ``test``'s training labels (e.g. fine labels of a bank trained on coarse
        ones)."""
        test = self.data if test is None else test
        return knn_evaluate(
            self.model,
            test.test,
            self.memory,
            test.num_classes,
            k=k,
            sigma=self.config.knn_sigma,
            device=self.device,
            bank=bank,
            bank_labels=None if test is self.data else test.train_labels.to(self.device),
            backend=self.config.backend,
            progress=progress,
            **self.loader_options,
        )

    def head_accuracy(self) -> KnnResult:
        """Top-1 / top-5 of the classifier head (``--loss softmax`` or ``cosine-softmax``) on the
        test set."""
        return classifier_accuracy(
            self.model, self.data.test, self.head_labels, device=self.device, **self.loader_options
        )

    def agree_to_stop(self, stop: StopSignal) -> bool:
        """Whether to stop now; every process stops when any was asked to."""
        stop.requested = distributed.any_rank(stop.requested, self.device)
        return stop.requested
