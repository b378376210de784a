"""The fused op of every compiled backend against the float64 reference (snca_ext.reference)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers.problems import loss_errors_allowed, make_problem
from torch.nn import functional as F

import snca_ext
from snca_ext import reference

# (B, N, D): B = 1, N = 1, N off every tile size, D = 3 and 130.
SHAPES = [(1, 1, 3), (1, 700, 130), (5, 513, 3), (9, 1300, 16), (4, 2049, 130)]
TEMPERATURES = [1.0, 0.05, 0.01, 0.005]


def to64(*tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


def assert_stats_equal(ours, expected, *, rtol, atol):
    lse_same, lse_other, values, rows = ours
    torch.testing.assert_close(lse_same, expected[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(lse_other, expected[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(values, expected[2], rtol=rtol, atol=atol)
    torch.testing.assert_close(rows, expected[3])


def test_cpu_backend_is_built():
    assert "cpu" in snca_ext.available_backends("cpu"), snca_ext.backends.C_IMPORT_ERROR


@pytest.mark.skipif(
    torch.version.cuda is None
    or not os.path.exists("/usr/local/cuda/bin/nvcc")
    or os.environ.get("SNCA_EXT_BUILD_CUDA") == "0",
    reason="needs a CUDA build of torch and the CUDA toolkit at /usr/local/cuda",
)
def test_cuda_kernels_are_built_where_the_toolkit_is():
    """CI has nvcc but no GPU: the CUDA sources must still have been compiled and registered, so
    that a CUDA build break or a silently skipped CUDA build fails here."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("snca_ext::snca_forward", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("snca_ext::bank_topk", "CUDA")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_stats_float64_match_reference(backend_device, shape, temperature):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(*shape, device=device)
    k = min(5, shape[1])
    ours = snca_ext.snca_stats(features, indices, bank, bank_labels, temperature, topk=k, backend=backend)
    expected = reference.snca_stats_reference(features, indices, bank, bank_labels, temperature, topk=k)
    assert_stats_equal(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
# 4 classes: dense same-class weights; 300 classes: sparse (the CPU kernel switches strategy).
@pytest.mark.parametrize("classes", [4, 300])
def test_loss_and_gradient_float64_match_reference(backend_device, temperature, margin, reduction, classes):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(6, 1031, 130, classes=classes, device=device, seed=1)
    ours_in = features.clone().requires_grad_()
    ref_in = features.clone().requires_grad_()
    ours = snca_ext.snca_loss(
        ours_in, indices, bank, bank_labels, temperature, margin=margin, reduction=reduction, backend=backend
    )
    expected = reference.snca_loss_reference(
        ref_in, indices, bank, bank_labels, temperature, margin=margin, reduction=reduction
    )
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.rand_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, ours_in, upstream)
    (expected_grad,) = torch.autograd.grad(expected, ref_in, upstream)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-9, atol=1e-10)


def test_float32_at_least_as_accurate_as_plain_pytorch(backend_device):
    """The project's accuracy rule: |ours - gt| <= |plain PyTorch in the same dtype - gt| + tol."""
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(16, 3001, 64, classes=10, device=device, seed=2)
    for temperature in (0.05, 0.01):
        gt = reference.snca_stats_reference(features, indices, bank, bank_labels, temperature, topk=8)
        args32 = (features.float(), indices, bank.float(), bank_labels, temperature)
        ours = snca_ext.snca_stats(*args32, topk=8, backend=backend)
        plain = reference.snca_stats_reference(*args32, topk=8)
        for ours_t, plain_t, gt_t in zip(ours[:3], plain[:3], gt[:3], strict=True):
            ours_err = (ours_t.double() - gt_t).abs().max().item()
            plain_err = (plain_t.double() - gt_t).abs().max().item()
            assert ours_err <= 2 * plain_err + 2e-6 * gt_t.abs().max().item(), (ours_err, plain_err)
        torch.testing.assert_close(ours[3], gt[3])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("classes", [3, 50])
def test_low_precision_bank_at_least_as_accurate_as_plain_pytorch(backend_device, bank_dtype, classes):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(8, 2500, 128, classes=classes, device=device, seed=3)
    bank_low = bank.to(bank_dtype)
    features32 = features.float().requires_grad_()
    for temperature in (0.05, 0.01):
        ours = snca_ext.snca_loss(features32, indices, bank_low, bank_labels, temperature, backend=backend)
        (ours_grad,) = torch.autograd.grad(ours, features32)
        loss_err, loss_allowed, grad_err, grad_allowed = loss_errors_allowed(
            features, indices, bank_low, bank_labels, temperature, ours, ours_grad
        )
        assert loss_err <= loss_allowed and grad_err <= grad_allowed


def test_low_temperature_is_finite_where_the_original_overflows(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(8, 900, 32, device=device, seed=4)
    features, bank = features.float(), bank.float()
    original = reference.snca_loss_original(features, indices, bank, bank_labels, 0.005)
    assert not torch.isfinite(original)  # exp(1 / 0.005) overflows float32
    ours = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.005, backend=backend)
    gt = reference.snca_loss_reference(features.double(), indices, bank.double(), bank_labels, 0.005)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), gt, rtol=1e-4, atol=1e-4)


def test_rows_without_positive_contribute_zero_and_get_zero_gradient(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(6, 600, 8, device=device, seed=5)
    # Query 0's row is the only member of class 99; query 1 brings a class the bank lacks.
    bank_labels = bank_labels.clone()
    bank_labels[indices[0]] = 99
    indices = indices.clone()
    indices[1] = -1
    labels = bank_labels[indices.clamp(min=0)]
    labels[1] = 12345
    features = features.clone().requires_grad_()
    per_row = snca_ext.snca_loss(
        features, indices, bank, bank_labels, 0.05, labels=labels, reduction="none", backend=backend
    )
    assert per_row[0].item() == 0 and per_row[1].item() == 0
    assert (per_row[2:] > 0).all()
    mean = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.05, labels=labels, backend=backend)
    torch.testing.assert_close(mean, per_row.sum() / 6)  # the original divides by B, not by the kept rows
    (grad,) = torch.autograd.grad(mean, features)
    assert torch.isfinite(grad).all()
    assert grad[:2].abs().max().item() == 0
    expected = reference.snca_loss_reference(features, indices, bank, bank_labels, 0.05, labels=labels)
    torch.testing.assert_close(mean, expected)


def test_all_rows_of_one_class(backend_device):
    backend, device = backend_device
    features, indices, bank, _ = make_problem(5, 300, 8, device=device, seed=6)
    bank_labels = torch.zeros(300, dtype=torch.long, device=device)
    features = features.clone().requires_grad_()
    _lse_same, lse_other, _, _ = snca_ext.snca_stats(
        features, indices, bank, bank_labels, 0.1, backend=backend
    )
    assert torch.isinf(lse_other).all() and (lse_other < 0).all()
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend=backend)
    assert loss.item() == 0
    (grad,) = torch.autograd.grad(loss, features)
    assert grad.abs().max().item() == 0


def test_duplicate_indices_and_explicit_labels(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(8, 777, 16, device=device, seed=7)
    indices = indices.clone()
    indices[3] = indices[2]
    indices[5] = -1
    labels = bank_labels[indices.clamp(min=0)].clone()
    labels[5] = 2
    for margin in (0.0, 1.0):
        ours = snca_ext.snca_loss(
            features,
            indices,
            bank,
            bank_labels,
            0.07,
            margin=margin,
            labels=labels,
            reduction="none",
            backend=backend,
        )
        expected = reference.snca_loss_reference(
            features, indices, bank, bank_labels, 0.07, margin=margin, labels=labels, reduction="none"
        )
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_margin_matches_the_original_formula(backend_device):
    """margin is in logit units: P -> P e^-margin, exactly the original's p.div(exp(margin))."""
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(6, 400, 8, device=device, seed=8)
    ours = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.5, margin=0.7, backend=backend)
    original = reference.snca_loss_original(features, indices, bank, bank_labels, 0.5, margin=0.7)
    torch.testing.assert_close(ours, original, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(3, 130, 5, device=device, seed=9)
    features = features.clone().requires_grad_()

    def loss(f):
        return snca_ext.snca_loss(
            f, indices, bank, bank_labels, 0.3, margin=0.2, reduction="none", backend=backend
        )

    def stats(f):
        return snca_ext.snca_stats(f, indices, bank, bank_labels, 0.3, topk=4, backend=backend)[:3]

    def topk_values(f):
        return snca_ext.bank_topk(f, bank, 6, exclude=indices, backend=backend)[0]

    assert torch.autograd.gradcheck(loss, (features,))
    assert torch.autograd.gradcheck(stats, (features,))
    assert torch.autograd.gradcheck(topk_values, (features,))


def test_opcheck(backend_device):
    backend, device = backend_device
    if backend not in ("cpu", "cuda"):
        pytest.skip("opcheck of the Triton ops lives in tests/test_triton.py")
    features, indices, bank, bank_labels = make_problem(
        4, 600, 8, dtype=torch.float32, device=device, seed=10
    )
    labels = bank_labels[indices]
    for with_grad in (False, True):
        args = (
            features.clone().requires_grad_(with_grad),
            labels,
            indices,
            bank,
            bank_labels,
            0.1,
            with_grad,
            3,
        )
        torch.library.opcheck(torch.ops.snca_ext.snca_forward.default, args)
    torch.library.opcheck(torch.ops.snca_ext.bank_topk.default, (features, bank, 5, indices))


def test_topk_matches_torch_topk_and_breaks_ties_to_the_lower_row(backend_device):
    backend, device = backend_device
    features, _indices, bank, _bank_labels = make_problem(7, 1500, 12, device=device, seed=11)
    # Exact ties: rows 1000..1099 copy rows 0..99, and every query sees one of them as its best.
    bank = bank.clone()
    bank[1000:1100] = bank[:100]
    features = bank[torch.arange(7, device=device) * 3].clone()
    values, rows = snca_ext.bank_topk(features, bank, 10, backend=backend)
    dots = features @ bank.T
    expected_values, _ = torch.topk(dots, 10, dim=1)
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(dots.gather(1, rows), values)
    assert (rows[:, 0] == torch.arange(7, device=device) * 3).all()  # the lower of the tied pair
    assert (rows[:, 1] == torch.arange(7, device=device) * 3 + 1000).all()
    _ref_values, ref_rows = reference.bank_topk_reference(features, bank, 10)
    torch.testing.assert_close(rows, ref_rows)
    # The query's own row is skipped when excluded.
    _values_ex, rows_ex = snca_ext.bank_topk(features, bank, 10, exclude=rows[:, 0], backend=backend)
    assert not (rows_ex == rows[:, :1]).any()
    torch.testing.assert_close(rows_ex[:, 0], rows[:, 1])


@pytest.mark.parametrize("k", [0, 1, 30, 257])
def test_topk_in_float32_matches_reference(backend_device, k):
    backend, device = backend_device
    features, indices, bank, _ = make_problem(5, 2100, 32, dtype=torch.float32, device=device, seed=12)
    values, rows = snca_ext.bank_topk(features, bank, k, exclude=indices, backend=backend)
    ref_values, ref_rows = reference.bank_topk_reference(features, bank, k, exclude=indices)
    assert values.shape == (5, k) and rows.shape == (5, k)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(rows, ref_rows)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_topk_bfloat16_filter_returns_the_exact_result(monkeypatch, bank_dtype):
    """bank_topk on CPU ranks tiles with a bfloat16 GEMM and rescores survivors exactly; rows a few
    bfloat16 ulps apart must still come back exactly as the all-float32 path returns them."""
    gen = torch.Generator().manual_seed(21)
    base = F.normalize(torch.randn(40, 64, generator=gen), dim=1)
    # 60 scaled copies of each base row: similarities 1e-6 apart (relative), far below bfloat16's
    # resolution (4e-3) and well above float32's. Without the error bound the filter drops rows.
    scales = 1 + 1e-6 * (torch.randperm(2400, generator=gen).double()[:, None] - 1200)
    bank = (base.double().repeat(60, 1) * scales).to(bank_dtype)
    queries = base[:9] * torch.linspace(0.5, 3.0, 9)[:, None]  # norms other than 1 too
    exclude = torch.arange(9) * 7
    for k in (10, 50):
        # =1 forces the filter on, also on processors without AVX512-BF16 (where auto skips it).
        monkeypatch.setenv("SNCA_EXT_CPU_TOPK_FILTER", "1")
        filtered = snca_ext.bank_topk(queries, bank, k, exclude=exclude, backend="cpu")
        monkeypatch.setenv("SNCA_EXT_CPU_TOPK_FILTER", "0")
        exact = snca_ext.bank_topk(queries, bank, k, exclude=exclude, backend="cpu")
        torch.testing.assert_close(filtered[0], exact[0], rtol=1e-6, atol=1e-6)
        if bank_dtype == torch.float32:
            torch.testing.assert_close(filtered[1], exact[1])
        # (A bfloat16/float16 bank rounds many copies to one value: mathematically tied rows that
        # GEMM kernels may score an ulp apart, so only the values are compared there.)
        ref_values, _ = reference.bank_topk_reference(queries.double(), bank.double(), k, exclude=exclude)
        torch.testing.assert_close(filtered[0].double(), ref_values, rtol=1e-5, atol=1e-5)
        rescored = (queries.double() @ bank.double().T).gather(1, filtered[1])
        torch.testing.assert_close(rescored, ref_values, rtol=1e-5, atol=1e-5)


def test_topk_of_the_whole_bank_pads_the_excluded_row(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(3, 6, 4, device=device, seed=13)
    values, rows = snca_ext.bank_topk(features, bank, 6, exclude=indices, backend=backend)
    assert (rows[:, -1] == -1).all() and torch.isinf(values[:, -1]).all()
    assert all(
        sorted(r[:-1].tolist()) == sorted(set(range(6)) - {i})
        for r, i in zip(rows, indices.tolist(), strict=False)
    )
    stats = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.1, topk=6, backend=backend)
    torch.testing.assert_close(stats[3], rows)


def test_single_row_bank_has_nothing_but_the_query_itself(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(1, 1, 3, device=device)
    features = features.clone().requires_grad_()
    lse_same, lse_other, _values, rows = snca_ext.snca_stats(
        features, indices, bank, bank_labels, 0.05, topk=1, backend=backend
    )
    assert lse_same.item() == -math.inf and lse_other.item() == -math.inf
    assert rows.item() == -1
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.05, backend=backend)
    (grad,) = torch.autograd.grad(loss, features)
    assert loss.item() == 0 and grad.abs().max().item() == 0


def test_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(6, 1200, 24, device=device, seed=14)
    features_t = features.T.contiguous().T  # column-major view of the same values
    bank_strided = torch.stack([bank, bank], dim=2)[:, :, 0]  # equal to bank, column stride 2
    labels_strided = torch.stack([bank_labels, bank_labels], dim=1)[:, 0]
    indices_strided = torch.stack([indices, indices], dim=1)[:, 1]
    assert not features_t.is_contiguous() and not bank_strided.is_contiguous()
    ours = snca_ext.snca_stats(
        features_t, indices_strided, bank_strided, labels_strided, 0.05, topk=3, backend=backend
    )
    expected = reference.snca_stats_reference(features, indices, bank, bank_labels, 0.05, topk=3)
    assert_stats_equal(ours, expected, rtol=1e-10, atol=1e-10)


def test_nan_feature_gives_nan_in_that_row_only(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(4, 800, 8, device=device, seed=15)
    features = features.clone()
    features[2, 3] = float("nan")
    per_row = snca_ext.snca_loss(
        features, indices, bank, bank_labels, 0.05, reduction="none", backend=backend
    )
    assert torch.isnan(per_row[2])
    assert torch.isfinite(per_row[[0, 1, 3]]).all()
    values, _ = snca_ext.bank_topk(features, bank, 3, backend=backend)
    assert torch.isfinite(values[[0, 1, 3]]).all()


def test_nan_in_the_excluded_own_row_does_not_leak(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(3, 500, 8, device=device, seed=20)
    bank = bank.clone()
    bank[indices[1]] = float("nan")
    ours = snca_ext.snca_stats(features[1:2], indices[1:2], bank, bank_labels, 0.05, topk=3, backend=backend)
    expected = reference.snca_stats_reference(features[1:2], indices[1:2], bank, bank_labels, 0.05, topk=3)
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all()
    assert_stats_equal(ours, expected, rtol=1e-10, atol=1e-10)


def test_bank_may_be_updated_between_forward_and_backward(backend_device):
    """The one-pass gradient needs nothing from the bank in the backward, so a momentum update
    right after the loss (before backward) is allowed and does not change the gradient."""
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(5, 400, 8, device=device, seed=22)
    features = features.clone().requires_grad_()
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend=backend)
    expected_in = features.detach().clone().requires_grad_()
    expected = reference.snca_loss_reference(expected_in, indices, bank, bank_labels, 0.1)
    (expected_grad,) = torch.autograd.grad(expected, expected_in)
    bank.mul_(0.5)  # an in-place update of the bank before the backward
    (grad,) = torch.autograd.grad(loss, features)
    torch.testing.assert_close(grad, expected_grad)


def test_integer_label_dtypes_are_accepted(backend_device):
    backend, device = backend_device
    features, indices, bank, bank_labels = make_problem(4, 300, 8, device=device, seed=16)
    expected = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend=backend)
    ours = snca_ext.snca_loss(
        features, indices.int(), bank, bank_labels.to(torch.int16), 0.1, backend=backend
    )
    torch.testing.assert_close(ours, expected)


def test_result_does_not_depend_on_thread_count():
    features, indices, bank, bank_labels = make_problem(8, 5000, 16, dtype=torch.float32, seed=17)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, topk=5, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, topk=5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert_stats_equal(one, many, rtol=1e-5, atol=1e-5)


def test_works_under_torch_compile():
    features, indices, bank, bank_labels = make_problem(4, 700, 8, dtype=torch.float32, seed=18)
    features = features.clone().requires_grad_()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(f):
        loss = snca_ext.snca_loss(f, indices, bank, bank_labels, 0.05, backend="cpu")
        values, _ = snca_ext.bank_topk(f, bank, 3, backend="cpu")
        return loss + values.sum()

    compiled = step(features)
    (grad,) = torch.autograd.grad(compiled, features)
    eager_in = features.detach().clone().requires_grad_()
    eager = snca_ext.snca_loss(eager_in, indices, bank, bank_labels, 0.05, backend="cpu")
    eager = eager + snca_ext.bank_topk(eager_in, bank, 3, backend="cpu")[0].sum()
    (eager_grad,) = torch.autograd.grad(eager, eager_in)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_auto_backend_picks_the_compiled_kernel_on_cpu():
    assert snca_ext.available_backends("cpu")[0] == "cpu"
    features, indices, bank, bank_labels = make_problem(3, 100, 4, dtype=torch.float32, seed=19)
    auto = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1)
    cpu = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend="cpu")
    assert torch.equal(auto, cpu)


def test_empty_batch(backend_device):
    """B = 0: empty results of the right shapes; the loss follows PyTorch's reductions of an empty
    batch (sum 0, mean NaN, as F.cross_entropy), with an empty gradient."""
    backend, device = backend_device
    _, _, bank, bank_labels = make_problem(3, 50, 8, device=device, seed=40)
    features = torch.zeros(0, 8, dtype=bank.dtype, device=device, requires_grad=True)
    indices = torch.zeros(0, dtype=torch.long, device=device)
    for name in (backend, "reference"):
        total = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, reduction="sum", backend=name)
        (grad,) = torch.autograd.grad(total, features)
        assert total.item() == 0.0 and grad.shape == (0, 8)
        mean = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend=name)
        assert mean.isnan() and snca_ext.snca_loss(
            features, indices, bank, bank_labels, 0.1, reduction="none", backend=name
        ).shape == (0,)
        stats = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.1, topk=4, backend=name)
        assert stats.lse_same.shape == (0,) and stats.topk_indices.shape == (0, 4)
        values, rows = snca_ext.bank_topk(features.detach(), bank, 4, backend=name)
        assert values.shape == rows.shape == (0, 4)
