"""bfloat16 / float16 features (a network's output under ``torch.autocast``).

Two contracts, by backend. ``cpu`` and ``reference`` compute 16-bit features exactly as their
float32 values. The GPU kernels (``cuda``, ``triton``) compute them as autocast does: the bank
rounded to the features' dtype, one 16-bit product per score with float32 accumulation, float32
softmax state, the softmax weights rounded to the features' dtype for the weighted sums; they must
be at least as accurate as plain PyTorch doing exactly that (``autocast_reference``), both judged
against float64 on the 16-bit-rounded inputs. Either way the loss comes back in float32 and the
gradient in the features' dtype.

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set by conftest.py before triton is imported).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers.problems import make_problem
from torch.nn import functional as F

import snca_ext
from snca_ext import reference

LOW = [torch.bfloat16, torch.float16]
T = 0.05
EPS32 = torch.finfo(torch.float32).eps


def _backends(backend_device):
    return [backend_device, ("reference", "cpu")]


def _sixteen_bit_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs with a 16-bit path: the GPU backends on a GPU, and the Triton
    kernel in the interpreter on the CPU."""
    if torch.cuda.is_available():
        return [(b, "cuda") for b in snca_ext.available_backends("cuda") if b in ("cuda", "triton")]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [("triton", "cpu")] if interpreted and "triton" in snca_ext.available_backends("cpu") else []


SIXTEEN_BIT_CASES = _sixteen_bit_cases()


@pytest.mark.parametrize("features_dtype", LOW, ids=str)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_features_are_computed_in_float32(backend_device, features_dtype, bank_dtype):
    """cpu and reference: exactly the float32 computation of the 16-bit values."""
    if backend_device[1] == "cuda":
        pytest.skip("the GPU kernels hold the 16-bit contract (test_sixteen_bit_path_*)")
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


def autocast_reference(features, indices, bank, bank_labels, labels, temperature):
    """(lse_same, lse_other, loss, gradient) as plain PyTorch computes them under autocast in the
    features' dtype: 16-bit operands with float32 accumulation (a product of two 16-bit values is
    exact in float32, so float32 matmuls of the rounded values are those MMAs), float32 softmax
    and log-sum-exp, the weighted sums as ``P.to(dt) @ M.to(dt)``. Loss with reduction "mean"."""
    dt = features.dtype
    bank16 = bank.to(dt).float()
    logits = (features.float() @ bank16.T) / temperature
    same = labels[:, None] == bank_labels[None, :]
    own = torch.arange(bank.shape[0], device=bank.device)[None, :] == indices[:, None]
    eligible = ~own
    lse_same = logits.masked_fill(~(same & eligible), -torch.inf).logsumexp(dim=1)
    lse_other = logits.masked_fill(~(~same & eligible), -torch.inf).logsumexp(dim=1)
    lse_all = torch.logaddexp(lse_same, lse_other)
    has_positive = torch.isfinite(lse_same)
    loss = torch.where(has_positive, lse_all - lse_same, 0.0).sum() / features.shape[0]
    p_all = torch.exp(logits - lse_all[:, None]).masked_fill(~eligible, 0.0)
    p_same = torch.exp(logits - lse_same[:, None]).masked_fill(~(same & eligible), 0.0).nan_to_num(0.0)
    weighted_all = p_all.to(dt).float() @ bank16
    weighted_same = p_same.to(dt).float() @ bank16
    grad = (weighted_all - weighted_same) / temperature / features.shape[0]
    grad = torch.where(has_positive[:, None], grad, 0.0)
    return lse_same, lse_other, loss, grad


def _sixteen_bit_problem(features_dtype, bank_dtype, device):
    """Awkward sizes (B = 7, N = 601: no multiple of any tile, D = 40 padded to 64) and a query
    whose class has no bank row (no positive: loss 0, zero gradient)."""
    features, indices, bank, bank_labels = make_problem(
        7, 601, 40, classes=5, dtype=torch.float32, device=device, seed=35
    )
    labels = bank_labels[indices].clone()
    labels[3] = 9
    return features.to(features_dtype), indices, bank.to(bank_dtype), bank_labels, labels


@pytest.mark.parametrize(("backend", "device"), SIXTEEN_BIT_CASES, ids=lambda v: v)
@pytest.mark.parametrize("temperature", [0.05, 0.005])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("features_dtype", LOW, ids=str)
def test_sixteen_bit_path_at_least_as_accurate_as_autocast(
    backend, device, features_dtype, bank_dtype, temperature
):
    """lse, loss and gradient against float64 on the 16-bit-rounded inputs: no worse than plain
    PyTorch under autocast (``autocast_reference``) plus float32 noise."""
    check_sixteen_bit_contract(backend, device, features_dtype, bank_dtype, temperature)


@pytest.mark.skipif(
    SIXTEEN_BIT_CASES != [("triton", "cpu")], reason="the interpreter stands in for an sm_90 device"
)
@pytest.mark.parametrize("temperature", [0.05, 0.005])
@pytest.mark.parametrize(
    ("features_dtype", "bank_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=str,
)
def test_sixteen_bit_path_sm90_tiles(monkeypatch, features_dtype, bank_dtype, temperature):
    """The gradient's tile on sm_90 (128 queries x 32 rows, for warpgroup MMAs) holds the same
    contract: the interpreter runs it with the device reported as sm_90."""
    from snca_ext.triton import configs, launch

    assert configs.kernel_config(40, "bf16", "bf16", True, True, 0, "16bit", 90).block_b == 128
    monkeypatch.setattr(launch, "device_arch", lambda device: 90)
    check_sixteen_bit_contract("triton", "cpu", features_dtype, bank_dtype, temperature)


def check_sixteen_bit_contract(backend, device, features_dtype, bank_dtype, temperature):
    features, indices, bank, bank_labels, labels = _sixteen_bit_problem(features_dtype, bank_dtype, device)
    x = features.clone().requires_grad_()
    loss = snca_ext.snca_loss(x, indices, bank, bank_labels, temperature, labels=labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    stats = snca_ext.snca_stats(
        features, indices, bank, bank_labels, temperature, labels=labels, backend=backend
    )
    assert loss.dtype == stats.lse_same.dtype == torch.float32 and grad.dtype == features_dtype

    # Ground truth: float64 on the values the kernel multiplies (the bank in the features' dtype).
    bank_rounded = bank.to(features_dtype).double()
    x64 = features.double().requires_grad_()
    gt_loss = reference.snca_loss_reference(
        x64, indices, bank_rounded, bank_labels, temperature, labels=labels
    )
    (gt_grad,) = torch.autograd.grad(gt_loss, x64)
    gt_same, gt_other, _, _ = reference.snca_stats_reference(
        features.double(), indices, bank_rounded, bank_labels, temperature, labels=labels
    )
    ref_same, ref_other, ref_loss, ref_grad = autocast_reference(
        features, indices, bank, bank_labels, labels, temperature
    )

    # Scores reach 1/T: a few float32 ulps of 1/T is any float32 accumulation's noise.
    tol = 4 * EPS32 / temperature
    for ours, ref, gt in ((stats.lse_same, ref_same, gt_same), (stats.lse_other, ref_other, gt_other)):
        finite = torch.isfinite(gt)
        assert torch.equal(ours.double()[~finite], gt[~finite])
        err, ref_err = (ours.double() - gt)[finite].abs(), (ref.double() - gt)[finite].abs()
        assert (err <= ref_err + tol).all(), (err, ref_err)
    assert abs(loss.double() - gt_loss) <= abs(ref_loss.double() - gt_loss) + tol
    # The gradient comes back in the features' dtype: both rounded to it before they are judged.
    # The weights' 16-bit rounding errors fall differently in a running-max stream than in a
    # normalised softmax, so the rule is on the largest error (FlashAttention's), not per element.
    grad_err = (grad.double() - gt_grad).abs().max()
    ref_grad_err = (ref_grad.to(features_dtype).double() - gt_grad).abs().max()
    assert grad_err <= ref_grad_err + tol * gt_grad.abs().max(), (grad_err, ref_grad_err)
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))  # no positive: no gradient


@pytest.mark.parametrize(("backend", "device"), SIXTEEN_BIT_CASES, ids=lambda v: v)
@pytest.mark.parametrize("features_dtype", LOW, ids=str)
def test_sixteen_bit_path_rounds_the_bank_to_the_features_dtype(backend, device, features_dtype):
    """A float32 bank is rounded to the features' dtype, as autocast rounds a matmul's operands:
    the result is the one with the bank stored in that dtype up to float32 accumulation noise
    (not rounding it would move the scores by ~2^-9 / T), and the top-k returns the
    float32-accumulated scores of the 16-bit products."""
    features, indices, bank, bank_labels, labels = _sixteen_bit_problem(features_dtype, torch.float32, device)
    stats = snca_ext.snca_stats(
        features, indices, bank, bank_labels, 0.05, labels=labels, topk=6, backend=backend
    )
    stored = bank.to(features_dtype)
    expected = snca_ext.snca_stats(
        features, indices, stored, bank_labels, 0.05, labels=labels, topk=6, backend=backend
    )
    for got, want in zip(stats[:3], expected[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=4 * EPS32 / 0.05)
    assert torch.equal(stats.topk_indices, expected.topk_indices)
    gt = reference.snca_stats_reference(
        features.double(), indices, bank.to(features_dtype).double(), bank_labels, 0.05, labels=labels, topk=6
    )
    torch.testing.assert_close(stats.topk_indices, gt[3])
    torch.testing.assert_close(stats.topk_values.double(), gt[2], rtol=0, atol=4 * EPS32)


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
