"""The training program's parts on their own: the sampler, the feature loop, the evaluation, the
configuration and the command line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from snca_ext import MemoryBank, knn_accuracy
from snca_ext.apps.errors import UsageError
from snca_ext.apps.features import compute_features
from snca_ext.apps.train.cli import build_parser
from snca_ext.apps.train.config import RECIPES, RunConfig
from snca_ext.apps.train.evaluation import knn_evaluate
from snca_ext.apps.train.sampler import EpochSampler


class _Points(Dataset):
    def __init__(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        self.points, self.targets = points, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.points[index], int(self.targets[index]), index


def _epoch(size: int, batch: int, rank: int, world: int, seed: int = 3, skip: int = 0) -> list[int]:
    sampler = EpochSampler(size, batch, torch.Generator().manual_seed(seed), rank=rank, world_size=world)
    sampler.begin_epoch(skip_batches=skip)
    return list(sampler)


def test_every_world_size_sees_the_same_global_batches():
    size, batch = 103, 12  # 8 whole batches; the last 7 examples are dropped
    single = _epoch(size, batch, 0, 1)
    assert len(single) == 8 * batch and len(set(single)) == len(single)
    for world in (2, 3, 4):
        shares = [_epoch(size, batch, rank, world) for rank in range(world)]
        for step in range(8):
            per_rank = batch // world
            union = {i for share in shares for i in share[step * per_rank : (step + 1) * per_rank]}
            assert union == set(single[step * batch : (step + 1) * batch])


def test_resuming_mid_epoch_replays_the_rest_of_the_order():
    full = _epoch(50, 5, 0, 1)
    assert _epoch(50, 5, 0, 1, skip=4) == full[20:]
    assert _epoch(50, 5, 0, 1, seed=4) != full  # another generator state, another order


def test_sampler_refuses_a_batch_that_does_not_split_over_the_ranks():
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochSampler(10, 5, torch.Generator(), rank=0, world_size=2)


def test_compute_features_in_dataset_order_and_mode_restored():
    points = torch.randn(23, 5, generator=torch.Generator().manual_seed(8))
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    model.train()
    features, labels = compute_features(model, _Points(points, torch.arange(23) % 4), "cpu", batch_size=4)
    assert model.training  # put back in the mode it was in
    model.eval()
    with torch.no_grad():
        expected = model(points)
    torch.testing.assert_close(features, expected)  # eval mode: batch norm used its running stats
    assert torch.equal(labels, torch.arange(23) % 4)


def test_knn_evaluate_of_a_network_equals_knn_on_its_features():
    generator = torch.Generator().manual_seed(5)
    points = F.normalize(torch.randn(37, 6, generator=generator), dim=1)
    labels = torch.randint(0, 4, (37,), generator=generator)
    memory = MemoryBank(torch.randint(0, 4, (50,), generator=generator), 6, temperature=0.1)
    memory.fill(F.normalize(torch.randn(50, 6, generator=generator), dim=1))
    result = knn_evaluate(
        nn.Identity(),
        _Points(points, labels),
        memory,
        4,
        k=9,
        sigma=0.1,
        device="cpu",
        batch_size=8,
        chunk=10,
    )
    assert result == knn_accuracy(points, labels, memory.bank, memory.labels, 4, k=9, sigma=0.1)
    assert result.count == 37


def test_config_takes_the_recipe_then_the_checkpoint_then_the_flags():
    parser = build_parser()
    config = RunConfig.resolve(parser.parse_args(["--dataset", "cifar10", "--data", "/x"]))
    assert (config.arch, config.lr_step, config.knn_sigma) == ("cifar_resnet18", 50, 0.05)
    saved = {**config.run_dict(), "lr": 0.03, "epochs": 7}
    resumed = RunConfig.resolve(parser.parse_args(["--epochs", "9"]), saved)
    assert (resumed.dataset, resumed.lr, resumed.epochs) == ("cifar10", 0.03, 9)
    assert RunConfig.resolve(parser.parse_args([])).temperature == RECIPES["digits"]["temperature"]
    with pytest.raises(UsageError, match="--evaluate needs --resume"):
        RunConfig.resolve(parser.parse_args(["-e"]))


def test_help_shows_the_argument_groups():
    text = build_parser().format_help()
    for group in ("data:", "model and loss:", "optimisation:", "memory bank:", "evaluation:", "run:"):
        assert group in text
