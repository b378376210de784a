"""Bad input gets a clear error that names the argument, on every backend, never a crash."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import snca_ext


def problem(batch=4, bank_rows=50, dim=8):
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(bank_rows, dim, generator=gen), dim=1)
    bank_labels = torch.randint(0, 3, (bank_rows,), generator=gen)
    indices = torch.randint(0, bank_rows, (batch,), generator=gen)
    features = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    return dict(features=features, indices=indices, bank=bank, bank_labels=bank_labels, temperature=0.05)


def call_loss(backend, **changes):
    args = problem()
    extra = {k: changes.pop(k) for k in ("margin", "labels", "reduction") if k in changes}
    args.update(changes)
    return snca_ext.snca_loss(**args, **extra, backend=backend)


BAD_LOSS_INPUTS = [
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0, got nan"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0, got inf"),
    (dict(temperature="0.05"), TypeError, "temperature must be a number, got str"),
    # 1 / T in float32 would be 0 (then 0 * -inf = NaN for an ineligible score) or +inf.
    (
        dict(temperature=1e46),
        ValueError,
        r"whose inverse is a normal float32 \(2.94e-39 to 8.5e\+37\), got 1e\+46",
    ),
    (dict(temperature=1e-40), ValueError, "whose inverse is a normal float32"),
    (
        dict(features=torch.randn(4, 8, 1)),
        ValueError,
        r"features must be 2-D \[B, D\], got shape \(4, 8, 1\)",
    ),
    (dict(features=torch.randn(8)), ValueError, r"features must be 2-D"),
    (dict(features=torch.randn(4, 7)), ValueError, "bank must have D=7 columns like features, got 8"),
    (
        dict(features=torch.randint(0, 5, (4, 8))),
        TypeError,
        "features must be float32, float64, bfloat16 or float16, got torch.int64",
    ),
    (
        dict(features=torch.randn(4, 8, dtype=torch.complex64)),
        TypeError,
        "features must be float32, float64, bfloat16 or float16, got torch.complex64",
    ),
    (
        dict(features=torch.randn(4, 8).double()),
        TypeError,
        "bank dtype torch.float32 does not go with features",
    ),
    (dict(bank=torch.randn(50, 8).double()), TypeError, "bank dtype torch.float64 does not go with features"),
    (dict(bank=torch.randn(50, 8)[:0]), ValueError, "bank must have at least one row, got an empty bank"),
    (dict(bank=torch.randn(50)), ValueError, r"bank must be 2-D \[N, D\]"),
    (dict(bank=torch.randn(50, 8, requires_grad=True)), ValueError, "bank must not require grad"),
    (
        dict(indices=torch.zeros(3, dtype=torch.long)),
        ValueError,
        r"indices must be 1-D with B=4 entries, got shape \(3,\)",
    ),
    (dict(indices=torch.zeros(4)), TypeError, "indices must have an integer dtype, got torch.float32"),
    (dict(indices=torch.tensor([0, 1, 2, 50])), ValueError, r"indices must be in \[-1, N=50\), got 50"),
    (dict(indices=torch.tensor([0, -2, 2, 3])), ValueError, r"indices must be in \[-1, N=50\), got -2"),
    (
        dict(indices=torch.tensor([0, -1, 2, 3])),
        ValueError,
        "labels must be given when a query has no bank row",
    ),
    (
        dict(bank_labels=torch.zeros(49, dtype=torch.long)),
        ValueError,
        r"bank_labels must be 1-D with N=50 entries",
    ),
    (
        dict(bank_labels=torch.zeros(50)),
        TypeError,
        "bank_labels must have an integer dtype, got torch.float32",
    ),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must be 1-D with B=4 entries"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must have an integer dtype"),
    (
        dict(labels=torch.zeros(4, dtype=torch.bool)),
        TypeError,
        "labels must have an integer dtype, got torch.bool",
    ),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(margin=float("nan")), ValueError, "margin must be a finite number, got nan"),
    (dict(features="not a tensor"), TypeError, "features must be a torch.Tensor, got str"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("changes", "error", "message"), BAD_LOSS_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_loss_input_names_the_argument(backend, changes, error, message):
    with pytest.raises(error, match=message):
        call_loss(backend, **changes)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_k(backend):
    args = problem()
    with pytest.raises(ValueError, match=r"k must be in \[0, N=50\], got 51"):
        snca_ext.bank_topk(args["features"], args["bank"], 51, backend=backend)
    with pytest.raises(ValueError, match=r"k must be in \[0, N=50\], got -1"):
        snca_ext.bank_topk(args["features"], args["bank"], -1, backend=backend)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        snca_ext.bank_topk(args["features"], args["bank"], 3.0, backend=backend)
    with pytest.raises(ValueError, match=r"topk must be in \[0, N=50\], got 60"):
        snca_ext.snca_stats(**args, topk=60, backend=backend)
    with pytest.raises(ValueError, match=r"exclude must be in \[-1, N=50\), got 50"):
        snca_ext.bank_topk(args["features"], args["bank"], 3, exclude=torch.full((4,), 50), backend=backend)
    with pytest.raises(ValueError, match=r"queries must be 2-D"):
        snca_ext.bank_topk(args["features"][0], args["bank"], 3, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'gpu'"):
        call_loss("gpu")


def test_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on tensors on cpu"):
        call_loss("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_tensors_on_different_devices():
    args = problem()
    with pytest.raises(ValueError, match="bank is on cuda:0 but features is on cpu"):
        snca_ext.snca_loss(**{**args, "bank": args["bank"].cuda()})
    with pytest.raises(ValueError, match="bank_labels is on cuda:0 but features is on cpu"):
        snca_ext.snca_loss(**{**args, "bank_labels": args["bank_labels"].cuda()})


def test_tensors_on_different_devices_without_gpu():
    """meta tensors stand in for a second device: the check must fire before any kernel runs."""
    args = problem()
    with pytest.raises(ValueError, match="bank is on meta but features is on cpu"):
        snca_ext.snca_loss(**{**args, "bank": args["bank"].to("meta")})
    with pytest.raises(ValueError, match="bank_labels is on meta but features is on cpu"):
        snca_ext.snca_loss(**{**args, "bank_labels": args["bank_labels"].to("meta")})


def test_direct_op_call_checks_bounds_in_cpp():
    """The registered op checks what could make it read out of bounds, even without the Python API."""
    args = problem()
    labels = args["bank_labels"][args["indices"]]
    bad_indices = torch.tensor([0, 1, 2, 500])
    with pytest.raises(RuntimeError, match=r"indices\[3\] must be in \[-1, N=50\), got 500"):
        torch.ops.snca_ext.snca_forward(
            args["features"], labels, bad_indices, args["bank"], args["bank_labels"], 0.05, False, 0
        )
    with pytest.raises(RuntimeError, match="bank_labels must be int64 with N=50 entries"):
        torch.ops.snca_ext.snca_forward(
            args["features"], labels, args["indices"], args["bank"], args["bank_labels"][:10], 0.05, False, 0
        )
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        torch.ops.snca_ext.snca_forward(
            args["features"], labels, args["indices"], args["bank"], args["bank_labels"], 0.0, False, 0
        )
    for temperature in (1e46, 1e-40):
        with pytest.raises(
            RuntimeError, match="temperature must be a finite number > 0 whose inverse is a normal"
        ):
            torch.ops.snca_ext.snca_forward(
                args["features"],
                labels,
                args["indices"],
                args["bank"],
                args["bank_labels"],
                temperature,
                False,
                0,
            )
    with pytest.raises(RuntimeError, match=r"k must be in \[0, N=50\], got 99"):
        torch.ops.snca_ext.bank_topk(args["features"], args["bank"], 99, args["indices"])


def test_backward_without_accumulators_is_a_clear_error():
    args = problem()
    features = args["features"].clone().requires_grad_()
    labels = args["bank_labels"][args["indices"]]
    lse_same, *_ = torch.ops.snca_ext.snca_forward(
        features, labels, args["indices"], args["bank"], args["bank_labels"], 0.05, False, 0
    )
    with pytest.raises(RuntimeError, match="with_grad=False"):
        lse_same.sum().backward()


@pytest.mark.skipif("cpu" not in snca_ext.available_backends("cpu"), reason="needs the compiled ops")
def test_meta_tensors_get_shapes_not_a_crash():
    """A model built on the meta device: the ops answer with shapes (their fake kernels), and the
    reference, which reads values, says so instead of failing in Tensor.item()."""
    features = torch.empty(4, 8, device="meta", requires_grad=True)
    bank, bank_labels = torch.empty(10, 8, device="meta"), torch.zeros(10, dtype=torch.long, device="meta")
    indices = torch.arange(4, device="meta")
    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1)
    loss.backward()
    assert loss.shape == () and loss.device.type == "meta" and features.grad.shape == (4, 8)
    stats = snca_ext.snca_stats(features, indices, bank, bank_labels, 0.1, topk=3)
    assert stats.topk_indices.shape == (4, 3) and stats.lse_same.dtype == torch.float32
    assert snca_ext.bank_topk(features.detach(), bank, 2).values.shape == (4, 2)
    with pytest.raises(RuntimeError, match="backend='reference' cannot run on meta tensors"):
        snca_ext.snca_loss(features, indices, bank, bank_labels, 0.1, backend="reference")
