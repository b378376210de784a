"""Second derivatives: exact where a backend computes them, a clear error where it does not.

The reference is plain PyTorch and differentiates twice (gradgradcheck in float64): it is the
oracle. The fused backends keep only the softmax-weighted means for the backward, so the
gradient of snca_loss / snca_stats cannot be differentiated again: it must raise, never return the
wrong numbers that treating those means as constants gives. bank_topk's gradient (a gather of
the k selected rows, linear in the upstream gradient) differentiates exactly on every backend.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import snca_ext


def _cpu_backends() -> list[str]:
    """Every backend that runs on CPU tensors here, named one by one ('triton' under Triton's
    interpreter, TRITON_INTERPRET=1, set by conftest.py without a GPU)."""
    available = snca_ext.available_backends("cpu")
    return [b for b in ("reference", "cpu", "triton") if b in available]


BACKENDS = _cpu_backends()
FUSED = [b for b in BACKENDS if b != "reference"]
T = 0.5
ONCE = "snca_ext ops are once differentiable"


def _problem(batch=3, rows=23, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)
    bank_labels = torch.arange(rows) % 3
    indices = torch.arange(batch) * 2
    return features.requires_grad_(), indices, bank, bank_labels


def test_reference_loss_and_stats_differentiate_twice():
    features, indices, bank, bank_labels = _problem()

    def loss(x):
        return snca_ext.snca_loss(x, indices, bank, bank_labels, T, margin=0.3, backend="reference")

    def stats(x):
        lse_same, lse_other, values, _ = snca_ext.snca_stats(
            x, indices, bank, bank_labels, T, topk=4, backend="reference"
        )
        return lse_same, lse_other, values

    assert torch.autograd.gradgradcheck(loss, (features,))
    assert torch.autograd.gradgradcheck(stats, (features,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_topk_differentiates_twice(backend):
    # Well-separated inner products, so that gradgradcheck's perturbations keep the same rows.
    features, _, bank, _ = _problem(rows=9, dim=9)
    bank = torch.eye(9, dtype=torch.float64) * torch.arange(1, 10, dtype=torch.float64)[:, None]
    exclude = torch.tensor([0, -1, 8])

    def topk(x):
        return snca_ext.bank_topk(x, bank, 4, exclude=exclude, backend=backend)[0]

    assert torch.autograd.gradgradcheck(topk, (features,))


@pytest.mark.parametrize("backend", FUSED)
def test_first_derivative_with_create_graph_is_right(backend):
    """create_graph=True alone is fine: the gradient is the reference's."""
    features, indices, bank, bank_labels = _problem()
    expected_in = features.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(
        snca_ext.snca_loss(features, indices, bank, bank_labels, T, backend=backend),
        features,
        create_graph=True,
    )
    (expected,) = torch.autograd.grad(
        snca_ext.snca_loss(expected_in, indices, bank, bank_labels, T, backend="reference"), expected_in
    )
    torch.testing.assert_close(grad.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_loss_second_derivative_is_refused(backend):
    features, indices, bank, bank_labels = _problem()
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, T, margin=0.3, backend=backend)
    (grad,) = torch.autograd.grad(loss, features, create_graph=True)
    with pytest.raises(RuntimeError, match=ONCE):
        torch.autograd.grad(grad.pow(2).sum(), features)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("topk", [0, 3])
def test_stats_second_derivative_is_refused_even_for_constant_upstream(backend, topk):
    """With lse_same.sum() the upstream gradient is a constant: without the refusal the gradient
    would not depend on the features at all, and a second derivative through it would silently
    come out as 0 (here, added to a term that does require grad)."""
    features, indices, bank, bank_labels = _problem()
    lse_same, _, values, _ = snca_ext.snca_stats(
        features, indices, bank, bank_labels, T, topk=topk, backend=backend
    )
    (grad,) = torch.autograd.grad(lse_same.sum() + values.sum(), features, create_graph=True)
    with pytest.raises(RuntimeError, match=ONCE):
        torch.autograd.grad(grad.pow(2).sum() + features.pow(2).sum(), features)


@pytest.mark.parametrize("backend", FUSED)
def test_ordinary_backward_is_unaffected(backend):
    features, indices, bank, bank_labels = _problem()
    snca_ext.snca_loss(features, indices, bank, bank_labels, T, backend=backend).backward()
    assert features.grad is not None and not features.grad.requires_grad
