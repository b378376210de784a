"""The non-finite contract (snca_ext/reference.py's docstring) on every backend that runs on CPU.

One small float64 problem, then NaN, +inf or -inf written into a query's feature, a same-class
bank row, an other-class bank row, or the query's own (excluded) bank row. Every backend must give
what the float64 reference gives (NaN where NaN, the same infinities, the same top-k rows), and
the reference itself is checked against the contract first, so that the two cannot agree on a
wrong answer.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import snca_ext
from snca_ext import reference


def _cpu_backends() -> list[str]:
    """Every backend that runs on CPU tensors here, named one by one. 'triton' runs in Triton's
    interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU); it follows the contract
    once the Triton kernels do (branch gpu-triton), and is listed here so that it is tested."""
    available = snca_ext.available_backends("cpu")
    return [b for b in ("reference", "cpu", "triton") if b in available]


BACKENDS = _cpu_backends()
VALUES = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}
PLACES = ("feature", "same_row", "other_row", "own_row")
# (features dtype, bank dtype): the CPU kernel's float64 and float32 paths (different row kernels)
# and a bfloat16 bank (converted tile by tile); the reference runs on the same values in float64.
PRECISIONS = {
    "float64": (torch.float64, torch.float64),
    "float32": (torch.float32, torch.float32),
    "bf16bank": (torch.float32, torch.bfloat16),
}
B, N, D, K, T = 4, 40, 8, 5, 0.5
QUERY = 1  # the query whose feature, own row or classes the placements are about
COLUMN = 2  # the feature component that receives the value


def _problem(classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(B, D, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(N, D, generator=generator, dtype=torch.float64), dim=1)
    bank_labels = torch.arange(N) % classes
    indices = torch.tensor([0, 4, 8, 12])
    # Query QUERY's component COLUMN is positive, another query's is negative: the same inf in a
    # bank row then gives +inf to one score and -inf to the other.
    features[QUERY, COLUMN] = 0.5
    features[0, COLUMN] = -0.5
    return features, indices, bank, bank_labels


def _place(place: str, value: float, classes: int = 3):
    """The problem with ``value`` at ``place``; also returns the bank row touched (or -1)."""
    features, indices, bank, bank_labels = _problem(classes)
    label = int(bank_labels[indices[QUERY]])
    own = {int(i) for i in indices}
    if place == "feature":
        features[QUERY, COLUMN] = value
        return (features, indices, bank, bank_labels), -1
    if place == "own_row":
        row = int(indices[QUERY])
    else:
        same = place == "same_row"
        row = next(j for j in range(N) if j not in own and (int(bank_labels[j]) == label) == same)
    bank[row, COLUMN] = value
    return (features, indices, bank, bank_labels), row


def _stats(backend, features, indices, bank, bank_labels):
    features = features.clone().requires_grad_()
    lse_same, lse_other, values, rows = snca_ext.snca_stats(
        features, indices, bank, bank_labels, T, topk=K, backend=backend
    )
    upstream = torch.linspace(0.5, 1.5, B, dtype=features.dtype)
    total = (upstream * lse_same).sum() + (upstream.flip(0) * lse_other).sum()
    finite_values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    total = total + (finite_values * torch.linspace(-1.0, 1.0, K, dtype=features.dtype)).sum()
    (grad,) = torch.autograd.grad(total, features)
    return lse_same.detach(), lse_other.detach(), values.detach(), rows, grad


def _loss(backend, features, indices, bank, bank_labels, margin=0.3):
    features = features.clone().requires_grad_()
    loss = snca_ext.snca_loss(
        features, indices, bank, bank_labels, T, margin=margin, reduction="none", backend=backend
    )
    (grad,) = torch.autograd.grad(loss.sum(), features)
    return loss.detach(), grad


def _close(actual, expected, what, tolerance=1e-9):
    """Equal, NaN where NaN and the same infinities; finite values within ``tolerance``."""
    if actual.is_floating_point():
        actual = actual.double()
    torch.testing.assert_close(
        actual, expected, rtol=tolerance, atol=tolerance, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _in_precision(inputs, precision):
    """The inputs in ``precision`` for the backend, and the same values in float64 for the
    reference."""
    features, indices, bank, bank_labels = inputs
    feature_dtype, bank_dtype = PRECISIONS[precision]
    features, bank = features.to(feature_dtype), bank.to(bank_dtype)
    return (features, indices, bank, bank_labels), (features.double(), indices, bank.double(), bank_labels)


def _reference_stats(features, indices, bank, bank_labels):
    return _stats("reference", features, indices, bank, bank_labels)


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
@pytest.mark.parametrize("place", ["same_row", "other_row"])
def test_reference_follows_the_contract_for_bank_rows(place, value):
    clean = _reference_stats(*_problem())
    inputs, row = _place(place, VALUES[value])
    features, indices, bank, bank_labels = inputs
    lse_same, lse_other, _, _, grad = _reference_stats(*inputs)
    # The same problem without the row: what a -inf score must leave (it contributes nothing).
    keep = torch.arange(N) != row
    without = _reference_stats(features, indices - (indices > row).long(), bank[keep], bank_labels[keep])
    for q in range(B):
        same = int(bank_labels[row]) == int(bank_labels[indices[q]])
        touched, untouched = (lse_same, lse_other) if same else (lse_other, lse_same)
        clean_untouched, removed = (clean[1], without[0]) if same else (clean[0], without[1])
        score = float(features[q] @ bank[row])
        # The group without the row is unaffected; the group with it is the IEEE lse.
        _close(untouched[q], clean_untouched[q], f"{place} q{q} other group")
        if score != score:
            assert torch.isnan(touched[q]) and torch.isnan(grad[q]).all(), (place, q)
        elif score == float("inf"):
            assert touched[q] == float("inf") and torch.isnan(grad[q]).all(), (place, q)
        else:
            assert score == float("-inf"), score
            _close(touched[q], removed[q], f"{place} q{q} group with a -inf score")
            _close(grad[q], without[4][q], f"{place} q{q} gradient with a -inf score")


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_reference_ignores_the_own_row(value):
    clean = _reference_stats(*_problem())
    inputs, _ = _place("own_row", VALUES[value])
    ours = _reference_stats(*inputs)
    for got, want, name in zip(ours, clean, ("lse_same", "lse_other", "values", "rows", "grad"), strict=True):
        _close(got[QUERY], want[QUERY], f"own row, query's {name}")
    clean_loss, clean_grad = _loss("reference", *_problem())
    loss, grad = _loss("reference", *inputs)
    _close(loss[QUERY], clean_loss[QUERY], "own row, loss")
    _close(grad[QUERY], clean_grad[QUERY], "own row, loss gradient")


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_reference_feature_affects_only_its_query(value):
    clean = _reference_stats(*_problem())
    inputs, _ = _place("feature", VALUES[value])
    ours = _reference_stats(*inputs)
    others = [q for q in range(B) if q != QUERY]
    for got, want, name in zip(ours, clean, ("lse_same", "lse_other", "values", "rows", "grad"), strict=True):
        _close(got[others], want[others], f"feature, other queries' {name}")
    scores = inputs[0][QUERY] @ inputs[2].T
    assert not torch.isfinite(scores).any()
    if value == "nan":
        assert torch.isnan(ours[0][QUERY]) and torch.isnan(ours[1][QUERY])
        # NaN ranks above everything; ties go to the lower row, the own row is skipped.
        assert ours[3][QUERY].tolist() == [j for j in range(N) if j != int(inputs[1][QUERY])][:K]


def test_reference_loss_follows_the_lses():
    nan, inf = float("nan"), float("inf")
    lse_same = torch.tensor([nan, 1.0, inf, inf, float("-inf"), 1.0], dtype=torch.float64)
    lse_other = torch.tensor([1.0, inf, 1.0, inf, nan, nan], dtype=torch.float64)
    loss = reference.loss_from_lse_reference(lse_same, lse_other, 0.2, "none")
    expected = torch.tensor([nan, inf, 0.0, nan, 0.0, nan], dtype=torch.float64)
    _close(loss, expected, "loss from lses")
    _close(snca_ext.loss_from_lse(lse_same, lse_other, 0.2, "none"), expected, "ops.loss_from_lse")


def test_reference_topk_ranks_nan_first_and_pads_last():
    dots = torch.tensor([[1.0, float("nan"), float("inf"), float("-inf"), float("nan"), 2.0]])
    exclude = torch.tensor([[False, False, False, False, False, True]])
    values, rows = reference.topk_reference(dots, exclude, 6)
    assert rows.tolist() == [[1, 4, 2, 0, 3, -1]]
    torch.testing.assert_close(
        values,
        torch.tensor([[float("nan"), float("nan"), float("inf"), 1.0, float("-inf"), float("-inf")]]),
        equal_nan=True,
    )


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_stats_and_gradient_match_reference(backend, precision, place, value):
    ours_in, reference_in = _in_precision(_place(place, VALUES[value])[0], precision)
    ours = _stats(backend, *ours_in)
    expected = _reference_stats(*reference_in)
    tolerance = 1e-9 if precision == "float64" else 1e-5
    for got, want, name in zip(
        ours, expected, ("lse_same", "lse_other", "values", "rows", "grad"), strict=True
    ):
        _close(got, want, f"{backend} {precision} {place}={value} {name}", tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_loss_and_gradient_match_reference(backend, precision, place, value):
    ours_in, reference_in = _in_precision(_place(place, VALUES[value])[0], precision)
    loss, grad = _loss(backend, *ours_in)
    expected_loss, expected_grad = _loss("reference", *reference_in)
    tolerance = 1e-9 if precision == "float64" else 1e-5
    _close(loss, expected_loss, f"{backend} {precision} {place}={value} loss", tolerance)
    _close(grad, expected_grad, f"{backend} {precision} {place}={value} gradient", tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_bank_topk_matches_reference(backend, place, value):
    features, indices, bank, _ = _place(place, VALUES[value])[0]
    queries = features.clone().requires_grad_()
    values, rows = snca_ext.bank_topk(queries, bank, K, exclude=indices, backend=backend)
    ref_queries = features.clone().requires_grad_()
    want_values, want_rows = reference.bank_topk_reference(ref_queries, bank, K, exclude=indices)
    _close(values.detach(), want_values.detach(), f"{backend} {place}={value} values")
    _close(rows, want_rows, f"{backend} {place}={value} rows")
    upstream = torch.linspace(-1.0, 1.0, K, dtype=torch.float64).expand(B, K)
    (grad,) = torch.autograd.grad(values, queries, upstream)
    (want_grad,) = torch.autograd.grad(want_values, ref_queries, upstream)
    _close(grad, want_grad, f"{backend} {place}={value} gradient")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("place", ["same_row", "own_row", "feature"])
@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_cpu_bank_topk_bfloat16_filter_keeps_nonfinite_rows(monkeypatch, bank_dtype, place, value):
    """float32 queries take the bfloat16 ranking filter of the CPU kernel (forced on here, where
    the processor may lack AVX512-BF16); it must not drop a NaN or inf row."""
    monkeypatch.setenv("SNCA_EXT_CPU_TOPK_FILTER", "1")
    features, indices, bank, _ = _place(place, VALUES[value])[0]
    queries, bank = features.float(), bank.to(bank_dtype)
    # Enough rows that the filter holds k candidates and starts skipping.
    more = F.normalize(torch.randn(600, D, generator=torch.Generator().manual_seed(1)), dim=1)
    bank = torch.cat([bank, more.to(bank_dtype)])
    values, rows = snca_ext.bank_topk(queries, bank, K, exclude=indices, backend="cpu")
    want_values, want_rows = reference.bank_topk_reference(
        queries.double(), bank.double(), K, exclude=indices
    )
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(values.double(), want_values, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
def test_many_classes_match_reference(backend, precision, place, value):
    """20 classes: one same-class row in 20, so the CPU kernel adds the same-class rows one by one
    instead of through the dense GEMM (its sparse path), and the query's same-class group is the
    placed row alone."""
    ours_in, reference_in = _in_precision(_place(place, VALUES[value], classes=20)[0], precision)
    ours = _stats(backend, *ours_in)
    expected = _reference_stats(*reference_in)
    tolerance = 1e-9 if precision == "float64" else 1e-5
    for got, want, name in zip(
        ours, expected, ("lse_same", "lse_other", "values", "rows", "grad"), strict=True
    ):
        _close(got, want, f"{backend} {precision} {place}={value} {name}", tolerance)
    loss, grad = _loss(backend, *ours_in)
    expected_loss, expected_grad = _loss("reference", *reference_in)
    _close(loss, expected_loss, f"{backend} {precision} {place}={value} loss", tolerance)
    _close(grad, expected_grad, f"{backend} {precision} {place}={value} loss gradient", tolerance)
