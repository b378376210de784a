"""snca_ext/combine.py: the log-sum-exp combine and the top-k merge shared by the Triton split
combine and the sharded bank, against direct float64 computations."""

from __future__ import annotations

import random

import pytest
import torch

from snca_ext import combine

INF = float("inf")
NAN = float("nan")


def _partials(scores: torch.Tensor, rows: torch.Tensor, cuts: list[int]):
    """(max, sum, acc) partials of one group's scores [B, N] cut into column runs at ``cuts``,
    the way a split of the bank computes them (NaN scores flagged through a NaN sum)."""
    maxes, sums, accs = [], [], []
    for begin, end in zip([0, *cuts], [*cuts, scores.shape[1]], strict=True):
        part = scores[:, begin:end]
        nan = torch.isnan(part).any(dim=1)
        clean = part.masked_fill(torch.isnan(part), -INF)
        top = clean.amax(dim=1) if part.shape[1] else torch.full((scores.shape[0],), -INF, dtype=scores.dtype)
        shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
        weights = torch.where(
            clean == shift[:, None], torch.ones_like(clean), torch.exp(clean - shift[:, None])
        )
        maxes.append(top)
        sums.append(torch.where(nan, torch.full_like(top, NAN), weights.sum(dim=1)))
        accs.append(weights @ rows[begin:end])
    return torch.stack(maxes), torch.stack(sums), torch.stack(accs)


def _combine_local(part_max, part_sum, part_acc):
    reduce_max, reduce_sum = combine.local_reduce(0)
    return combine.combine_lse(part_max, part_sum, part_acc, reduce_max=reduce_max, reduce_sum=reduce_sum)


@pytest.mark.parametrize("cuts", [[], [1], [3, 3, 10], [7, 19, 20]])
def test_combine_matches_direct_logsumexp(cuts):
    gen = torch.Generator().manual_seed(0)
    scores = 30 * torch.randn(5, 23, generator=gen, dtype=torch.float64)
    rows = torch.randn(23, 4, generator=gen, dtype=torch.float64)
    scores[1, :] = -INF  # an empty group: -inf, zero mean
    scores[2, 4:] = -INF  # a group seen by the first split only
    lse, wmean = _combine_local(*_partials(scores, rows, cuts))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=1), rtol=1e-13, atol=1e-13)
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0)
    torch.testing.assert_close(wmean, weights @ rows, rtol=1e-12, atol=1e-13)
    assert lse[1] == -INF and torch.equal(wmean[1], torch.zeros(4, dtype=torch.float64))


def test_combine_non_finite_contract():
    """NaN anywhere in a group makes its lse NaN; else a +inf makes it +inf with the mean of the
    +inf rows as its weighted mean; -inf scores add nothing; other queries are unaffected."""
    scores = torch.tensor(
        [
            [1.0, 2.0, NAN, 3.0, INF, 0.5],  # NaN wins over +inf
            [1.0, INF, 2.0, 3.0, INF, 0.5],  # two +inf rows, in different splits
            [1.0, -INF, 2.0, -INF, 3.0, 0.5],  # -inf rows add nothing
            [-INF, -INF, -INF, -INF, -INF, -INF],  # empty
        ],
        dtype=torch.float64,
    )
    rows = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    lse, wmean = _combine_local(*_partials(scores, rows, [2, 4]))
    assert torch.isnan(lse[0]) and torch.isnan(wmean[0]).all()
    assert lse[1] == INF
    torch.testing.assert_close(wmean[1], (rows[1] + rows[4]) / 2)
    finite = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(lse[2], torch.logsumexp(finite, dim=0))
    assert lse[3] == -INF and torch.equal(wmean[3], torch.zeros(2, dtype=torch.float64))


def test_finished_lse_as_partials():
    """The sharded bank's case: each rank's finished lse and mean, combined over ranks."""
    rank_lse = torch.tensor(
        [[0.5, -INF, NAN, INF, -INF], [2.0, 1.0, 3.0, 4.0, -INF], [1.0, -INF, 0.0, INF, -INF]],
        dtype=torch.float64,
    )
    rank_mean = torch.arange(30, dtype=torch.float64).reshape(3, 5, 2)
    part_max, part_sum = combine.lse_as_partial(rank_lse)
    assert not torch.isnan(part_max).any()  # a MAX all-reduce never meets a NaN
    lse, wmean = _combine_local(part_max, part_sum, rank_mean)
    torch.testing.assert_close(lse[:2], torch.logsumexp(rank_lse[:, :2], dim=0))
    assert torch.isnan(lse[2]) and lse[3] == INF and lse[4] == -INF
    weights = torch.softmax(rank_lse[:, 0], dim=0)
    torch.testing.assert_close(wmean[0], (weights[:, None] * rank_mean[:, 0]).sum(dim=0))
    torch.testing.assert_close(wmean[3], (rank_mean[0, 3] + rank_mean[2, 3]) / 2)
    assert torch.equal(wmean[4], torch.zeros(2, dtype=torch.float64))


def _sort_key(value: float, row: int):
    """The merge's order as a Python sort key: NaN first, value descending, row ascending, -1 last."""
    if row < 0:
        return (3, 0.0, 0)
    if value != value:
        return (0, 0.0, row)
    return (1, -value, row)


@pytest.mark.parametrize("seed", range(4))
def test_merge_topk_order(seed):
    rng = random.Random(seed)
    pool = [NAN, INF, -INF, 0.0, -0.0, 1.0, 1.0, 2.5, -3.0]
    candidates = []
    for _ in range(3):
        rows = rng.sample(range(100), 12)
        values = [rng.choice(pool) for _ in rows]
        for slot in rng.sample(range(12), 3):  # empty slots
            rows[slot], values[slot] = -1, -INF
        candidates.append((values, rows))
    values = torch.tensor([v for v, _ in candidates], dtype=torch.float64)
    rows = torch.tensor([r for _, r in candidates])
    merged = combine.merge_topk(values, rows, 10)
    for query, (query_values, query_rows) in enumerate(candidates):
        expected = sorted(zip(query_values, query_rows, strict=True), key=lambda c: _sort_key(*c))[:10]
        assert merged.indices[query].tolist() == [row for _, row in expected]
        torch.testing.assert_close(
            merged.values[query], torch.tensor([v for v, _ in expected], dtype=torch.float64), equal_nan=True
        )
    # Any order of the candidates gives the same answer.
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
    again = combine.merge_topk(values[:, shuffle], rows[:, shuffle], 10)
    assert torch.equal(again.indices, merged.indices)


def test_merge_topk_agrees_with_torch_topk():
    """NaN above +inf, ties to the lower row: what torch.topk / a stable sort of one row gives."""
    values = torch.tensor([[1.0, NAN, INF, NAN, 1.0, -INF, 2.0]])
    rows = torch.arange(7)[None, :]
    merged = combine.merge_topk(values, rows, 7)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    assert torch.equal(merged.indices, order)
    assert merged.indices.tolist() == [[1, 3, 2, 6, 0, 4, 5]]
