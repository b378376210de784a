"""The evaluation protocols of a run, each checked against an independent computation: both kNN
banks, sub-category discovery (train on coarse labels, kNN with the fine ones), the softmax
baselines' classifier heads (linear and normalised), and --iter-size against one batch of the same size."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import forward_all
from torch import nn
from torch.nn import functional as F

from snca_ext import knn_accuracy
from snca_ext.apps.data import build_data
from snca_ext.apps.data.fashion_mnist import DEBIAN_FOLDER
from snca_ext.apps.train.cli import EXIT_OK, EXIT_USAGE, build_parser, run
from snca_ext.apps.train.config import RunConfig
from snca_ext.apps.train.trainer import Trainer
from snca_ext.apps.trained import load_trained_model
from snca_ext.distributed import DistEnv

FAST = ["--threads", "1", "--no-progress"]


@pytest.mark.skipif(not DEBIAN_FOLDER.is_dir(), reason="needs dataset-fashion-mnist (CI installs it)")
def test_sub_category_discovery_votes_with_the_fine_labels(tmp_path):
    out = tmp_path / "coarse"
    argv = ["--dataset", "fashion-mnist", "--train-labels", "coarse", "--train-limit", "1024"]
    assert run([*argv, "--test-limit", "300", "--epochs", "1", "--out", str(out), *FAST]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    model, _ = load_trained_model(out)
    data = build_data("fashion-mnist").limit(1024, 300)
    bank, queries = forward_all(model, data.train_plain), forward_all(model, data.test)
    fine = knn_accuracy(queries, data.test.targets, bank, data.train.targets, 10, k=30, sigma=0.05)
    coarse_of = data.coarse_of
    coarse = knn_accuracy(
        queries, coarse_of[data.test.targets], bank, coarse_of[data.train.targets], 4, k=30, sigma=0.05
    )
    assert summary["fine_labels_knn"]["recomputed_bank"]["top1"] == pytest.approx(fine.top1)
    assert summary["knn_recomputed_bank"]["top1"] == pytest.approx(coarse.top1)
    assert fine.top1 < coarse.top1  # ten classes are harder than their four groups


def test_coarse_labels_need_a_data_set_that_has_them(capsys):
    assert run(["--train-labels", "coarse", *FAST]) == EXIT_USAGE
    assert "--train-labels coarse needs a data set with coarse classes" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["softmax", "cosine-softmax"])
def test_the_softmax_baselines_report_their_classifier_head(tmp_path, loss):
    out = tmp_path / loss
    assert run(["--loss", loss, "-t", "0.2", "--epochs", "1", "--out", str(out), *FAST]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    model, _ = load_trained_model(out)
    data = build_data("digits")
    with torch.no_grad():
        images = torch.stack([data.test[i][0] for i in range(len(data.test))])
        _, logits = model.eval()(images, logits=True)
    expected = 100.0 * float((logits.argmax(dim=1) == data.test.targets).double().mean())
    assert summary["classifier_head"]["top1"] == pytest.approx(expected)
    assert summary["classifier_head"]["count"] == 450
    assert summary["loss"] == loss and summary["classifier_head"]["top1"] > 20  # chance: 10 %
    # The normalised softmax's logits are cosines over the run's T (its head kept through the
    # checkpoint): in [-1/T, 1/T], and blind to the length of a class's weight vector, where the
    # linear head's logits scale with it.
    head = model.classifier
    with torch.no_grad():
        embedding = model.fc(model.features(images))
        head.weight[0] *= 3.0
        scaled = head(embedding)
    if loss == "cosine-softmax":
        assert head.temperature == 0.2 and logits.abs().max() <= 1 / 0.2 + 1e-5
        torch.testing.assert_close(scaled, logits)
    else:
        assert not torch.allclose(scaled[:, 0], logits[:, 0])


class _Linear(nn.Module):
    """A network without batch norm, so that micro-batches and one batch give the same gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)

    def forward(self, x, logits=False):
        return F.normalize(self.fc(x.flatten(1)), dim=1)


def _trainer(iter_size: int) -> Trainer:
    config = RunConfig.resolve(build_parser().parse_args(["--low-dim", "16", "--iter-size", str(iter_size)]))
    config.out = "unused"
    trainer = Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu")))
    torch.manual_seed(0)
    trainer.model = trainer.net = trainer.forward = _Linear()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    return trainer


def test_iter_size_steps_equal_one_batch_of_the_same_size():
    data = build_data("digits")
    rows = torch.arange(40, 104)
    images = torch.stack([data.train_plain[int(i)][0] for i in rows])
    whole, split = _trainer(1), _trainer(2)
    for _ in range(2):  # the second step also sees the bank the first one updated
        seen, loss = whole.train_step([(images, rows)], 0.5, 0.0)
        seen2, loss2 = split.train_step([(images[:32], rows[:32]), (images[32:], rows[32:])], 0.5, 0.0)
        assert seen == seen2 == 64 and loss == pytest.approx(loss2, rel=1e-5)
        torch.testing.assert_close(split.model.fc.weight, whole.model.fc.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.memory.bank, whole.memory.bank, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.memory.bank[rows], _trainer(1).memory.bank[rows])  # the bank moved


def test_iter_size_runs_end_to_end(tmp_path):
    out = tmp_path / "iter"
    assert run(["--epochs", "1", "-b", "32", "--iter-size", "2", "--out", str(out), *FAST]) == EXIT_OK
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["args"]["iter_size"] == 2 and state["epoch"] == 1
