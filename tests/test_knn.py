"""Weighted kNN voting against a brute-force implementation, and the evaluation helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from snca_ext.knn import compute_features, knn_evaluate, knn_predict, knn_scores


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _brute_force_scores(queries, bank, labels, classes, k, sigma, exclude=None):
    scores = torch.zeros(queries.shape[0], classes, dtype=torch.float64)
    sims = queries.double() @ bank.double().T
    for i in range(queries.shape[0]):
        candidates = [j for j in range(bank.shape[0]) if exclude is None or j != int(exclude[i])]
        nearest = sorted(candidates, key=lambda j: -float(sims[i, j]))[:k]
        for j in nearest:
            scores[i, int(labels[j])] += torch.exp(sims[i, j] / sigma)
    return scores


@pytest.mark.parametrize("k,sigma", [(1, 0.05), (7, 0.05), (30, 0.5)])
def test_scores_match_brute_force_up_to_a_per_query_scale(k, sigma):
    queries, bank = _unit(9, 12, 0), _unit(101, 12, 1)
    labels = torch.randint(0, 7, (101,), generator=torch.Generator().manual_seed(2))
    ours = knn_scores(queries, bank, labels, 7, k, sigma).double()
    expected = _brute_force_scores(queries, bank, labels, 7, k, sigma)
    # The weights are scaled per query by exp(-max_sim / sigma), which leaves the vote unchanged.
    torch.testing.assert_close(
        ours / ours.sum(1, keepdim=True), expected / expected.sum(1, keepdim=True), rtol=1e-5, atol=1e-6
    )


def test_exclude_skips_the_query_own_row():
    bank = _unit(50, 8, 3)
    labels = torch.arange(50) % 5
    ours = knn_scores(bank[:6], bank, labels, 5, 4, 0.1, exclude=torch.arange(6)).double()
    expected = _brute_force_scores(bank[:6], bank, labels, 5, 4, 0.1, exclude=torch.arange(6))
    torch.testing.assert_close(
        ours / ours.sum(1, keepdim=True), expected / expected.sum(1, keepdim=True), rtol=1e-5, atol=1e-6
    )


def test_sigma_decides_between_one_close_and_two_far_neighbours():
    query = torch.tensor([[1.0, 0.0]])
    close = torch.tensor([[1.0, 0.0]])
    far = F.normalize(torch.tensor([[0.8, 0.6], [0.8, -0.6]]), dim=1)
    bank = torch.cat([close, far])
    labels = torch.tensor([0, 1, 1])
    assert int(knn_predict(query, bank, labels, 2, 3, sigma=0.05)[0, 0]) == 0  # exp(4) > 2
    assert int(knn_predict(query, bank, labels, 2, 3, sigma=10.0)[0, 0]) == 1  # nearly a plain count


def test_k_larger_than_the_bank_and_small_sigma_stay_finite():
    bank = _unit(3, 4, 4)
    scores = knn_scores(_unit(2, 4, 5), bank, torch.tensor([0, 1, 2]), 3, 10, sigma=1e-4)
    assert bool(torch.isfinite(scores).all()) and bool((scores.sum(1) > 0).all())


def test_predict_returns_at_most_the_class_count():
    assert knn_predict(_unit(4, 6, 6), _unit(20, 6, 7), torch.arange(20) % 3, 3, 5, 0.1).shape == (4, 3)


def test_sigma_must_be_positive():
    with pytest.raises(ValueError, match="sigma must be > 0, got 0"):
        knn_scores(_unit(2, 4, 0), _unit(5, 4, 1), torch.zeros(5, dtype=torch.long), 2, 1, 0)


class _Points(Dataset):
    def __init__(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.points[index], int(self.labels[index]), index


def test_compute_features_places_rows_by_dataset_index():
    points = torch.randn(23, 5, generator=torch.Generator().manual_seed(8))
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    model.train()
    loader = DataLoader(_Points(points, torch.zeros(23)), batch_size=4, shuffle=True)
    features = compute_features(model, loader, 23, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        expected = model(points)
    torch.testing.assert_close(features, expected)
    assert model.training is False  # it was put back in the mode it was in (eval here)


def test_knn_evaluate_top1_and_top5():
    bank = _unit(40, 8, 9)
    bank_labels = torch.arange(40) % 8
    # Queries equal to bank rows: K=1 finds the row itself; the labels below are half right.
    queries = bank[:10]
    query_labels = bank_labels[:10].clone()
    query_labels[5:] = (query_labels[5:] + 1) % 8
    loader = DataLoader(_Points(queries, query_labels), batch_size=3)
    result = knn_evaluate(
        nn.Identity(), loader, bank, bank_labels, 8, k=1, sigma=0.1, device=torch.device("cpu")
    )
    assert result.count == 10 and result.top1 == pytest.approx(50.0)
    assert result.top5 >= result.top1


def test_knn_on_a_bfloat16_bank():
    bank = _unit(64, 16, 10)
    labels = torch.arange(64) % 4
    predicted = knn_predict(bank[:8], bank.bfloat16(), labels, 4, 1, 0.1)
    assert torch.equal(predicted[:, 0], labels[:8])
