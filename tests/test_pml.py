"""The pytorch-metric-learning (PML) interface, against the real PML package: ``BankKNN`` as the
``knn_func`` of PML's ``AccuracyCalculator``, and ``SNCALoss``'s PML forward in its three modes."""

from __future__ import annotations

import subprocess
import sys

import faiss
import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import NCALoss
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN
from torch.nn import functional as F

import snca_ext
from snca_ext import BankKNN, SNCALoss, momentum_update

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _clustered(rows: int, dim: int, classes: int, seed: int, spread: float = 1.5):
    """L2-normalised features around one random centre per class (so the metrics are neither 0
    nor 1) and their labels; every class has at least two rows."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    labels = labels[torch.randperm(rows, generator=generator)]
    centres = torch.randn(classes, dim, generator=generator)
    features = centres[labels] + spread * torch.randn(rows, dim, generator=generator)
    return F.normalize(features, dim=1), labels


def _snca_loss_float64(queries, own_rows, bank, bank_labels, labels, temperature, margin=0.0):
    """The SNCA loss computed directly in float64 with the whole B x N matrix: the bank side is a
    constant, the own row (``own_rows[i]``, -1 for none) left out, a row without a positive 0."""
    logits = queries.double() @ bank.detach().double().T / temperature
    rows = torch.arange(queries.shape[0])
    own = torch.zeros_like(logits, dtype=torch.bool)
    has_row = own_rows >= 0
    own[rows[has_row], own_rows[has_row]] = True
    same = (labels[:, None] == bank_labels[None, :]) & ~own
    other = (labels[:, None] != bank_labels[None, :]) & ~own
    lse_same = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    lse_other = torch.logsumexp(logits.masked_fill(~other, float("-inf")), dim=1)
    per_row = F.softplus(lse_other - lse_same + margin)
    return torch.where(same.any(dim=1), per_row, torch.zeros_like(per_row)).sum() / queries.shape[0]


# ----------------------------------------------------------------------------- knn_func


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_knn_func_finds_the_neighbours_of_pmls_faiss_search(ref_includes_query):
    """The same rows, in the same order, as PML's default search (faiss, Euclidean) on normalised
    features; the values are the inner products (squared distance = 2 - 2 x inner product)."""
    features, _ = _clustered(300, 24, 7, seed=0)
    query, reference = features[:90], features if ref_includes_query else features[90:]
    values, rows = BankKNN()(query, 12, reference, ref_includes_query)
    distances, faiss_rows = FaissKNN()(query, 12, reference, ref_includes_query)
    assert rows.shape == (90, 12)
    assert torch.equal(rows, faiss_rows.long())
    torch.testing.assert_close(2 - 2 * values, distances, rtol=0, atol=2e-6)
    if ref_includes_query:
        assert not bool((rows == torch.arange(90)[:, None]).any()), "a query found itself"


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_knn_func_distances_are_pmls_inner_product_search(ref_includes_query):
    """On features that are not normalised, the same rows and values as PML's faiss search on an
    inner-product index: the "distances" are similarities, largest first."""
    features, _ = _clustered(200, 16, 5, seed=1)
    features = features * torch.linspace(0.5, 2.0, 200)[:, None]
    query, reference = features[:50], features if ref_includes_query else features[50:]
    values, rows = BankKNN()(query, 9, reference, ref_includes_query)
    similarities, faiss_rows = FaissKNN(index_init_fn=faiss.IndexFlatIP)(
        query, 9, reference, ref_includes_query
    )
    assert torch.equal(rows, faiss_rows.long())
    torch.testing.assert_close(values, similarities, rtol=1e-6, atol=1e-6)


def _metrics(knn_func, *args, **kwargs) -> dict[str, float]:
    calculator = AccuracyCalculator(
        include=METRICS, k="max_bin_count", device=torch.device("cpu"), knn_func=knn_func
    )
    return calculator.get_accuracy(*args, **kwargs)


@pytest.mark.parametrize("reference", ["query itself", "separate", "including the query"])
def test_accuracy_calculator_metrics_equal_those_of_pmls_default_search(reference):
    """P@1, R-precision and MAP@R through ``knn_func=BankKNN()`` equal PML's with its own search."""
    features, labels = _clustered(400, 24, 8, seed=2)
    query, query_labels = features[:150], labels[:150]
    if reference == "query itself":  # PML then sets ref_includes_query=True
        args, kwargs = (query, query_labels), {}
    elif reference == "separate":
        args, kwargs = (query, query_labels, features[150:], labels[150:]), {}
    else:
        args, kwargs = (query, query_labels, features, labels), {"ref_includes_query": True}
    ours = _metrics(BankKNN(), *args, **kwargs)
    theirs = _metrics(None, *args, **kwargs)
    assert set(ours) == set(METRICS)
    for name in METRICS:
        assert 0.05 < theirs[name] < 0.95, f"{name}={theirs[name]}: the problem is too easy or too hard"
        assert ours[name] == pytest.approx(theirs[name], rel=1e-12, abs=1e-12), name


def test_importing_the_core_loads_neither_pml_nor_faiss():
    code = (
        "import sys, snca_ext; print([m for m in ('pytorch_metric_learning', 'faiss') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- loss, three modes


def test_loss_against_the_batch_leaves_each_own_row_out():
    """No bank, no ref_emb: each embedding against the others of the batch; the value is PML's
    NCALoss with the same logits (inner product / T), the gradient the query side's."""
    temperature, margin = 0.1, 0.3
    embeddings, labels = _clustered(40, 12, 6, seed=3)
    ours_input = embeddings.clone().requires_grad_(True)
    ours = SNCALoss(temperature=temperature, margin=margin)(ours_input, labels)
    ours.backward()
    expected_input = embeddings.double().requires_grad_(True)
    expected = _snca_loss_float64(
        expected_input, torch.arange(40), embeddings, labels, labels, temperature, margin
    )
    expected.backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_input.grad.double(), expected_input.grad, rtol=1e-4, atol=1e-6)
    op = snca_ext.snca_loss(embeddings, torch.arange(40), embeddings, labels, temperature, margin=margin)
    torch.testing.assert_close(ours, op, rtol=0, atol=0)
    pml_nca = NCALoss(softmax_scale=1 / temperature, distance=DotProductSimilarity())
    without_margin = SNCALoss(temperature=temperature)(embeddings, labels)
    torch.testing.assert_close(without_margin, pml_nca(embeddings, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("own_rows", [False, True])
def test_loss_against_ref_emb(own_rows):
    """ref_emb / ref_labels as the bank (no gradient into them); with ``indices``, the embeddings'
    own rows in ref_emb are left out."""
    temperature = 0.07
    memory, memory_labels = _clustered(90, 12, 5, seed=4)
    embeddings, labels = _clustered(16, 12, 5, seed=5)
    indices = torch.randperm(90, generator=torch.Generator().manual_seed(6))[:16] if own_rows else None
    if own_rows:  # the user's memory holds the batch (as a cross-batch memory does), own rows marked
        memory[indices], memory_labels[indices] = embeddings, labels
    ref_emb = memory.clone().requires_grad_(True)
    ours_input = embeddings.clone().requires_grad_(True)
    ours = SNCALoss(temperature=temperature)(ours_input, labels, indices, ref_emb, memory_labels)
    ours.backward()
    assert ref_emb.grad is None
    rows = indices if own_rows else torch.full((16,), -1)
    expected_input = embeddings.double().requires_grad_(True)
    expected = _snca_loss_float64(expected_input, rows, memory, memory_labels, labels, temperature)
    expected.backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_input.grad.double(), expected_input.grad, rtol=1e-4, atol=1e-6)
    op = snca_ext.snca_loss(embeddings, rows, memory, memory_labels, temperature, labels=labels)
    torch.testing.assert_close(ours, op, rtol=0, atol=0)


def test_loss_with_its_own_bank_is_snca_and_updates_after_backward():
    temperature, momentum = 0.1, 0.5
    train_features, train_labels = _clustered(120, 12, 6, seed=7)
    criterion = SNCALoss(12, train_labels, temperature, momentum)
    criterion.memory.fill(train_features)
    indices = torch.randperm(120, generator=torch.Generator().manual_seed(8))[:20]
    embeddings = F.normalize(train_features[indices] + 0.1 * torch.randn(20, 12), dim=1)
    bank_before = criterion.memory.bank.clone()
    # Without labels the bank's labels of the rows are the queries' classes (no grad: no update).
    with torch.no_grad():
        without_labels = criterion(embeddings, indices=indices)
    ours_input = embeddings.clone().requires_grad_(True)
    ours = criterion(ours_input, train_labels[indices], indices)
    assert torch.equal(criterion.memory.bank, bank_before), "the bank changed before backward"
    ours.backward()
    expected_input = embeddings.double().requires_grad_(True)
    expected = _snca_loss_float64(
        expected_input, indices, bank_before, train_labels, train_labels[indices], temperature
    )
    expected.backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_input.grad.double(), expected_input.grad, rtol=1e-4, atol=1e-6)
    momentum_update(bank_before, indices, embeddings, momentum)
    torch.testing.assert_close(criterion.memory.bank, bank_before, rtol=0, atol=0)
    torch.testing.assert_close(without_labels, ours.detach(), rtol=0, atol=0)


def test_loss_refuses_what_it_cannot_mean():
    embeddings, labels = _clustered(8, 4, 2, seed=9)
    with_bank = SNCALoss(4, torch.arange(30) % 2, 0.1)
    with pytest.raises(ValueError, match=r"indices .* must be given to a loss with a memory bank"):
        with_bank(embeddings, torch.arange(8))  # the earlier (features, indices) call
    with pytest.raises(TypeError, match="miner's indices_tuple"):
        SNCALoss()(embeddings, labels, (torch.arange(3), torch.arange(3), torch.arange(3)))
    with pytest.raises(ValueError, match="labels must be given"):
        SNCALoss()(embeddings)
    with pytest.raises(ValueError, match="ref_emb and ref_labels must be given together"):
        SNCALoss()(embeddings, labels, ref_emb=embeddings)
    with pytest.raises(ValueError, match="indices are bank rows"):
        SNCALoss()(embeddings, labels, torch.arange(8))
    with pytest.raises(ValueError, match="dim and labels must be given together"):
        SNCALoss(4)


@pytest.mark.parametrize("with_bank", [False, True], ids=["batch", "own bank"])
def test_loss_trains_in_a_pml_style_loop(with_bank):
    """The loop of PML's examples (embeddings = model(data); loss = loss_func(embeddings, labels,
    ...); backward; step) with our loss: the held-out P@1 from AccuracyCalculator and BankKNN
    rises well above the untrained network's."""
    torch.manual_seed(0)
    inputs, labels = _clustered(480, 20, 6, seed=10, spread=2.5)
    train_inputs, train_labels, test_inputs, test_labels = (
        inputs[:320],
        labels[:320],
        inputs[320:],
        labels[320:],
    )
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    loss_func = SNCALoss(8, train_labels, 0.1, 0.5) if with_bank else SNCALoss(temperature=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    calculator = AccuracyCalculator(
        include=("precision_at_1",), device=torch.device("cpu"), knn_func=BankKNN()
    )

    def precision_at_1() -> float:
        with torch.no_grad():
            embed = lambda x: F.normalize(model(x), dim=1)  # noqa: E731
            result = calculator.get_accuracy(
                embed(test_inputs), test_labels, embed(train_inputs), train_labels
            )
        return result["precision_at_1"]

    before = precision_at_1()
    generator = torch.Generator().manual_seed(11)
    for _epoch in range(20):
        for batch in torch.randperm(320, generator=generator).split(32):
            optimizer.zero_grad()
            embeddings = F.normalize(model(train_inputs[batch]), dim=1)
            loss = loss_func(embeddings, train_labels[batch], batch if with_bank else None)
            loss.backward()
            optimizer.step()
    after = precision_at_1()
    assert after > before + 0.2, f"P@1 {before:.3f} -> {after:.3f}"
