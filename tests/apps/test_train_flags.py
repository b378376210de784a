"""Training flags that no other test passes: each one reaches the place it configures, checked
against an independent computation where there is one."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers.models import forward_all

from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.data import build_data
from snca_ext.apps.models import build_model
from snca_ext.apps.train.cli import EXIT_OK, build_parser
from snca_ext.apps.train.cli import run as train
from snca_ext.apps.train.config import RunConfig
from snca_ext.apps.train.trainer import Trainer
from snca_ext.distributed import DistEnv

FAST = ["--threads", "1", "--no-progress"]
SMALL = ["--train-limit", "320", "--test-limit", "90", "--epochs", "1"]


def _run(out, *flags: str) -> dict:
    assert train(["--out", str(out), *SMALL, *flags, *FAST]) == EXIT_OK
    return json.loads((out / "summary.json").read_text())


def _losses(out) -> list[float]:
    with open(out / "metrics.csv") as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


def _trainer(tmp_path, *flags: str) -> Trainer:
    config = RunConfig.resolve(build_parser().parse_args(["--out", str(tmp_path), *flags]))
    return Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu")))


def test_knn_flags_set_the_final_evaluation(tmp_path):
    """--knn-k and --knn-sigma against a brute-force weighted kNN of the checkpoint's network (its
    features of the training images as the bank)."""
    out = tmp_path / "run"
    # sigma 0.002: the nearest of the 25 neighbours all but decides alone; with the default sigma
    # (T = 0.1) three of the 90 answers differ (measured), so a sigma that does not reach the vote
    # fails here.
    summary = _run(out, "--knn-k", "25", "--knn-sigma", "0.002", "--monitor-k", "3")
    assert (summary["knn_k"], summary["knn_sigma"], summary["recomputed_bank"]) == (25, 0.002, True)
    model = build_model("digits_cnn", 128)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    data = build_data("digits").limit(320, 90)
    queries = forward_all(model, data.test).double()
    bank = forward_all(model, data.train_plain).double()
    similarity, rows = (queries @ bank.T).topk(25, dim=1)
    votes = torch.zeros(len(queries), 10, dtype=torch.float64)
    votes.scatter_add_(1, data.train_labels[rows], torch.exp((similarity - similarity[:, :1]) / 0.002))
    expected = 100.0 * float((votes.argmax(1) == data.test.targets).double().mean())
    assert summary["top1"] == pytest.approx(expected, abs=100.0 / 90 + 1e-9)  # one query at most
    assert RunConfig.resolve(build_parser().parse_args(["--no-recompute-bank"])).recompute_bank is False


def test_reference_backend_trains_the_same_run_as_the_fused_one(tmp_path, monkeypatch):
    from snca_ext import reference

    calls = []
    stats = reference.snca_stats_reference
    monkeypatch.setattr(reference, "snca_stats_reference", lambda *a, **k: calls.append(1) or stats(*a, **k))
    _run(tmp_path / "cpu", "--backend", "cpu")
    assert not calls
    _run(tmp_path / "reference", "--backend", "reference")
    assert calls  # the flag reached the op: the loss went through plain PyTorch
    assert _losses(tmp_path / "reference") == pytest.approx(_losses(tmp_path / "cpu"), rel=1e-4)


def test_seed_sets_the_run(tmp_path):
    first, again = _trainer(tmp_path / "a", "--seed", "3"), _trainer(tmp_path / "b", "--seed", "3")
    other = _trainer(tmp_path / "c", "--seed", "4")
    assert torch.equal(first.memory.bank, again.memory.bank)
    assert not torch.equal(first.memory.bank, other.memory.bank)


def test_optimizer_bank_and_margin_flags_reach_their_place(tmp_path):
    trainer = _trainer(
        tmp_path, "--weight-decay", "0.003", "--nesterov", "--bank-dtype", "bfloat16", "--margin", "0.2"
    )
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["nesterov"]) == (0.003, True)
    assert trainer.memory.bank.dtype == torch.bfloat16
    assert not _trainer(tmp_path / "plain", "--no-nesterov").optimizer.param_groups[0]["nesterov"]
    # The margin (cosine units) reaches the loss divided by T: a larger loss on the same step.
    indices = torch.arange(64)
    images = torch.stack([trainer.data.train[i][0] for i in range(64)])
    plain = _trainer(tmp_path / "no-margin", "--bank-dtype", "bfloat16")
    assert trainer.margin_logits == pytest.approx(0.2 / 0.1) and plain.margin_logits == 0.0
    with torch.no_grad():
        with_margin = trainer.step_loss(images, indices, trainer.margin_logits)[1]
        without = plain.step_loss(images, indices, plain.margin_logits)[1]
    assert with_margin > without
