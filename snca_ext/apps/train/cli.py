"""Train an SNCA embedding and evaluate it by weighted kNN: ``python -m snca_ext.train``.

With no argument it trains a small CNN on scikit-learn's digits (embedded, no download). With
``--dataset cifar10 --data PATH`` or ``--dataset imagefolder --data PATH`` it follows the paper's
recipe for that dataset; every recipe value is a flag. ``--dataset omniglot --data DIR
--omniglot-train small1`` trains on one of Omniglot's splits and evaluates one-shot episodes within
each alphabet the training did not see. The run directory (``--out``) gets
``checkpoint.pt``, ``metrics.csv``, ``curves.png`` and ``summary.json``.

Exit status: 0 done, 1 the loss diverged (NaN), 2 a bad argument, data folder, checkpoint or
``--out`` folder, 130 stopped by Ctrl-C / SIGTERM / ``--stop-after-steps`` (a checkpoint to
``--resume`` from was written; 0 under torchrun, which reports any other exit of a worker as a
crash), 3 another rank of a distributed run failed or timed out, 4 the checkpoint could not be
saved (twice in a row, or the last save of the run).

Under ``torchrun`` with several processes it trains data-parallel (DDP): ``--batch-size`` is the
global batch, split over the ranks; the bank is replicated, or with ``--bank-sharding`` split in
row blocks over the ranks (``snca_ext.distributed``). Rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from snca_ext import distributed
from snca_ext.memory import BANK_DTYPES

from ..arguments import (
    FRACTION,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    arch_type,
    class_list_type,
    configure_logging,
    int_list_type,
    program_name,
    report,
    resolve_device,
    set_threads,
    writable_folder,
)
from ..checkpoints import FORMAT, from_original, load_checkpoint, original_run
from ..data import DATASETS, WITHIN_GROUPS, DataBundle, held_out_classes, run_data
from ..data.imagefolder import BadImageError
from ..data.omniglot import SPLITS as OMNIGLOT_SPLITS
from ..data.omniglot import parse_names
from ..errors import EXIT_USAGE, AppError, UsageError
from ..models import ARCHS
from .config import RunConfig
from .evaluation import novel_class_evaluation
from .outputs import plot_curves, summary_line, write_summary
from .signals import StopSignal
from .trainer import Diverged, SaveFailed, Trainer, seed_everything

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED, EXIT_STOPPED, EXIT_PEER_FAILED, EXIT_SAVE_FAILED = 0, 1, 130, 3, 4
__all__ = [
    "EXIT_DIVERGED",
    "EXIT_OK",
    "EXIT_PEER_FAILED",
    "EXIT_SAVE_FAILED",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "main",
    "run",
]


def _omniglot_splits(text: str) -> str:
    """argparse type of --omniglot-train: known split names, canonical (``SPLITS`` order)."""
    names = parse_names(text)
    unknown = [name for name in names if name not in OMNIGLOT_SPLITS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated Omniglot splits among {', '.join(OMNIGLOT_SPLITS)}, got {text!r}"
        )
    return ",".join(name for name in OMNIGLOT_SPLITS if name in names)


def _alphabets(text: str) -> str:
    """argparse type of --holdout-alphabets: names, canonical (sorted, unique)."""
    names = sorted(parse_names(text))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated alphabet names, got {text!r}")
    return ",".join(names)


def _schedule(text: str) -> str:
    from snca_ext import MomentumSchedule

    try:
        MomentumSchedule.parse(0.5, text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.train"),
        description="Train an SNCA embedding (Wu, Efros & Yu, ECCV 2018) and evaluate it by weighted "
        "kNN. With no argument: a small CNN on scikit-learn's digits. Unset recipe flags take the "
        "paper's values for the dataset (snca_ext/apps/train/config.py), or on --resume the "
        "checkpoint's.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="default: digits (embedded, no download)")
    data.add_argument(
        "--data",
        help="local data folder: cifar10 (holds cifar-10-batches-py/), imagefolder (train/, val/), "
        "fashion-mnist (the four IDX files; default /usr/share/datasets/fashion-mnist), omniglot (its "
        "zips or their folders: images_background_small1.zip, ..., images_evaluation.zip)",
    )
    data.add_argument("-j", "--workers", type=NON_NEGATIVE_INT, help="data loader processes")
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="imagefolder: leave out the files that are not readable images or are decompression bombs "
        "(every header is checked before training; by default such a file stops the run, named)",
    )
    data.add_argument(
        "--train-labels",
        choices=("fine", "coarse"),
        help="coarse: train on the coarse classes (cifar100's 20 superclasses, fashion-mnist's 4 groups, "
        "omniglot's alphabets) "
        "and also evaluate kNN with the fine ones (sub-category discovery) (fine)",
    )
    data.add_argument(
        "--train-limit", type=POSITIVE_INT, metavar="N", help="train on the first N training examples only"
    )
    data.add_argument(
        "--test-limit", type=POSITIVE_INT, metavar="N", help="evaluate on the first N test examples only"
    )
    data.add_argument(
        "--holdout-classes",
        type=class_list_type,
        metavar="C,C,...",
        help="train without these classes; the final evaluation adds kNN and N-way K-shot accuracy on "
        "them (novel classes)",
    )

    data.add_argument(
        "--omniglot-train",
        type=_omniglot_splits,
        metavar="SPLIT,...",
        help=f"omniglot: train on the characters of these splits ({', '.join(OMNIGLOT_SPLITS)}; default: "
        "every split found in --data); every other character is a novel class, e.g. small1 leaves "
        "small2's Japanese_(katakana), Sanskrit and Tagalog novel",
    )
    data.add_argument(
        "--holdout-alphabets",
        type=_alphabets,
        metavar="NAME,...",
        help="omniglot: train without these alphabets (their folder names, e.g. Sanskrit,Tagalog); "
        "they join the novel classes",
    )

    model = parser.add_argument_group("model and loss")
    model.add_argument(
        "--arch",
        type=arch_type,
        metavar="ARCH",
        help=f"{', '.join(ARCHS)}, or timm:<name> for any timm model (pip install 'snca_ext[timm]'); "
        "digits: digits_cnn, cifar10: cifar_resnet18, imagefolder: resnet18",
    )
    model.add_argument(
        "--pretrained",
        metavar="PATH",
        help="timm:<name> only: start the backbone from this local weights file (.safetensors, .pth), "
        "read by timm's loader without unpickling; nothing is downloaded",
    )
    model.add_argument("--low-dim", type=POSITIVE_INT, help="feature dimension (128)")
    model.add_argument(
        "--loss",
        choices=("snca", "softmax"),
        help="snca (default), or softmax: the baseline, a linear classifier on the embedding trained by "
        "cross-entropy, evaluated on the same normalised embedding",
    )
    model.add_argument("-t", "--temperature", "--nce-t", dest="temperature", type=POSITIVE_FLOAT, help="T")
    model.add_argument(
        "--margin", type=NON_NEGATIVE_FLOAT, help="margin in cosine units, divided by T for the loss (0)"
    )
    model.add_argument(
        "--backend", choices=("auto", "reference", "cpu", "cuda", "triton"), help="fused op backend (auto)"
    )
    model.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        help="mixed precision: the network's forward under torch.autocast in this dtype (fp16 with a "
        "gradient scaler); the loss accumulates in float32 (none)",
    )
    model.add_argument(
        "--channels-last", action="store_true", help="the network and its inputs in channels-last memory"
    )
    model.add_argument("--compile", action="store_true", help="torch.compile the network's training forward")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("-b", "--batch-size", type=POSITIVE_INT, help="the global batch")
    optim.add_argument(
        "--iter-size",
        type=POSITIVE_INT,
        help="accumulate this many batches per optimizer step (and bank update): a step equals one "
        "batch of iter-size x batch-size, e.g. -b 128 --iter-size 2 for deep networks on small GPUs (1)",
    )
    optim.add_argument("--lr", type=POSITIVE_FLOAT, help="initial learning rate (0.1)")
    optim.add_argument(
        "--lr-step", type=POSITIVE_INT, help="multiply the lr by --lr-gamma every this many epochs"
    )
    optim.add_argument("--lr-gamma", type=POSITIVE_FLOAT, help="lr decay factor (0.1)")
    optim.add_argument("--epochs", type=POSITIVE_INT, help="imagefolder 130, cifar10 200, digits 25")
    optim.add_argument("--weight-decay", "--wd", dest="weight_decay", type=NON_NEGATIVE_FLOAT)
    optim.add_argument("--sgd-momentum", type=FRACTION, help="SGD momentum (0.9)")
    optim.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov SGD (on)"
    )
    optim.add_argument("--seed", type=NON_NEGATIVE_INT, help="seeds every random number generator (0)")

    bank = parser.add_argument_group("memory bank")
    bank.add_argument(
        "--memory-momentum", "--nce-m", dest="memory_momentum", type=FRACTION, help="bank momentum (0.5)"
    )
    bank.add_argument(
        "--memory-schedule",
        type=_schedule,
        help="bank momentum milestones 'epoch:momentum,...' (imagefolder '80:0.8,120:0.9'; '' for none)",
    )
    bank.add_argument("--bank-dtype", choices=tuple(BANK_DTYPES), help="bank storage (float32)")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--knn-k", type=POSITIVE_INT, help="neighbours of the final kNN evaluation (30)")
    evaluation.add_argument(
        "--knn-sigma", type=POSITIVE_FLOAT, help="kNN vote temperature (default: --temperature)"
    )
    evaluation.add_argument(
        "--monitor-k", type=POSITIVE_INT, help="neighbours of the per-epoch kNN monitor (1)"
    )
    evaluation.add_argument(
        "--recompute-bank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="final kNN against features recomputed over the training set (default: on after "
        "training, off with --evaluate, which then uses the checkpoint's bank)",
    )
    evaluation.add_argument(
        "--fewshot-ways",
        type=int_list_type(minimum=2, what="classes per episode", example="20,5"),
        help="novel classes per few-shot episode, comma-separated (5; omniglot: 20,5, each episode's "
        "classes from one alphabet)",
    )
    evaluation.add_argument(
        "--fewshot-shots",
        type=int_list_type(minimum=1, what="shot counts", example="1,5"),
        default=(1, 5),
        help="support examples per class (1,5)",
    )
    evaluation.add_argument("--fewshot-episodes", type=POSITIVE_INT, default=1000, help="episodes (1000)")

    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--out", help="run directory (default: runs/<dataset>-<time>; on --resume the checkpoint's)"
    )
    run_group.add_argument(
        "--resume", metavar="CHECKPOINT", help="continue (or with -e evaluate) from this checkpoint"
    )
    run_group.add_argument(
        "-e", "--evaluate", action="store_true", help="only evaluate the --resume checkpoint by kNN"
    )
    run_group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that need unpickling (original format): unpickling can run code",
    )
    run_group.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."
    )
    run_group.add_argument("--threads", type=POSITIVE_INT, help="CPU threads of torch (digits: 1)")
    run_group.add_argument(
        "--stop-after-steps",
        type=POSITIVE_INT,
        help="stop like Ctrl-C after this many steps of this invocation (for time-limited job slots)",
    )
    run_group.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard scalars to DIR: the loss of every step; per epoch its mean loss, "
        "the kNN monitor, lr and memory momentum (pip install 'snca_ext[tensorboard]')",
    )
    run_group.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when not a terminal)",
    )

    dist_group = parser.add_argument_group("distributed (under torchrun)")
    dist_group.add_argument(
        "--bank-sharding",
        action="store_true",
        help="split the memory bank in row blocks over the ranks (bank memory per rank / world size) "
        "instead of a whole copy per rank",
    )
    dist_group.add_argument(
        "--dist-timeout",
        type=POSITIVE_FLOAT,
        default=distributed.DEFAULT_TIMEOUT_S,
        help="seconds a collective may wait for the other ranks before the run stops with an error "
        "(a rank died or hung) (600)",
    )
    return parser


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
        configure_logging()
        return _run(argv, None)
    raw = build_parser().parse_args(argv)
    env = distributed.init_from_env(raw.device, raw.dist_timeout)
    configure_logging(env.is_main)
    try:
        # One log per job: rank 0's (errors and warnings of every rank still go to stderr).
        with contextlib.redirect_stdout(None) if not env.is_main else contextlib.nullcontext():
            status = _run(argv, env)
    except distributed.PeerFailure as error:
        distributed.exit_after_peer_failure(error, EXIT_PEER_FAILED)
    distributed.shutdown()
    return status


# What the original scripts train, for messages.
_ORIGINAL_DATA = {
    "imagefolder": "an ImageNet-style folder (train/<class>/, val/<class>/)",
    "cifar10": "CIFAR-10 (a folder holding cifar-10-batches-py/)",
}


def _original_run(raw: argparse.Namespace, parts: dict[str, Any]) -> dict[str, Any]:
    """The run an original checkpoint implies: its arch, low-dim and memory (T, momentum), unless
    a flag says otherwise, and the data set its arch implies, unless ``--dataset`` names another.
    Prints what it took and what the flags override."""
    run = original_run(parts, raw.arch)
    if raw.dataset is None and raw.data is None and run["dataset"] in _ORIGINAL_DATA:
        raise UsageError(
            f"--resume {raw.resume} is an original {parts['script']} checkpoint of a {run['arch']}, "
            f"trained on {_ORIGINAL_DATA[run['dataset']]}: pass --data PATH (or --dataset and --data "
            f"for another data set)"
        )
    labels = {
        "arch": ("--arch", "arch"),
        "low_dim": ("--low-dim", "low-dim"),
        "temperature": ("--temperature", "T"),
        "memory_momentum": ("--memory-momentum", "memory momentum"),
    }
    taken, overridden = [], []
    for key, (flag, name) in labels.items():
        if key not in run:
            continue
        given = getattr(raw, key)
        if given is None or given == run[key]:
            taken.append(f"{name} {run[key]:g}" if isinstance(run[key], float) else f"{name} {run[key]}")
        else:
            overridden.append(f"{flag} {given} (the checkpoint's: {run[key]})")
    if raw.dataset is None:
        taken.append(f"data set {run['dataset']} (its arch's)")
    epochs = f"{parts['epoch']} epochs done"
    if parts["script"] == "cifar.py":
        epochs += f" (saved after its 0-based epoch {parts['epoch'] - 1})"
    if parts["accuracy"] is not None:
        epochs += f", recorded accuracy {parts['accuracy']:.4f}"
    log.info(
        f"--resume {raw.resume}: an original {parts['script']} checkpoint, {epochs}; from it: "
        f"{', '.join(taken)}" + (f"; the flags override {', '.join(overridden)}" if overridden else "")
    )
    return run


def _prepare(
    raw: argparse.Namespace, env: distributed.DistEnv | None
) -> tuple[RunConfig, DataBundle, DataBundle | None, DataBundle | None, Trainer]:
    """The configuration, the data (and the novel classes' with ``--holdout-classes``, the
    fine-labelled data with ``--train-labels coarse``) and the trainer (restored from
    ``--resume``)."""
    checkpoint = _load_resume(raw)
    native = checkpoint is not None and checkpoint.get("format") == FORMAT
    saved = checkpoint["args"] if native else None
    if checkpoint is not None and not native:
        saved = _original_run(raw, from_original(checkpoint))
    config = RunConfig.resolve(raw, saved)
    if config.out is None:
        if config.resume is not None and not config.evaluate:
            config.out = str(Path(config.resume).parent)
        else:
            config.out = str(Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if env is None:
        if config.bank_sharding:
            raise UsageError("--bank-sharding needs a distributed run: torchrun --nproc_per_node N ...")
        env = distributed.DistEnv.single(resolve_device(config.device))
    config.out = distributed.broadcast_object(config.out)  # the ranks' clocks may straddle a second
    set_threads(config.threads)
    seed_everything(config.seed)
    data = run_data(config.run_dict(), skip_bad_images=bool(config.skip_bad_images)).limit(
        config.train_limit, config.test_limit
    )
    fine = None
    if config.train_labels == "coarse":
        fine, data = data, data.coarse()
    data, novel = _holdout(data, config.holdout_classes)
    if not config.evaluate and config.batch_size * config.iter_size > len(data.train):
        raise UsageError(
            f"--batch-size x --iter-size must be at most the training set size {len(data.train)} (the "
            f"last incomplete step is dropped), got {config.batch_size} x {config.iter_size}"
        )
    if config.batch_size % env.world_size:
        raise UsageError(
            f"--batch-size (the global batch) must be a multiple of the {env.world_size} ranks, "
            f"got {config.batch_size}"
        )
    if not config.evaluate and env.is_main:
        prepare_out(Path(config.out))
    trainer = Trainer(config, data, env)
    if checkpoint is not None:
        if native:
            trainer.load_state_dict(checkpoint)
        else:
            trainer.load_original(checkpoint)
    return config, data, novel, fine, trainer


def _run(argv: Sequence[str] | None, env: distributed.DistEnv | None) -> int:
    wall_started = time.perf_counter()
    parser = build_parser()
    raw = parser.parse_args(argv)
    try:
        config, data, novel, fine, trainer = _prepare(raw, env)
    except AppError as error:
        return report(parser, error)
    progress = not config.no_progress
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = True
    try:
        return _train_and_evaluate(config, data, novel, fine, trainer, progress, wall_started)
    except BadImageError as error:
        log.error(
            f"error: {error.reason}; its header was sound, so the check before training let it through. "
            f"Stopped; {trainer.on_disk()}. Remove or replace the file, then --resume."
        )
        return EXIT_USAGE


def _train_and_evaluate(
    config: RunConfig,
    data: DataBundle,
    novel: DataBundle | None,
    fine: DataBundle | None,
    trainer: Trainer,
    progress: bool,
    wall_started: float,
) -> int:
    """Trains (unless ``--evaluate``), evaluates and writes the summary; the exit status."""
    if config.evaluate:
        recomputed = bool(config.recompute_bank)
        result = trainer.knn(trainer.bank(progress, recompute=recomputed), config.knn_k, progress)
        log.info(summary_line(config.knn_k, config.knn_sigma, result, recomputed, trainer.epoch))
        if novel is not None:
            _novel_evaluation(trainer, novel, progress)
        return EXIT_OK

    checkpoint_path = trainer.out / "checkpoint.pt"
    log.info(
        f"run {trainer.out}: {config.dataset}, {config.arch}, N={len(data.train)} train / {len(data.test)} "
        f"test, T={config.temperature}, batch {config.batch_size}, lr {config.lr}, {config.epochs} epochs, "
        f"{trainer.device}"
    )
    status, aborted = EXIT_OK, False
    train_started = time.perf_counter()
    try:
        with StopSignal() as stop:
            while trainer.epoch < config.epochs:
                epoch_started = time.perf_counter()
                if not trainer.train_epoch(stop, progress):
                    where = f"stopped in epoch {trainer.epoch + 1} after step {trainer.step}"
                    if trainer.save():
                        log.info(f"{where}; checkpoint saved: continue with --resume {checkpoint_path}")
                        status = EXIT_STOPPED
                    else:
                        log.error(
                            f"error: {where}, but the checkpoint could not be saved; {trainer.on_disk()}"
                        )
                        status = EXIT_SAVE_FAILED
                    break
                row = trainer.finish_epoch(progress)
                seconds = time.perf_counter() - epoch_started
                log.info(
                    f"epoch {row['epoch']}/{config.epochs}  loss {row['loss']:.4f}  "
                    f"kNN-{config.monitor_k} {row['knn1_top1']:.2f}%  lr {row['lr']:g}  {seconds:.1f} s"
                )
                if trainer.agree_to_stop(stop) and trainer.epoch < config.epochs:
                    log.info(f"stopped after epoch {trainer.epoch}: continue with --resume {checkpoint_path}")
                    status = EXIT_STOPPED
                    break
    except Diverged as error:
        kept = (
            f"the last good checkpoint is kept at {checkpoint_path} (end of epoch {trainer.epoch})"
            if checkpoint_path.is_file()
            else "no checkpoint was written (it diverged before the end of the first epoch)"
        )
        log.error(f"error: {error}. Training stopped; {kept}. Try a lower --lr or a higher --temperature.")
        status = EXIT_DIVERGED
    except SaveFailed as error:
        log.error(f"error: {error}. Training stopped: make room or fix --out, then --resume.")
        status = EXIT_SAVE_FAILED
    except KeyboardInterrupt:
        log.warning("aborted by a second Ctrl-C; the last saved checkpoint is kept")
        status, aborted = EXIT_STOPPED, True
    train_seconds = time.perf_counter() - train_started
    if trainer.tensorboard is not None:
        trainer.tensorboard.close()
    if trainer.metrics and trainer.is_main and status != EXIT_SAVE_FAILED:
        plot_curves(
            trainer.metrics, trainer.out / "curves.png", f"{config.loss} {config.dataset} {config.arch}"
        )
    if status != EXIT_OK:
        # The ranks agreed on this status; they leave together, as torchrun stops every worker
        # as soon as one exits non-zero, which would cut rank 0's last writes and messages short.
        # Not after a second Ctrl-C: that abort may have reached one rank only.
        if not aborted:
            distributed.barrier()
        if status == EXIT_STOPPED and not aborted and distributed.launched_by_torchrun():
            # torchrun reports a worker's non-zero exit as a crash of the job, whatever the code:
            # a requested stop (the ranks stopped together, the checkpoint saved) exits 0 there.
            log.info("exit status 0: under torchrun a stop is not reported as 130, which it calls a crash")
            return EXIT_OK
        return status

    # Both protocols: the memory bank (the original's, and the paper's figures') and the bank
    # recomputed from the final network; --recompute-bank says which one is the headline.
    banks = {recomputed: trainer.bank(progress, recompute=recomputed) for recomputed in (False, True)}
    by_protocol = {
        recomputed: trainer.knn(bank, config.knn_k, progress) for recomputed, bank in banks.items()
    }
    recomputed = bool(config.recompute_bank)
    result = by_protocol[recomputed]
    summary = {
        "dataset": config.dataset,
        "arch": config.arch,
        "loss": config.loss,
        "epochs": trainer.epoch,
        "knn_k": config.knn_k,
        "knn_sigma": config.knn_sigma,
        "recomputed_bank": recomputed,
        "train_labels": config.train_labels,
        "top1": result.top1,
        "top5": result.top5,
        "test_examples": result.count,
        "knn_memory_bank": asdict(by_protocol[False]),
        "knn_recomputed_bank": asdict(by_protocol[True]),
        "train_seconds_this_invocation": round(train_seconds, 2),
    }
    if config.loss == "softmax":
        head = trainer.head_accuracy()
        summary["classifier_head"] = asdict(head)
        log.info(
            f"classifier head (softmax) on {head.count} test examples: top-1 {head.top1:.2f}%  "
            f"top-5 {head.top5:.2f}%"
        )
    if fine is not None:
        # Sub-category discovery: the bank's rows vote with the fine classes it was never told.
        summary["fine_labels_knn"] = {}
        for protocol, bank in banks.items():
            found = trainer.knn(bank, config.knn_k, progress, test=fine)
            summary["fine_labels_knn"]["recomputed_bank" if protocol else "memory_bank"] = asdict(found)
            log.info(
                f"fine-label kNN (K={config.knn_k}, {fine.num_classes} classes never trained on, "
                f"{'bank recomputed from the network' if protocol else 'memory bank'}): "
                f"top-1 {found.top1:.2f}%  top-5 {found.top5:.2f}%"
            )
    if trainer.metrics:
        best = max(trainer.metrics, key=lambda row: row["knn1_top1"])
        summary["best_epoch_selected_on_test"] = {"epoch": best["epoch"], "knn1_top1": best["knn1_top1"]}
    for protocol in (not recomputed, recomputed):  # the headline last
        log.info(summary_line(config.knn_k, config.knn_sigma, by_protocol[protocol], protocol, trainer.epoch))
    if trainer.metrics:
        log.info(
            f"best epoch by the kNN-{config.monitor_k} monitor (selected on the test set, an optimistic "
            f"figure): {best['epoch']} at {best['knn1_top1']:.2f}%"
        )
    if novel is not None:
        summary["novel_classes"] = _novel_evaluation(trainer, novel, progress)
    summary["wall_seconds_this_invocation"] = round(time.perf_counter() - wall_started, 2)
    if trainer.save_failures:
        log.error(f"error: the run finished but its last checkpoint save failed; {trainer.on_disk()}")
        return EXIT_SAVE_FAILED
    if trainer.is_main:
        write_summary(summary, trainer.out / "summary.json")
    log.info(f"wall time {summary['wall_seconds_this_invocation']:.1f} s; files in {trainer.out}")
    return EXIT_OK


def prepare_out(out: Path) -> None:
    """Creates the run folder, checks that it can be written, and removes the temporary files a
    killed save may have left there (the file it was replacing is intact)."""
    writable_folder(out, "--out")
    for name in ("checkpoint.pt", "metrics.csv", "summary.json", "curves.png"):
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _holdout(data: DataBundle, holdout_classes: str) -> tuple[DataBundle, DataBundle | None]:
    """``(data to train on, novel-class data or None)`` for ``--holdout-classes`` and the data
    set's own novel classes (Omniglot's alphabets not trained on)."""
    holdout = held_out_classes(data, holdout_classes)
    if not holdout:
        return data, None
    if max(holdout) >= data.num_classes or data.num_classes - len(holdout) < 2 or len(holdout) < 2:
        raise UsageError(
            f"--holdout-classes must name at least 2 of the {data.num_classes} class ids 0..."
            f"{data.num_classes - 1} and leave at least 2 to train on, got {holdout_classes}"
        )
    return data.split_holdout(holdout)


def _novel_evaluation(trainer: Trainer, novel: DataBundle, progress: bool) -> dict[str, Any]:
    config = trainer.config
    report_ = novel_class_evaluation(
        trainer.model,
        novel,
        k=config.knn_k,
        sigma=config.knn_sigma,
        device=trainer.device,
        batch_size=config.batch_size,
        ways=config.fewshot_ways,
        shots=config.fewshot_shots,
        groups=novel.coarse_of if config.dataset in WITHIN_GROUPS else None,
        episodes=config.fewshot_episodes,
        seed=config.seed,
        backend=config.backend,
        progress=progress,
    )
    classes = report_["classes"]
    named = f"classes {classes}" if len(classes) <= 10 else f"{len(classes)} classes"
    log.info(
        f"novel {named} (never trained on): kNN (K={config.knn_k}) on "
        f"{report_['test_examples']} test images against a bank of their {report_['bank_size']} "
        f"training images: top-1 {report_['knn_top1']:.2f}%"
    )
    for row in report_["fewshot"]:
        within = ", classes of one alphabet" if row["within_groups"] else ""
        log.info(
            f"novel classes {row['ways']}-way {row['shots']}-shot ({row['episodes']} episodes{within}, "
            f"nearest class mean): {row['mean']:.2f}% ± {row['ci95']:.2f} (95% interval)"
        )
    return report_


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
