"""bfloat16 / float16 features (a network's output under ``torch.autocast``): the op computes in
float32 and returns the gradient in the features' dtype, and is at least as accurate as plain
PyTorch computing in those dtypes."""

from __future__ import annotations

import pytest
import torch
from problems import make_problem
from torch.nn import functional as F

import snca_ext
from snca_ext import reference

LOW = [torch.bfloat16, torch.float16]
T = 0.05


def _backends(backend_device):
    return [backend_device, ("reference", "cpu")]


@pytest.mark.parametrize("features_dtype", LOW, ids=str)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_features_are_computed_in_float32(backend_device, features_dtype, bank_dtype):
    features, indices, bank, bank_labels = make_problem(6, 1100, 32, classes=5, dtype=torch.float32, seed=31)
    features, bank = features.to(features_dtype), bank.to(bank_dtype)
    for backend, _ in _backends(backend_device):
        low = features.clone().requires_grad_()
        loss = snca_ext.snca_loss(low, indices, bank, bank_labels, T, backend=backend)
        (grad,) = torch.autograd.grad(loss, low)
        as_float = features.float().requires_grad_()
        expected = snca_ext.snca_loss(as_float, indices, bank, bank_labels, T, backend=backend)
        (expected_grad,) = torch.autograd.grad(expected, as_float)
        assert loss.dtype == torch.float32 and torch.equal(loss, expected), backend
        assert grad.dtype == features_dtype and torch.equal(grad, expected_grad.to(features_dtype)), backend
        stats = snca_ext.snca_stats(features, indices, bank, bank_labels, T, topk=5, backend=backend)
        assert stats.lse_same.dtype == stats.topk_values.dtype == torch.float32


@pytest.mark.parametrize("features_dtype", LOW, ids=str)
def test_low_precision_features_at_least_as_accurate_as_plain_pytorch(backend_device, features_dtype):
    """The rule of the style guide: against float64 on exactly the rounded inputs, our error is no
    larger than plain PyTorch's computing in the features' dtype (loss and gradient)."""
    backend, _ = backend_device
    features, indices, bank, bank_labels = make_problem(8, 2500, 64, classes=6, dtype=torch.float32, seed=32)
    features, bank = features.to(features_dtype), bank.to(features_dtype)

    def loss_and_grad(fn, x):
        x = x.clone().requires_grad_()
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.double(), grad.double()

    truth, truth_grad = loss_and_grad(
        lambda x: reference.snca_loss_reference(x, indices, bank.double(), bank_labels, T), features.double()
    )
    plain, plain_grad = loss_and_grad(
        lambda x: reference.snca_loss_reference(x, indices, bank, bank_labels, T), features
    )
    ours, ours_grad = loss_and_grad(
        lambda x: snca_ext.snca_loss(x, indices, bank, bank_labels, T, backend=backend), features
    )
    # The gradient is returned in the features' dtype: compare against the truth rounded to it.
    truth_grad_rounded = truth_grad.to(features_dtype).double()
    assert abs(ours - truth) <= abs(plain - truth) + 1e-6 * abs(truth)
    assert (ours_grad - truth_grad_rounded).abs().max() <= (plain_grad - truth_grad).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_training_step_under_autocast_on_cpu(dtype):
    """A linear embedding under ``torch.autocast("cpu")``: the features come out in ``dtype``, the
    loss and the float32 weights' gradients agree with the same step without autocast to the
    precision of ``dtype``."""
    _, indices, bank, bank_labels = make_problem(16, 600, 32, classes=4, dtype=torch.float32, seed=33)
    inputs = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    layer = torch.nn.Linear(20, 32)

    def step(autocast: bool):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            features = layer(inputs)
            assert features.dtype == (dtype if autocast else torch.float32)
            loss = snca_ext.snca_loss(F.normalize(features, dim=1), indices, bank, bank_labels, T)
        loss.backward()
        return loss.detach(), layer.weight.grad.clone()

    full_loss, full_grad = step(False)
    mixed_loss, mixed_grad = step(True)
    assert mixed_grad.dtype == torch.float32 and torch.isfinite(mixed_grad).all()
    torch.testing.assert_close(mixed_loss, full_loss, rtol=0.05, atol=0)
    assert (mixed_grad - full_grad).norm() <= 0.1 * full_grad.norm()


def test_bank_topk_of_low_precision_queries(backend_device):
    backend, _ = backend_device
    queries, indices, bank, _ = make_problem(5, 900, 16, dtype=torch.float32, seed=34)
    low = queries.bfloat16()
    values, rows = snca_ext.bank_topk(low, bank, 7, exclude=indices, backend=backend)
    expected = snca_ext.bank_topk(low.float(), bank, 7, exclude=indices, backend=backend)
    assert values.dtype == torch.float32
    assert torch.equal(values, expected.values) and torch.equal(rows, expected.indices)
