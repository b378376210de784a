"""One training session of ``python -m snca_ext.train``, the command's work: ``prepare`` (the
configuration, the data and the trainer, restored from ``--resume``), ``train_and_evaluate``
(the epochs, then both kNN protocols, the novel classes and the summary) and the exit statuses
they end with."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from snca_ext import distributed

from ..arguments import check_backend, resolve_device, set_threads, writable_folder
from ..checkpoints import FORMAT, from_original, load_checkpoint, original_run
from ..data import DEFAULT_LOCATION, WITHIN_GROUPS, DataBundle, held_out_classes, run_data
from ..errors import UsageError
from .config import RunConfig
from .evaluation import most_ways, novel_class_evaluation
from .outputs import plot_curves, summary_line, write_summary
from .signals import StopSignal
from .trainer import Diverged, SaveFailed, Trainer, seed_everything

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED, EXIT_STOPPED, EXIT_PEER_FAILED, EXIT_SAVE_FAILED = 0, 1, 130, 3, 4


def _load_resume(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.resume is None:
        return None
    path = Path(args.resume)
    if path.is_dir():  # a run directory
        path = path / "checkpoint.pt"
    args.resume = str(path)
    return load_checkpoint(
        path, trust=args.trust_checkpoint, before_unpickling=lambda: _check_before_unpickling(args)
    )


def _check_before_unpickling(raw: argparse.Namespace) -> None:
    """What can be checked of the command line before a --resume file that needs unpickling (an
    original SNCA checkpoint, with --trust-checkpoint) is unpickled: its code must not run for a
    command that is then refused. Such a file records no data set (its arch implies imagefolder or
    cifar10, both local folders): --data is needed, or a --dataset read from its default place."""
    if raw.data is None and raw.dataset not in DEFAULT_LOCATION:
        raise UsageError(
            f"--resume {raw.resume} needs unpickling: an original SNCA checkpoint, which records no data "
            "set: pass --data PATH (or --dataset for a data set read from its default place); checked "
            "before the file is unpickled"
        )
    if raw.data is not None and not Path(raw.data).is_dir():
        raise UsageError(f"--data {raw.data}: no such folder (checked before the checkpoint is unpickled)")
    if raw.tensorboard is not None and Path(raw.tensorboard).is_file():
        raise UsageError(f"--tensorboard {raw.tensorboard} is a file: give a folder for the event files")
    if raw.pretrained is not None:
        raise UsageError("--pretrained is for a new timm run, not for --resume of an original checkpoint")
    if raw.out is not None:
        writable_folder(Path(raw.out), "--out")
    check_backend(raw.backend or "auto", resolve_device(raw.device or "auto"))


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


def prepare(
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
    if native and raw.dataset is not None and raw.dataset != saved.get("dataset"):
        raise UsageError(
            f"--dataset {raw.dataset} contradicts --resume {raw.resume}, a run trained on --dataset "
            f"{saved.get('dataset')}: leave --dataset out to continue (or evaluate) that run, or start "
            "a new run without --resume"
        )
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
    check_backend(config.backend, env.device)
    config.out = distributed.broadcast_object(config.out)  # the ranks' clocks may straddle a second
    set_threads(config.threads)
    seed_everything(config.seed)
    data = run_data(config.run_dict(), skip_bad_images=bool(config.skip_bad_images)).limit(
        config.train_limit, config.test_limit
    )
    fine = None
    if config.train_labels == "coarse":
        fine, data = data, data.coarse()
    data, novel = holdout(data, config.holdout_classes)
    if novel is not None and raw.fewshot_ways is not None:
        _check_ways(config, novel)
    if config.knn_k > len(data.train):
        log.warning(
            f"warning: --knn-k {config.knn_k} is more than the {len(data.train)} training examples "
            f"(the bank): K = {len(data.train)} is used"
        )
        config.knn_k = len(data.train)
    if native:
        _check_resumed_data(raw.resume, checkpoint, config, data)
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


def _check_ways(config: RunConfig, novel: DataBundle) -> None:
    """Refuses a --fewshot-ways that the novel classes cannot fill (within one group where the data
    set draws episodes so: Omniglot's alphabets); the data set's default ways are lowered instead."""
    within = config.dataset in WITHIN_GROUPS
    classes = sorted(set(novel.train_labels.tolist()))
    largest = most_ways(classes, novel.coarse_of if within else None)
    too_many = [ways for ways in config.fewshot_ways if ways > largest]
    if too_many:
        where = (
            f"the largest held-out alphabet has {largest} classes (episodes draw within one)"
            if within
            else f"--holdout-classes {config.holdout_classes} leaves {largest} novel classes"
        )
        raise UsageError(
            f"--fewshot-ways {','.join(map(str, config.fewshot_ways))} asks for {max(too_many)}-way "
            f"episodes, but {where}: give ways of at most {largest}"
        )


def _check_resumed_data(resume: str, checkpoint: dict[str, Any], config: RunConfig, data: DataBundle) -> None:
    """Refuses a checkpoint whose memory bank was trained on other examples than the run's data
    (another --data folder, --train-limit or --holdout-classes): its rows' labels are the training
    labels of the run that saved it, so a bank of another size, class count or order is a
    contradiction, not a run to continue or evaluate."""
    labels = checkpoint.get("memory", {}).get("labels")
    if labels is None:
        return
    labels = labels.cpu()
    mine = data.train_labels.cpu()
    where = f"--dataset {config.dataset}" + (f" --data {config.data}" if config.data else "")
    if len(labels) != len(mine) or not torch.equal(labels, mine):
        saved_classes = int(labels.max()) + 1 if len(labels) else 0
        raise UsageError(
            f"--resume {resume} was trained on {len(labels)} training examples of {saved_classes} "
            f"classes, but {where} gives {len(mine)} of {data.num_classes} classes "
            f"({'other labels' if len(labels) == len(mine) else 'another size'}): "
            "not the data the checkpoint's memory bank was trained on (check --data, --train-limit, "
            "--holdout-classes, --train-labels)"
        )


def train_and_evaluate(
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
            novel_evaluation(trainer, novel, progress)
        return EXIT_OK

    log.info(
        f"run {trainer.out}: {config.dataset}, {config.arch}, N={len(data.train)} train / {len(data.test)} "
        f"test, T={config.temperature}, batch {config.batch_size}, lr {config.lr}, {config.epochs} epochs, "
        f"{trainer.device}"
    )
    train_started = time.perf_counter()
    status, aborted = _train_epochs(config, trainer, progress)
    train_seconds = time.perf_counter() - train_started
    if trainer.tensorboard is not None:
        trainer.tensorboard.close()
    if trainer.metrics and trainer.is_main and status != EXIT_SAVE_FAILED:
        plot_curves(
            trainer.metrics, trainer.out / "curves.png", f"{config.loss} {config.dataset} {config.arch}"
        )
    if status != EXIT_OK:
        return _leave_early(status, aborted)
    summary = _evaluate(config, novel, fine, trainer, progress, train_seconds)
    summary["wall_seconds_this_invocation"] = round(time.perf_counter() - wall_started, 2)
    if trainer.save_failures:
        log.error(f"error: the run finished but its last checkpoint save failed; {trainer.on_disk()}")
        return EXIT_SAVE_FAILED
    if trainer.is_main:
        write_summary(summary, trainer.out / "summary.json")
    log.info(f"wall time {summary['wall_seconds_this_invocation']:.1f} s; files in {trainer.out}")
    return EXIT_OK


def _train_epochs(config: RunConfig, trainer: Trainer, progress: bool) -> tuple[int, bool]:
    """The epochs to ``--epochs`` or to a stop: ``(exit status, aborted by a second Ctrl-C)``."""
    checkpoint_path = trainer.out / "checkpoint.pt"
    status, aborted = EXIT_OK, False
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
    return status, aborted


def _leave_early(status: int, aborted: bool) -> int:
    """The exit status of a run that did not finish its epochs, once the ranks are together."""
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


def _evaluate(
    config: RunConfig,
    novel: DataBundle | None,
    fine: DataBundle | None,
    trainer: Trainer,
    progress: bool,
    train_seconds: float,
) -> dict[str, Any]:
    """Both kNN protocols, the classifier head, the fine labels and the novel classes, logged; the
    summary."""
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
    if config.loss != "snca":
        head = trainer.head_accuracy()
        summary["classifier_head"] = asdict(head)
        log.info(
            f"classifier head ({config.loss}) on {head.count} test examples: top-1 {head.top1:.2f}%  "
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
        summary["novel_classes"] = novel_evaluation(trainer, novel, progress)
    return summary


def prepare_out(out: Path) -> None:
    """Creates the run folder, checks that it can be written, and removes the temporary files a
    killed save may have left there (the file it was replacing is intact)."""
    writable_folder(out, "--out")
    for name in ("checkpoint.pt", "metrics.csv", "summary.json", "curves.png"):
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def holdout(data: DataBundle, holdout_classes: str) -> tuple[DataBundle, DataBundle | None]:
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


def novel_evaluation(trainer: Trainer, novel: DataBundle, progress: bool) -> dict[str, Any]:
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
        f"novel {named} (never trained on): kNN (K={report_['knn_k']}) on "
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
