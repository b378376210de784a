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

import contextlib
import logging
import sys
import time
from collections.abc import Sequence

import torch

from snca_ext import distributed

from ..arguments import configure_logging, report
from ..data.imagefolder import BadImageError
from ..errors import EXIT_USAGE, AppError
from .parser import build_parser
from .session import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PEER_FAILED,
    EXIT_SAVE_FAILED,
    EXIT_STOPPED,
    prepare,
    train_and_evaluate,
)
from .signals import exit_after_peer_failure

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_OK",
    "EXIT_PEER_FAILED",
    "EXIT_SAVE_FAILED",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "run",
]


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
        exit_after_peer_failure(error, EXIT_PEER_FAILED)
    distributed.shutdown()
    return status


def _run(argv: Sequence[str] | None, env: distributed.DistEnv | None) -> int:
    wall_started = time.perf_counter()
    parser = build_parser()
    raw = parser.parse_args(argv)
    try:
        config, data, novel, fine, trainer = prepare(raw, env)
    except AppError as error:
        return report(parser, error)
    progress = not config.no_progress
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = True
    try:
        return train_and_evaluate(config, data, novel, fine, trainer, progress, wall_started)
    except BadImageError as error:
        log.error(
            f"error: {error.reason}; its header was sound, so the check before training let it through. "
            f"Stopped; {trainer.on_disk()}. Remove or replace the file, then "
            + ("--resume." if (trainer.out / "checkpoint.pt").is_file() else "run the same command again.")
        )
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
