"""Runs shared by several application test files: one training per configuration per session,
and the untrained network's figures, the baseline a trained run must beat."""

from __future__ import annotations

from pathlib import Path

import pytest

from snca_ext.apps.train.cli import EXIT_OK, build_parser
from snca_ext.apps.train.cli import run as train
from snca_ext.apps.train.session import novel_evaluation, prepare

FAST = ["--threads", "1", "--no-progress"]
HOLDOUT = ["--holdout-classes", "9,5,6,7,8", "--fewshot-episodes", "200"]


@pytest.fixture(scope="session")
def holdout_runs(tmp_path_factory) -> dict[str, Path]:
    """3-epoch digits runs without classes 5-9, with the SNCA loss and with the softmax baseline
    (their run folders): the novel-class, export and neighbour tests read them."""
    outs = {}
    for loss in ("snca", "softmax"):
        out = tmp_path_factory.mktemp(f"holdout-{loss}")
        assert train(["--out", str(out), "--epochs", "3", "--loss", loss, *HOLDOUT, *FAST]) == EXIT_OK
        outs[loss] = out
    return outs


def untrained_figures(out: Path, *flags: str) -> dict:
    """What the run of ``flags`` reports before its first step: the network as initialised (same
    seed), kNN with the bank recomputed from it, and with ``--holdout-classes`` the novel-class
    figures. A run that learns must beat these; on 8x8 digits random features already give
    about 90% kNN, so a loose threshold would pass a network that learns nothing."""
    argv = ["--out", str(out), *flags, *FAST]
    config, _, novel, _, trainer = prepare(build_parser().parse_args(argv), None)
    result = trainer.knn(trainer.bank(False, recompute=True), config.knn_k, False)
    figures = {"top1": result.top1, "top5": result.top5}
    if config.loss == "softmax":  # the head as initialised: chance, whatever the features
        figures["head_top1"] = trainer.head_accuracy().top1
    if novel is not None:
        figures["novel_classes"] = novel_evaluation(trainer, novel, False)
    return figures


@pytest.fixture(scope="session")
def untrained_digits(tmp_path_factory) -> dict:
    return untrained_figures(tmp_path_factory.mktemp("untrained"))


@pytest.fixture(scope="session")
def untrained_holdout(tmp_path_factory) -> dict[str, dict]:
    """Per loss, the untrained figures of the holdout runs."""
    return {
        loss: untrained_figures(tmp_path_factory.mktemp(f"untrained-{loss}"), *HOLDOUT, "--loss", loss)
        for loss in ("snca", "softmax")
    }


@pytest.fixture(scope="session")
def untrained_of():
    """``untrained_figures`` for the test files that need it with flags of their own."""
    return untrained_figures
