"""Weighted kNN voting and accuracy on feature matrices, against a brute-force implementation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from snca_ext import KnnResult, knn_accuracy, knn_counts, knn_predict, knn_scores, knn_votes


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


def test_vote_arguments_are_checked_by_name():
    queries, bank, bank_labels = _unit(2, 4, 0), _unit(5, 4, 1), torch.tensor([0, 1, 1, 0, 1])
    bad = [
        (dict(sigma=0), ValueError, "sigma must be a finite number > 0, got 0"),
        (dict(sigma=float("nan")), ValueError, "sigma must be a finite number > 0, got nan"),
        (dict(k=0), ValueError, "k must be an int >= 1 .*, got 0"),  # k = 0 once gave a number
        (dict(num_classes=1), ValueError, r"bank_labels must be classes in \[0, num_classes=1\), got 1"),
        (dict(num_classes=0), ValueError, "num_classes must be an int >= 1, got 0"),
        (dict(bank_labels=bank_labels[:4]), ValueError, r"bank_labels must be \[N=5\]"),
        (dict(bank_labels=bank_labels.float()), TypeError, "bank_labels must have an integer dtype"),
    ]
    for change, error, message in bad:
        arguments = dict(bank_labels=bank_labels, num_classes=2, k=3, sigma=0.1) | change
        with pytest.raises(error, match=message):
            knn_scores(queries, bank, **arguments)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        knn_accuracy(queries, torch.tensor([0, 1]), bank, bank_labels, 2, k=0, sigma=0.1)
    with pytest.raises(ValueError, match=r"labels must be \[B=2\], one class per query, got \(3,\)"):
        knn_accuracy(queries, torch.tensor([0, 1, 1]), bank, bank_labels, 2, k=3, sigma=0.1)


def test_knn_accuracy_counts_top1_and_top5_against_brute_force():
    bank = _unit(60, 8, 9)
    bank_labels = torch.arange(60) % 8
    queries = _unit(40, 8, 11)
    labels = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(12))
    # k = N: every class gets votes, so no tie among zero scores blurs the top 5.
    result = knn_accuracy(queries, labels, bank, bank_labels, 8, k=60, sigma=0.1, chunk=16)
    expected = _brute_force_scores(queries, bank, bank_labels, 8, 60, 0.1)
    ranked = expected.argsort(dim=1, descending=True, stable=True)
    top1 = 100.0 * float((ranked[:, 0] == labels).double().mean())
    top5 = 100.0 * float((ranked[:, :5] == labels[:, None]).any(dim=1).double().mean())
    assert result.count == 40
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
    assert result.top5 > result.top1  # these random labels: the top-5 check must see more hits


def test_knn_counts_are_exact_and_sum_over_chunks():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    counts = knn_counts(scores, torch.tensor([1, 2, 0]))
    assert counts.tolist() == [1, 3, 3]  # only row 0 right at top-1; 3 classes: top-5 holds all
    assert KnnResult.from_counts(counts + counts) == KnnResult(top1=100 / 3, top5=100.0, count=6)
    with pytest.raises(ValueError, match="empty"):
        KnnResult.from_counts(torch.zeros(3, dtype=torch.long))


def test_votes_ignore_missing_neighbours():
    values = torch.tensor([[0.9, 0.8, float("-inf")]])
    rows = torch.tensor([[2, 0, -1]])
    scores = knn_votes(values, rows, torch.tensor([1, 0, 2]), 3, sigma=0.1)
    # Row 2 (class 2) is the nearest: weight 1; row 0 (class 1): e^-1; the -1 padding, clamped to
    # row 0 for the gather, must add nothing to class 1.
    torch.testing.assert_close(scores[0], torch.tensor([0.0, float(torch.exp(torch.tensor(-1.0))), 1.0]))


def test_knn_on_a_bfloat16_bank():
    bank = _unit(64, 16, 10)
    labels = torch.arange(64) % 4
    predicted = knn_predict(bank[:8], bank.bfloat16(), labels, 4, 1, 0.1)
    assert torch.equal(predicted[:, 0], labels[:8])
