"""The Triton backend (snca_ext/triton) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, which
must be set before triton is first imported); the sizes are small because the interpreter is
slow. With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import snca_ext
from snca_ext import reference

pytest.importorskip("triton")
from helpers import problems

from snca_ext.triton import configs, registration
from snca_ext.triton import kernel as kernel_module
from snca_ext.triton import launch as launch_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TEMPERATURES = [1.0, 0.05, 0.01, 0.005]
# (B, N, D): B = 1, N = 1, N off every tile size (16 for fp64, 64 for fp32), D = 3 and 130.
SHAPES = [(1, 1, 3), (1, 70, 130), (5, 97, 3), (7, 300, 16)]
EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported",
)


def make_problem(batch, bank_rows, dim, *, classes=4, dtype=torch.float64, seed=0):
    return problems.make_problem(
        batch, bank_rows, dim, classes=classes, dtype=dtype, device=DEVICE, seed=seed
    )


def assert_at_least_as_accurate(ours, ref, gt, tol):
    """|ours - gt| <= |ref - gt| + tol elementwise, with gt's infinities matched exactly."""
    ours, ref, gt = ours.double(), ref.double(), gt.double()
    finite = torch.isfinite(gt)
    assert torch.equal(ours[~finite], gt[~finite])
    err_ours = (ours - gt)[finite].abs()
    err_ref = (ref - gt)[finite].abs()
    bad = err_ours > err_ref + tol
    assert not bad.any(), (
        f"worse than same-dtype PyTorch: ours {err_ours[bad]}, ref {err_ref[bad]}, tol {tol}"
    )


def triton_forward(*args):
    return torch.ops.snca_ext.snca_forward_triton(*args)


# ----------------------------------------------------------------------------- statistics


def test_triton_backend_is_listed():
    assert "triton" in snca_ext.available_backends(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_stats_float64_match_reference(shape, temperature):
    features, indices, bank, bank_labels = make_problem(*shape)
    k = min(5, shape[1])
    ours = snca_ext.snca_stats(features, indices, bank, bank_labels, temperature, topk=k, backend="triton")
    expected = reference.snca_stats_reference(features, indices, bank, bank_labels, temperature, topk=k)
    for got, want in zip(ours[:3], expected[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[3], expected[3])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_stats_float32_as_accurate_as_pytorch(shape, temperature):
    features, indices, bank, bank_labels = make_problem(*shape, dtype=torch.float32)
    k = min(5, shape[1])
    ours = snca_ext.snca_stats(features, indices, bank, bank_labels, temperature, topk=k, backend="triton")
    ref = reference.snca_stats_reference(features, indices, bank, bank_labels, temperature, topk=k)
    gt = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, temperature, topk=k
    )
    assert ours[0].dtype == ours[2].dtype == torch.float32
    # Logits reach 1/T, so a few fp32 ulps of 1/T is the rounding noise of any fp32 GEMM.
    for got, same_dtype, truth in zip(ours[:3], ref[:3], gt[:3], strict=True):
        assert_at_least_as_accurate(got, same_dtype, truth, tol=4 * EPS32 / temperature)
    # Random unit vectors leave gaps far above fp32 noise between neighbours: the rows must agree.
    torch.testing.assert_close(ours[3], gt[3])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.05, 0.005])
def test_half_precision_banks(bank_dtype, temperature):
    features, indices, bank, bank_labels = make_problem(6, 150, 130, dtype=torch.float32, seed=3)
    bank = bank.to(bank_dtype)
    args = (features, indices, bank, bank_labels, temperature)
    ours = snca_ext.snca_stats(*args, topk=4, backend="triton")
    ref = reference.snca_stats_reference(*args, topk=4)
    # Ground truth: float64 arithmetic on the values the bank actually stores.
    gt = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, temperature, topk=4
    )
    for got, same_dtype, truth in zip(ours[:3], ref[:3], gt[:3], strict=True):
        assert_at_least_as_accurate(got, same_dtype, truth, tol=4 * EPS32 / temperature)
    torch.testing.assert_close(ours[3], gt[3])

    grad_ours = features.clone().requires_grad_()
    snca_ext.snca_loss(grad_ours, indices, bank, bank_labels, temperature, backend="triton").backward()
    grad_ref = features.clone().requires_grad_()
    reference.snca_loss_reference(grad_ref, indices, bank, bank_labels, temperature).backward()
    grad_gt = features.double().requires_grad_()
    reference.snca_loss_reference(grad_gt, indices, bank.double(), bank_labels, temperature).backward()
    assert_at_least_as_accurate(grad_ours.grad, grad_ref.grad, grad_gt.grad, tol=8 * EPS32 / temperature)


def test_weighted_means_are_the_softmax_averages():
    """The op's own contract (csrc/ops.cpp): wmean_* are softmax-weighted means of bank rows within
    each group, [B, D] with with_grad and [0, D] without."""
    features, indices, bank, bank_labels = make_problem(5, 97, 16, seed=1)
    labels = bank_labels[indices]
    labels[0] = 7  # a class with no bank row: empty same-class group, zero row
    out = triton_forward(features, labels, indices, bank, bank_labels, 0.05, True, 0)
    logits = features @ bank.T / 0.05
    same = labels[:, None] == bank_labels[None, :]
    own = torch.arange(97)[None, :].to(DEVICE) == indices[:, None]
    for group, wmean in ((same & ~own, out[2]), (~same & ~own, out[3])):
        weights = torch.softmax(logits.masked_fill(~group, float("-inf")), dim=1).nan_to_num(0.0)
        torch.testing.assert_close(wmean, weights @ bank, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[2][0], torch.zeros(16, dtype=torch.float64, device=DEVICE))
    assert out[4].shape == (5, 0) and out[5].dtype == torch.long
    without = triton_forward(features, labels, indices, bank, bank_labels, 0.05, False, 0)
    assert without[2].shape == without[3].shape == (0, 16)
    torch.testing.assert_close(without[0], out[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("margin", "reduction"), [(0.0, "mean"), (0.5, "none")])
def test_loss_and_gradient_float64(temperature, margin, reduction):
    features, indices, bank, bank_labels = make_problem(6, 200, 130, seed=2)
    ours_in = features.clone().requires_grad_()
    ours = snca_ext.snca_loss(
        ours_in, indices, bank, bank_labels, temperature, margin=margin, reduction=reduction, backend="triton"
    )
    ref_in = features.clone().requires_grad_()
    ref = reference.snca_loss_reference(
        ref_in, indices, bank, bank_labels, temperature, margin=margin, reduction=reduction
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.linspace(0.5, 1.5, ours.numel(), dtype=torch.float64, device=DEVICE).reshape(ours.shape)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.05, 0.005])
def test_gradient_float32_as_accurate_as_pytorch(temperature):
    features, indices, bank, bank_labels = make_problem(6, 200, 130, dtype=torch.float32, seed=4)
    grads = []
    for fn, dtype in (
        (lambda *a: snca_ext.snca_loss(*a, backend="triton"), torch.float32),
        (reference.snca_loss_reference, torch.float32),
        (reference.snca_loss_reference, torch.float64),
    ):
        x = features.to(dtype, copy=True).requires_grad_()
        fn(x, indices, bank.to(dtype), bank_labels, temperature).backward()
        grads.append(x.grad)
    assert_at_least_as_accurate(*grads, tol=8 * EPS32 / temperature)


# D = 130: beside the gradient the top-k takes rounds of its own (fuses_topk), and the weighted
# sums are cut into 128-column parts, one per program.
@pytest.mark.parametrize("dim", [16, 130])
def test_topk_gradient_flows_through_stats(dim):
    features, indices, bank, bank_labels = make_problem(4, 90, dim, seed=5)
    ours_in = features.clone().requires_grad_()
    ref_in = features.clone().requires_grad_()
    ours = snca_ext.snca_stats(ours_in, indices, bank, bank_labels, 0.1, topk=3, backend="triton")
    ref = reference.snca_stats_reference(ref_in, indices, bank, bank_labels, 0.1, topk=3)
    (ours[0].sum() + 2 * ours[1].sum() + ours[2].sum()).backward()
    (ref[0].sum() + 2 * ref[1].sum() + ref[2].sum()).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- edge cases


def _loss_and_grad(backend_fn, features, *args, **kwargs):
    x = features.clone().requires_grad_()
    loss = backend_fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def _compare_with_reference(features, indices, bank, bank_labels, temperature, labels=None):
    k = min(3, bank.shape[0])
    ours = snca_ext.snca_stats(
        features, indices, bank, bank_labels, temperature, labels=labels, topk=k, backend="triton"
    )
    want = reference.snca_stats_reference(
        features, indices, bank, bank_labels, temperature, labels=labels, topk=k
    )
    for got, expected in zip(ours, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    ours_loss = _loss_and_grad(
        lambda *a, **kw: snca_ext.snca_loss(*a, **kw, backend="triton"),
        features,
        indices,
        bank,
        bank_labels,
        temperature,
        labels=labels,
    )
    ref_loss = _loss_and_grad(
        reference.snca_loss_reference, features, indices, bank, bank_labels, temperature, labels=labels
    )
    for got, expected in zip(ours_loss, ref_loss, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    return ours, ours_loss


def test_rows_without_positive():
    features, indices, bank, bank_labels = make_problem(5, 80, 16, seed=6)
    bank_labels[indices[0]] = 99  # query 0's class has only its own row
    (lse_same, *_), (_, grad) = _compare_with_reference(features, indices, bank, bank_labels, 0.05)
    assert lse_same[0] == float("-inf") and torch.isfinite(lse_same[1:]).all()
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))


def test_all_rows_one_class():
    features, indices, bank, bank_labels = make_problem(4, 80, 16, seed=7)
    bank_labels.zero_()
    (_, lse_other, *_), (loss, _) = _compare_with_reference(features, indices, bank, bank_labels, 0.05)
    assert (lse_other == float("-inf")).all()
    assert loss == 0


def test_duplicate_indices_and_rows_without_bank_row():
    features, indices, bank, bank_labels = make_problem(6, 120, 16, seed=8)
    indices = torch.tensor([3, 3, -1, 3, 50, -1], device=DEVICE)
    labels = torch.tensor([1, 1, 2, 1, 0, 3], device=DEVICE)
    bank_labels[3] = 1
    bank_labels[50] = 0
    _compare_with_reference(features, indices, bank, bank_labels, 0.01, labels=labels)


@pytest.mark.parametrize("own_row", [0, -1])
def test_bank_of_one_row(own_row):
    features, _, bank, bank_labels = make_problem(1, 1, 3, seed=9)
    indices = torch.tensor([own_row], device=DEVICE)
    labels = bank_labels.clone()
    (lse_same, lse_other, values, rows), _ = _compare_with_reference(
        features, indices, bank, bank_labels, 0.05, labels=labels
    )
    if own_row == 0:  # its own row is the whole bank: nothing is eligible
        assert lse_same == lse_other == float("-inf") and rows.item() == -1 and values.item() == float("-inf")
    else:
        assert torch.isfinite(lse_same) and lse_other == float("-inf") and rows.item() == 0


def test_nan_feature_row_gives_nan_lse():
    features, indices, bank, bank_labels = make_problem(4, 100, 16, seed=10)
    features[2] = float("nan")
    lse_same, lse_other, _, rows = snca_ext.snca_stats(
        features, indices, bank, bank_labels, 0.05, topk=3, backend="triton"
    )
    assert torch.isnan(lse_same[2]) and torch.isnan(lse_other[2])
    want = reference.snca_stats_reference(features, indices, bank, bank_labels, 0.05, topk=3)
    keep = torch.tensor([0, 1, 3], device=DEVICE)
    torch.testing.assert_close(lse_same[keep], want[0][keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_other[keep], want[1][keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rows[keep], want[3][keep])
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.05, reduction="none", backend="triton")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[keep]).all()


def test_non_contiguous_inputs():
    features, indices, bank, bank_labels = make_problem(5, 97, 16, dtype=torch.float32, seed=11)
    wide = torch.zeros(5, 32, device=DEVICE)
    wide[:, ::2] = features
    column_major = bank.T.contiguous().T
    ours = snca_ext.snca_stats(
        wide[:, ::2], indices, column_major, bank_labels, 0.05, topk=4, backend="triton"
    )
    plain = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, topk=4, backend="triton")
    for got, want in zip(ours, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- top-k


def _tied_bank(copies=3, rows=40, dim=16, seed=12):
    """Bank rows repeated ``copies`` times, on a grid of 1/4 so every inner product is exact in
    any summation order: the ties are real ties in every backend."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (rows, dim), generator=gen).double() / 4
    queries = torch.randint(-3, 4, (6, dim), generator=gen).double() / 4
    return queries.to(DEVICE), base.repeat(copies, 1).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("copies", "distinct", "programs"), [(3, 40, 4), (24, 5, 1)])
def test_bank_topk_ties_go_to_the_lower_row(monkeypatch, dtype, copies, distinct, programs):
    # programs=1: two long splits, so ties also meet across tiles inside one program.
    monkeypatch.setattr(launch_module, "device_programs", lambda device: programs)
    queries, bank = _tied_bank(copies, distinct)
    query_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    queries, bank = queries.to(query_dtype), bank.to(dtype)
    exclude = torch.tensor([0, 40, -1, 79, 5, 119], device=DEVICE)
    values, rows = snca_ext.bank_topk(queries, bank, 8, exclude=exclude, backend="triton")
    want_values, want_rows = reference.bank_topk_reference(
        queries.double(), bank.double(), 8, exclude=exclude
    )
    assert values.dtype == query_dtype
    torch.testing.assert_close(values.double(), want_values, rtol=0, atol=0)
    torch.testing.assert_close(rows, want_rows)
    assert (rows != exclude[:, None]).all()


def test_bank_topk_pads_when_too_few_rows():
    queries, _, bank, _ = make_problem(3, 5, 8, seed=13)
    exclude = torch.tensor([1, -1, 4], device=DEVICE)
    values, rows = snca_ext.bank_topk(queries, bank, 5, exclude=exclude, backend="triton")
    want_values, want_rows = reference.bank_topk_reference(queries, bank, 5, exclude=exclude)
    torch.testing.assert_close(values, want_values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, want_rows)
    assert rows[0, -1] == -1 and values[0, -1] == float("-inf") and (rows[1] >= 0).all()
    no_exclude = snca_ext.bank_topk(queries, bank, 2, backend="triton")
    torch.testing.assert_close(no_exclude[1], reference.bank_topk_reference(queries, bank, 2)[1])


def test_bank_topk_large_k_spans_splits():
    features, indices, bank, _ = make_problem(3, 700, 8, dtype=torch.float32, seed=14)
    values, rows = snca_ext.bank_topk(features, bank, 40, exclude=indices, backend="triton")
    want_values, want_rows = reference.bank_topk_reference(
        features.double(), bank.double(), 40, exclude=indices
    )
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(values.double(), want_values, rtol=0, atol=4 * EPS32)


def test_topk_width_is_bounded_for_any_k():
    """The running list compiled into the kernel is never wider than the widest width: k up to
    N (1.28M at ImageNet size) compiles the same kernels as k = 128."""
    widest = configs.TOPK_WIDTHS[-1]
    for k in (1, 32, 33, widest, widest + 1, 32768, 32769, 1_281_167):
        width = configs.topk_width(k)
        assert width <= widest and (width >= k or width == widest), (k, width)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_k_runs_in_rounds(monkeypatch, dtype):
    """k above the widest width: rounds of streaming passes, each continuing after the previous
    round's last (value, row); ties across a round boundary still go to the lower row."""
    monkeypatch.setattr(configs, "TOPK_WIDTHS", (4, 8))
    spy = _LaunchSpy()
    monkeypatch.setattr(launch_module, "wrap_triton", spy)
    queries, bank = _tied_bank(copies=3, rows=20)  # every value three times: ties everywhere
    queries, bank = queries.to(dtype), bank.to(dtype)
    exclude = torch.tensor([0, 20, -1, 59, 5, 33], device=DEVICE)
    values, rows = snca_ext.bank_topk(queries, bank, 30, exclude=exclude, backend="triton")
    want_values, want_rows = reference.bank_topk_reference(queries, bank, 30, exclude=exclude)
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    assert [launch[2]["TOPK"] for launch in spy.launches] == [8, 8, 8, 8]  # 8 + 8 + 8 + 6

    # k = N: the rounds run out of rows and pad with -1 / -inf (query 0 excludes one row).
    values, rows = snca_ext.bank_topk(queries, bank, 60, exclude=exclude, backend="triton")
    want_values, want_rows = reference.bank_topk_reference(queries, bank, 60, exclude=exclude)
    torch.testing.assert_close(rows, want_rows)
    assert rows[0, -1] == -1 and values[0, -1] == float("-inf") and (rows[2] >= 0).all()

    # snca_stats: the log-sum-exp pass without a top-k, then the same top-k rounds (every round
    # runs one compiled kernel, so a pair's score is the same bits in every round).
    spy.launches.clear()
    features, indices, bank, bank_labels = make_problem(4, 90, 16, dtype=dtype, seed=20)
    ours = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.1, topk=19, backend="triton")
    want = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, 0.1, topk=19
    )
    torch.testing.assert_close(ours[3], want[3])
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)
    assert [launch[2]["TOPK"] for launch in spy.launches] == [0, 8, 8, 8]


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 launch on cuda:1, not on the current device."""
    guard = launch_module.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    active, seen = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    class _GuardSpy(_LaunchSpy):
        def __call__(self, kernel):
            launcher = torch.library.wrap_triton(kernel)

            class _Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        seen.append(list(active))
                        return launcher[grid](*args, **kwargs)

                    return launch

            return _Grid()

    monkeypatch.setattr(launch_module, "device_guard", recording_guard)
    monkeypatch.setattr(launch_module, "wrap_triton", _GuardSpy())
    features, indices, bank, bank_labels = make_problem(3, 50, 8, dtype=torch.float32, seed=21)
    snca_ext.snca_stats(features, indices, bank, bank_labels, 0.1, topk=2, backend="triton")
    snca_ext.bank_topk(features, bank, 2, backend="triton")
    assert seen == [[features.device], [features.device]]


# ----------------------------------------------------------------------------- non-finite scores


@pytest.mark.parametrize(
    ("dtype", "bank_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),  # the 16-bit path: IEEE MMA products, no recompute
        (torch.float16, torch.float16),
    ],
)
def test_non_finite_scores_follow_the_contract(dtype, bank_dtype):
    """Each group's lse is the IEEE log-sum-exp of its scores: NaN if any is NaN, else +inf if any
    is +inf, -inf scores add nothing; other queries are unaffected; in the top-k NaN ranks above
    +inf. The split tf32 products alone would turn inf * 0 into NaN: the kernel recomputes such
    tiles in IEEE arithmetic."""
    features, indices, bank, bank_labels = make_problem(6, 150, 16, dtype=torch.float64, seed=22)
    labels = bank_labels[indices]
    inf = float("inf")
    # Row 70 is 0 but for a +inf first component: its score is f_i0 * inf, +inf, -inf or NaN.
    row = 70
    bank[row] = 0.0
    bank[row, 0] = inf
    features[:, 0] = torch.tensor([0.5, -0.5, 0.0, 0.25, 0.1, -0.1], dtype=torch.float64)
    features[5] = float("nan")  # a NaN query: its own outputs NaN, the others' untouched
    indices[indices == row] = 0
    features, bank = features.to(dtype), bank.to(bank_dtype)
    ours = snca_ext.snca_stats(
        features, indices, bank, bank_labels, 0.05, labels=labels, topk=3, backend="triton"
    )
    want = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, 0.05, labels=labels, topk=3
    )
    same_row = bank_labels[row] == labels
    for i, (score_sign, group) in enumerate(zip([1, -1, 0, 1], same_row[:4].tolist(), strict=True)):
        hit, missed = (ours[0], ours[1]) if group else (ours[1], ours[0])
        if score_sign > 0:
            assert hit[i] == inf, i
        elif score_sign == 0:
            assert torch.isnan(hit[i]), i
        else:  # a -inf score adds nothing: the reference's finite value
            assert torch.isfinite(hit[i]), i
        assert torch.isfinite(missed[i]), i
    assert torch.isnan(ours[0][5]) and torch.isnan(ours[1][5])
    tol = 1e-10 if dtype == torch.float64 else 4 * EPS32 / 0.05
    for got, expected in zip(ours[:2], want[:2], strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol, equal_nan=True)
    # Top-k: +inf first for queries 0 and 3, NaN first for query 2, row order for the NaN query.
    assert ours[3][0, 0] == row and ours[2][0, 0] == inf and ours[3][3, 0] == row
    assert ours[3][2, 0] == row and torch.isnan(ours[2][2, 0])
    torch.testing.assert_close(ours[3][:5], want[3][:5])
    # The NaN query: every score NaN, so its top-k is its first eligible rows.
    assert torch.isnan(ours[2][5]).all()
    assert ours[3][5].tolist() == [r for r in range(4) if r != indices[5]][:3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sixteen_bit_gradient_with_an_infinite_bank_value(dtype):
    """A +inf bank value in the 16-bit path: the loss and the NaN pattern of the gradient are the
    reference's (+inf or NaN scores), and the other queries' gradients stay finite: the value
    enters the weighted sums as 0, where a 0 weight times inf would make every mean NaN."""
    features, indices, bank, bank_labels = make_problem(5, 150, 16, dtype=torch.float32, seed=3)
    row = 70
    bank[row] = 0.0
    bank[row, 0] = float("inf")
    features[:, 0] = torch.tensor([0.5, -0.5, 0.0, -0.25, -0.1], device=DEVICE)
    indices[indices == row] = 0
    features, bank = features.to(dtype), bank.to(dtype)
    x = features.clone().requires_grad_()
    loss = snca_ext.snca_loss(x, indices, bank, bank_labels, 0.05, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = features.double().requires_grad_()
    want = reference.snca_loss_reference(x64, indices, bank.double(), bank_labels, 0.05, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    torch.testing.assert_close(loss.double(), want, rtol=0, atol=4 * EPS32 / 0.05, equal_nan=True)
    nan_rows = torch.isnan(want_grad).any(dim=1)
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(torch.isnan(grad).any(dim=1), nan_rows)
    assert torch.isfinite(grad[~nan_rows]).all()


# ----------------------------------------------------------------------------- launch path


class _LaunchSpy:
    """Records every kernel launch of snca_ext.triton and forwards it to the real kernel."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        launcher = torch.library.wrap_triton(kernel)
        spy = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.launches.append((kernel, grid, kwargs))
                    return launcher[grid](*args, **kwargs)

                return launch

        return _Grid()


def test_results_come_from_the_split_kernel(monkeypatch):
    """The ops launch the one @triton.jit kernel with the planned split-KV grid (several splits
    here), the same call on a GPU and in the interpreter, and its output is what they return."""
    spy = _LaunchSpy()
    monkeypatch.setattr(launch_module, "wrap_triton", spy)
    features, indices, bank, bank_labels = make_problem(5, 300, 16, dtype=torch.float32, seed=15)
    snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, topk=3, backend="triton")
    snca_ext.bank_topk(features, bank, 2, backend="triton")
    assert len(spy.launches) == 2
    config = configs.kernel_config(16, "fp32", "fp32", True, False, 32, "split")
    plan = launch_module.Plan(config, 5, 300, features.device)
    assert plan.splits > 1
    for kernel, grid, options in spy.launches:
        assert kernel is kernel_module._snca_partials_kernel
        assert grid == plan.grid
        assert options["PRECISION"] == "split"
    assert spy.launches[0][2]["WITH_LSE"] and not spy.launches[1][2]["WITH_LSE"]
    # No device branches besides the program count and the architecture (device_programs,
    # device_arch): the plan and launch code never mention one.
    for fn in (
        launch_module.launch,
        launch_module.Plan,
        configs.kernel_config,
        registration._snca_forward_impl,
        registration._bank_topk_impl,
    ):
        source = inspect.getsource(fn)
        for device_test in ("device.type", '"cpu"', "is_cuda", "TRITON_INTERPRET", "knobs"):
            assert device_test not in source, (fn, device_test)

    # With the kernel's partials replaced by garbage the op's answer changes: nothing else computes it.
    class _Corrupting(_LaunchSpy):
        def __call__(self, kernel):
            class _Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
                        for partial in args[11:15]:  # max_same, sum_same, max_other, sum_other
                            partial.fill_(0.25)

                    return launch

            return _Grid()

    monkeypatch.setattr(launch_module, "wrap_triton", _Corrupting())
    lse_same = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, backend="triton")[0]
    assert not torch.allclose(
        lse_same, reference.snca_stats_reference(features, indices, bank, bank_labels, 0.05)[0]
    )


def test_every_launch_is_a_configuration_of_the_static_report(monkeypatch):
    """gpu_checks/static_triton.py checks spills and shared memory for configs.launch_configs():
    whatever the ops launch (dims, dtypes, gradient, top-k fused or in rounds) must be among them."""
    spy = _LaunchSpy()
    monkeypatch.setattr(launch_module, "wrap_triton", spy)
    for dim, dtype, bank_dtype in [
        (16, torch.float32, torch.float32),
        (130, torch.float32, torch.float32),
        (130, torch.float32, torch.bfloat16),
        (100, torch.float64, torch.float64),
        (130, torch.bfloat16, torch.float32),
        (16, torch.float16, torch.bfloat16),
    ]:
        features, indices, bank, bank_labels = make_problem(2, 40, dim, dtype=dtype, seed=18)
        bank = bank.to(bank_dtype)
        for k in (0, 3, 33):
            for with_grad in (False, True):
                x = features.clone().requires_grad_(with_grad)
                snca_ext.snca_stats(x, indices, bank, bank_labels, 0.05, topk=k, backend="triton")
        snca_ext.bank_topk(features, bank, 5, backend="triton")
    # sm_90's tiles for the 16-bit gradient, launched here in the interpreter.
    monkeypatch.setattr(launch_module, "device_arch", lambda device: 90)
    features, indices, bank, bank_labels = make_problem(2, 40, 130, dtype=torch.bfloat16, seed=18)
    x = features.clone().requires_grad_()
    snca_ext.snca_stats(x, indices, bank, bank_labels, 0.05, backend="triton")
    assert spy.launches[-1][2]["BLOCK_B"] == 32  # D > 128: the tiles of every target
    features = features[:, :100]
    x = features.clone().requires_grad_()
    snca_ext.snca_stats(x, indices, bank[:, :100], bank_labels, 0.05, backend="triton")
    assert spy.launches[-1][2]["BLOCK_B"] == 128
    assert len(spy.launches) >= 6 * 7
    assert {options["PRECISION"] for _, _, options in spy.launches} == {"split", "ieee", "16bit"}
    planned = {
        (tuple(sorted(c.constexprs().items())), c.num_warps, c.num_stages) for c in configs.launch_configs()
    }
    for _, _, options in spy.launches:
        constexprs = {key: value for key, value in options.items() if key.isupper()}
        launched = (tuple(sorted(constexprs.items())), options["num_warps"], options["num_stages"])
        assert launched in planned, launched


def test_tf32_follows_pytorch_setting(monkeypatch):
    spy = _LaunchSpy()
    monkeypatch.setattr(launch_module, "wrap_triton", spy)
    features, indices, bank, bank_labels = make_problem(2, 40, 16, dtype=torch.float32)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    snca_ext.snca_stats(features, indices, bank, bank_labels, 0.05, backend="triton")
    # TF32 alone only where PyTorch allows it; otherwise split operands, as accurate as fp32.
    assert [launch[2]["PRECISION"] for launch in spy.launches] == ["tf32", "split"]


@pytest.mark.parametrize("programs", [1, 1000])
def test_split_count_does_not_change_the_answer(monkeypatch, programs):
    monkeypatch.setattr(launch_module, "device_programs", lambda device: programs)
    features, indices, bank, bank_labels = make_problem(3, 300, 8, seed=16)
    config = configs.kernel_config(8, "fp64", "fp64", True, True, 32, "ieee")
    plan = launch_module.Plan(config, 3, 300, features.device)
    assert plan.splits == (2 if programs == 1 else 10)
    _compare_with_reference(features, indices, bank, bank_labels, 0.01)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("op_name", ["snca_forward_triton", "bank_topk_triton"])
def test_opcheck(op_name):
    features, indices, bank, bank_labels = make_problem(3, 50, 8, dtype=torch.float32, seed=17)
    features.requires_grad_()
    if op_name == "snca_forward_triton":
        args = (features, bank_labels[indices], indices, bank, bank_labels, 0.1, True, 3)
    else:
        args = (features, bank, 3, indices)
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if not INTERPRETED:
        # AOT dispatch decomposes the triton_op into its kernels; the interpreter cannot launch a
        # kernel on the fake tensors that this traces with, a compiled kernel can.
        tests.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.snca_ext, op_name).default, args, test_utils=tests)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_opcheck_sixteen_bit_features(dtype):
    """16-bit features: every output in float32 (the fake kernel's accumulation dtype), the
    gradient through the shared formula; 16-bit queries to bank_topk are refused, as by the CPU op
    (snca_ext.bank_topk ranks them in float32)."""
    features, indices, bank, bank_labels = make_problem(3, 50, 8, dtype=torch.float32, seed=17)
    features = features.to(dtype).requires_grad_()
    args = (features, bank_labels[indices], indices, bank, bank_labels, 0.1, True, 3)
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    torch.library.opcheck(torch.ops.snca_ext.snca_forward_triton.default, args, test_utils=tests)
    with pytest.raises(TypeError, match="queries must be float32 or float64"):
        torch.ops.snca_ext.bank_topk_triton(features.detach(), bank, 3, indices)


@pytest.mark.parametrize("op", ["snca_forward", "bank_topk"])
def test_schemas_are_the_compiled_librarys(op):
    """The Triton ops carry csrc/ops.cpp's schemas (read from the compiled library when it is
    loaded), and the copy kept for a package without the library is the same text."""
    schema = str(getattr(torch.ops.snca_ext, f"{op}_triton").default._schema)
    assert schema.removeprefix(f"snca_ext::{op}_triton") == registration._SCHEMAS[op]
    if "cpu" not in snca_ext.available_backends("cpu"):
        pytest.skip("the compiled library is not loaded")
    compiled = str(getattr(torch.ops.snca_ext, op).default._schema)
    assert compiled.removeprefix(f"snca_ext::{op}") == registration._SCHEMAS[op]


def test_torch_compile_fullgraph():
    features, indices, bank, bank_labels = make_problem(4, 100, 16, dtype=torch.float32, seed=18)

    def loss_fn(x):
        return snca_ext.snca_loss(x, indices, bank, bank_labels, 0.1, backend="triton")

    torch._dynamo.reset()
    # Inductor compiles the kernel itself on a GPU; the interpreter runs only through dynamo.
    compiled = torch.compile(loss_fn, backend="eager" if INTERPRETED else "inductor", fullgraph=True)
    x_compiled = features.clone().requires_grad_()
    loss = compiled(x_compiled)
    loss.backward()
    x_eager = features.clone().requires_grad_()
    expected = loss_fn(x_eager)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_empty_batch_matches_the_reference():
    _, _, bank, bank_labels = make_problem(3, 40, 8, dtype=torch.float32, seed=41)
    features = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    indices = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for reduction, check in (("sum", lambda x: x.item() == 0.0), ("mean", lambda x: bool(x.isnan()))):
        loss = snca_ext.snca_loss(
            features, indices, bank, bank_labels, 0.1, reduction=reduction, backend="triton"
        )
        assert check(loss), (reduction, loss)
    (grad,) = torch.autograd.grad(
        snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, reduction="sum", backend="triton"),
        features,
    )
    values, rows = snca_ext.bank_topk(features.detach(), bank, 5, backend="triton")
    assert grad.shape == (0, 8) and values.shape == rows.shape == (0, 5)


def test_gradcheck_float64_with_no_positive_no_bank_row_and_explicit_labels():
    """float64 gradcheck (fast mode: the interpreter is slow) of the loss, with a query whose class
    has no bank row (no positive: zero gradient), one without a bank row of its own (index -1)
    and explicit labels."""
    features, indices, bank, bank_labels = make_problem(3, 40, 3, classes=3, seed=42)
    indices = indices.clone()
    indices[1] = -1
    labels = bank_labels[indices.clamp(min=0)].clone()
    labels[2] = 7  # a class no bank row has
    features = features.clone().requires_grad_()

    def loss(f):
        return snca_ext.snca_loss(
            f, indices, bank, bank_labels, 0.3, labels=labels, reduction="none", backend="triton"
        )

    assert torch.autograd.gradcheck(loss, (features,), fast_mode=True)
    (grad,) = torch.autograd.grad(loss(features).sum(), features)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))  # no positive: no gradient
    assert grad[:2].abs().sum() > 0
