"""Public functional API of the fused SNCA op, input checks and backend selection.

The kernels are registered with the PyTorch dispatcher (csrc/ops.cpp, csrc/cpu, csrc/cuda; the
Triton twins in snca_ext/triton), so one Python function serves every device; ``backend`` only
chooses between implementations for the same device.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from . import _autograd, _cuda_arch, reference

try:
    from . import _C  # noqa: F401  (loading it registers the C++/CUDA kernels)

    _C_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # the package still works with the reference backend
    _C_IMPORT_ERROR = error

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


class SNCAStats(NamedTuple):
    """What ``snca_stats`` returns (a tuple, like ``torch.topk``'s result)."""

    lse_same: Tensor  # [B] log-sum-exp of <f_i, m_j> / T over same-class rows (-inf: none)
    lse_other: Tensor  # [B] the same over other-class rows
    topk_values: Tensor  # [B, k] the k largest inner products (not divided by T), descending
    topk_indices: Tensor  # [B, k] their bank rows, -1 where fewer than k rows are eligible


class TopK(NamedTuple):
    """What ``bank_topk`` returns (a tuple, like ``torch.topk``'s result)."""

    values: Tensor  # [B, k] inner products, descending
    indices: Tensor  # [B, k] bank rows, ties to the lower row; -1 where none is left


class SNCAPartials(NamedTuple):
    """What ``snca_partials`` returns: the log-sum-exps and the softmax-weighted mean bank rows
    from which partial results over disjoint blocks of a bank are combined exactly."""

    lse_same: Tensor  # [B]
    lse_other: Tensor  # [B]
    wmean_same: Tensor  # [B, D] when with_grad, else [0, D]
    wmean_other: Tensor  # [B, D] when with_grad, else [0, D]


REDUCTIONS = ("mean", "sum", "none")
# bfloat16/float16 features reach the fused kernels as they are: the GPU backends compute their
# products on 16-bit tensor cores with float32 accumulation (as a matmul under torch.autocast
# does), the CPU in float32; the reference computes them in float32 (_in_accumulation_dtype).
FEATURE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NEG_INF = float("-inf")

if _C_IMPORT_ERROR is None:
    _autograd.register_snca_forward("snca_ext::snca_forward")
    _autograd.register_bank_topk("snca_ext::bank_topk")


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if _C_IMPORT_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"snca_ext::{op}", dispatch_key)


# Looked up once: torch.compile cannot trace the dispatcher query, and it never changes.
_COMPILED_FOR = {"cpu": _has_kernel("snca_forward", "CPU"), "cuda": _has_kernel("snca_forward", "CUDA")}
# Fastest first, per device type; `auto` takes the first usable one.
# Meta tensors (shapes without data, e.g. a model built on torch.device("meta")) go through the
# registered ops, whose fake kernels give the outputs' shapes; the reference would read values.
_PREFERENCE = {
    "cpu": ("cpu", "triton", "reference"),
    "cuda": ("cuda", "triton", "reference"),
    "meta": ("cpu",),
}
_triton_ok: dict[str, bool] = {}


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in _triton_ok:
        try:
            from . import triton as _triton

            _triton_ok[device.type] = bool(_triton.AVAILABLE)
        except ImportError:
            _triton_ok[device.type] = False
    return _triton_ok[device.type]


def _usable(backend: str, device: torch.device) -> bool:
    if device.type == "meta":
        return backend == "cpu" and _C_IMPORT_ERROR is None
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _COMPILED_FOR["cpu"]
    if backend == "cuda":
        # The binary may lack code for this GPU (e.g. built for sm_90 only and run on an sm_86):
        # `auto` then falls back, after one warning that names the reason.
        compiled = device.type == "cuda" and _COMPILED_FOR["cuda"]
        return compiled and _cuda_arch.device_unusable_reason(device) is None
    return device.type in ("cpu", "cuda") and _triton_usable(device)


def _device_present(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    # torch.cuda.is_available() asks the driver without initialising CUDA and is False without one.
    return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this install, fastest first (``auto`` picks the
    first); none on a device this machine does not have (``"cuda"`` without a GPU or driver)."""
    device = torch.device(device)
    if not _device_present(device):
        return []
    return [b for b in _PREFERENCE.get(device.type, ("reference",)) if _usable(b, device)]


def _missing_backend_message(backend: str, device: torch.device) -> str:
    if device.type == "meta":
        return (
            f"backend={backend!r} cannot run on meta tensors (shapes without data): use "
            "backend='auto', whose registered ops give the outputs' shapes"
            + ("" if _C_IMPORT_ERROR is None else f" once snca_ext._C loads ({_C_IMPORT_ERROR})")
        )
    if backend in ("cpu", "cuda") and _C_IMPORT_ERROR is not None:
        return (
            f"backend={backend!r} needs the compiled extension snca_ext._C, which failed to load "
            f"({_C_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .`"
        )
    if backend == "cuda" and device.type == "cuda":
        if not _COMPILED_FOR["cuda"]:
            return (
                "backend='cuda' was not built into snca_ext._C (no CUDA toolkit, or no architecture >= "
                "sm_80 in TORCH_CUDA_ARCH_LIST, at build time); rebuild with nvcc"
            )
        return f"backend='cuda' cannot run on {device}: {_cuda_arch.device_unusable_reason(device)}"
    if backend == "triton":
        return (
            f"backend='triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1 for "
            f"CPU tensors); got a tensor on {device}"
        )
    return f"backend={backend!r} cannot run on tensors on {device}"


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return next(b for b in _PREFERENCE.get(device.type, ("reference",)) if _usable(b, device))
    if not _usable(backend, device):
        raise RuntimeError(_missing_backend_message(backend, device))
    return backend


def _op(name: str, backend: str):
    if backend == "triton":
        from . import triton as _triton

        return getattr(_triton, name)
    return getattr(torch.ops.snca_ext, name)


# ----------------------------------------------------------------------------- input checks


def _check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_index_tensor(value, name: str, length: int, length_name: str) -> Tensor:
    value = _check_tensor(value, name)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(
            f"{name} must be 1-D with {length_name}={length} entries, got shape {tuple(value.shape)}"
        )
    return value.long()


def _check_features_and_bank(features, bank, features_name: str) -> None:
    features = _check_tensor(features, features_name)
    bank = _check_tensor(bank, "bank")
    if features.dim() != 2:
        raise ValueError(f"{features_name} must be 2-D [B, D], got shape {tuple(features.shape)}")
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(
            f"{features_name} must be float32, float64, bfloat16 or float16, got {features.dtype}"
        )
    if bank.dim() != 2:
        raise ValueError(f"bank must be 2-D [N, D], got shape {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank must have at least one row, got an empty bank")
    if bank.shape[1] != features.shape[1]:
        raise ValueError(
            f"bank must have D={features.shape[1]} columns like {features_name}, got {bank.shape[1]}"
        )
    allowed = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.float64: (torch.float64,)}
    allowed[torch.bfloat16] = allowed[torch.float16] = allowed[torch.float32]
    if bank.dtype not in allowed[features.dtype]:
        raise TypeError(
            f"bank dtype {bank.dtype} does not go with {features_name} dtype {features.dtype}: "
            f"expected one of {[str(d) for d in allowed[features.dtype]]}"
        )
    if bank.requires_grad:
        raise ValueError(
            "bank must not require grad: the bank is updated by momentum, not by gradient "
            "(pass bank.detach() if that is what you mean)"
        )
    if bank.device != features.device:
        raise ValueError(f"bank is on {bank.device} but {features_name} is on {features.device}")


def _in_accumulation_dtype(features: Tensor) -> Tensor:
    """bfloat16/float16 features in float32, the kernels' accumulation dtype (a differentiable
    cast: their gradient comes back in their own dtype); float32/float64 as they are. Under
    ``torch.autocast`` a network's bf16/fp16 output arrives here and is handled the same way."""
    return features.float() if features.dtype in (torch.bfloat16, torch.float16) else features


def _check_rows_in_bank(rows: Tensor, name: str, bank_rows: int) -> None:
    if rows.numel() == 0:
        return
    if torch.compiler.is_compiling() or rows.device.type != "cpu":
        # On a GPU, reading the result on the host would synchronise every call, and while compiling
        # a data-dependent branch would break the graph: the check stays, on the device.
        torch._assert_async(
            ((rows >= -1) & (rows < bank_rows)).all(), f"{name} must be in [-1, N={bank_rows})"
        )
        return
    low, high = int(rows.min()), int(rows.max())
    if low < -1 or high >= bank_rows:
        bad = low if low < -1 else high
        raise ValueError(f"{name} must be in [-1, N={bank_rows}), got {bad}")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def _check_k(k, name: str, bank_rows: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 0 or k > bank_rows:
        raise ValueError(f"{name} must be in [0, N={bank_rows}], got {k}")
    return k


def _prepare(features, indices, bank, bank_labels, temperature, labels, backend):
    _check_features_and_bank(features, bank, "features")
    batch, bank_rows = features.shape[0], bank.shape[0]
    indices = _check_index_tensor(indices, "indices", batch, "B")
    bank_labels = _check_index_tensor(bank_labels, "bank_labels", bank_rows, "N")
    temperature = _check_temperature(temperature)
    for name, tensor in (("indices", indices), ("bank_labels", bank_labels)):
        if tensor.device != features.device:
            raise ValueError(f"{name} is on {tensor.device} but features is on {features.device}")
    _check_rows_in_bank(indices, "indices", bank_rows)
    if labels is None:
        message = (
            "labels must be given when a query has no bank row (indices contains -1): "
            "its class cannot be read from bank_labels"
        )
        if torch.compiler.is_compiling() or indices.device.type != "cpu":  # no host sync (see above)
            torch._assert_async((indices >= 0).all(), message)
        elif bool((indices < 0).any()):
            raise ValueError(message)
        labels = bank_labels[indices.clamp(min=0)]
    else:
        labels = _check_index_tensor(labels, "labels", batch, "B")
        if labels.device != features.device:
            raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    backend = _resolve_backend(backend, features.device)
    if backend == "reference":
        features = _in_accumulation_dtype(features)
    return features, indices, bank_labels, labels, temperature, backend


def _stats(features, indices, bank, bank_labels, temperature, labels, topk, backend, want_grad) -> SNCAStats:
    """(lse_same, lse_other, topk_values, topk_indices) from the chosen backend."""
    if backend == "reference":
        return SNCAStats(
            *reference.snca_stats_reference(
                features, indices, bank, bank_labels, temperature, labels=labels, topk=topk
            )
        )
    with_grad = want_grad and torch.is_grad_enabled() and features.requires_grad
    lse_same, lse_other, _, _, values, rows = _op("snca_forward", backend)(
        features, labels, indices, bank, bank_labels, temperature, with_grad, topk
    )
    return SNCAStats(lse_same, lse_other, values, rows)


# ----------------------------------------------------------------------------- public API


def snca_loss(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    margin: float = 0.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The SNCA loss of a batch against the memory bank, in one streaming pass.

    ``loss_i = -log(P_i e^-margin / (P_i e^-margin + Q_i))`` with ``P_i``, ``Q_i`` the same-class
    and other-class sums of ``exp(<f_i, m_j> / T)`` over the bank, the query's own row
    ``indices[i]`` excluded (README, "How it works"). A row with no positive contributes 0.
    The bank gets no gradient.

    Args:
        features: [B, D] query features (L2-normalise them first): float32 or float64, or
            bfloat16/float16 (e.g. a network's output under ``torch.autocast``): their dtype
            decides the products, as autocast does (the bank is read in it; the GPU backends
            multiply on 16-bit tensor cores, the CPU and the reference in float32), accumulation
            and the softmax state are float32, the loss is float32 and the gradient comes back
            in the features' dtype.
        indices: [B] integer, each query's own bank row, or -1 for a query with no row (which
            then needs ``labels``).
        bank: [N, D] the memory bank: float64 with float64 features, else float32, bfloat16
            or float16; it must not require grad.
        bank_labels: [N] integer class of every bank row.
        temperature: T > 0.
        margin: subtracted from the positives' logits (logit units, i.e. already divided by T).
        labels: [B] integer classes of the queries (default: ``bank_labels[indices]``).
        reduction: "mean" (sum over rows / B, the original's convention), "sum" or "none".
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        The loss: a scalar, or [B] with ``reduction="none"``; differentiable in ``features``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(margin, bool) or not isinstance(margin, Real) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    lse_same, lse_other, _, _ = _stats(
        features, indices, bank, bank_labels, temperature, labels, 0, backend, want_grad=True
    )
    return loss_from_lse(lse_same, lse_other, float(margin), reduction)


def loss_from_lse(
    lse_same: Tensor, lse_other: Tensor, margin: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """SNCA loss from the per-query same-class and other-class log-sum-exps (logit units).

    ``softplus(lse_other - lse_same + margin)``, which is ``-log(P e^-mu / (P e^-mu + Q))``
    without cancellation; 0 (and a zero gradient) for a row with no positive.

    Args:
        lse_same, lse_other: [B] as returned by ``snca_stats``.
        margin: in logit units. reduction: "mean" (sum / B), "sum" or "none".

    Returns:
        A scalar, or [B] with ``reduction="none"``.
    """
    has_positive = lse_same != _NEG_INF
    # Rows without a positive go through softplus with a harmless 0, so their gradient is 0, not NaN.
    gap = torch.where(has_positive, lse_other - lse_same + margin, torch.zeros_like(lse_same))
    threshold = 50.0 if gap.dtype == torch.float64 else 20.0
    per_row = torch.where(has_positive, F.softplus(gap, threshold=threshold), torch.zeros_like(gap))
    return reference.reduce_rows(per_row, reduction)


def snca_stats(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    topk: int = 0,
    backend: str = "auto",
) -> SNCAStats:
    """Per-query statistics of one pass over the bank: the loss's log-sum-exps and a top-k.

    The query's own row is excluded everywhere. Differentiable in ``features`` (the lses and the
    top-k values).

    Args:
        features, indices, bank, bank_labels, temperature, labels, backend: as ``snca_loss``.
        topk: k in [0, N], the number of nearest bank rows to return beside the sums.

    Returns:
        ``SNCAStats(lse_same, lse_other, topk_values, topk_indices)``: [B] log-sum-exps of
        ``<f_i, m_j> / T`` over same-class and other-class rows (-inf for an empty group); [B, k]
        the k largest inner products ``<f_i, m_j>`` (not divided by T), descending, ties to the
        lower bank row, and their rows; where fewer than k rows are eligible the tail is -inf
        with row -1.
    """
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    topk = _check_k(topk, "topk", bank.shape[0])
    return _stats(features, indices, bank, bank_labels, temperature, labels, topk, backend, want_grad=True)


def bank_topk(
    queries: Tensor,
    bank: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> TopK:
    """The k bank rows with the largest inner product with each query, in one streaming pass.

    Args:
        queries: [B, D] float32 or float64, or bfloat16/float16 (computed in float32).
        bank: [N, D], dtype as for ``snca_loss``.
        k: in [0, N].
        exclude: [B] integer, optional: a bank row query i must not return (its own), -1 for none.
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        ``TopK(values, indices)``, each [B, k]: values descending, ties to the lower bank row;
        where fewer than k rows are eligible the tail is -inf with index -1. ``values`` is
        differentiable in ``queries``.
    """
    _check_features_and_bank(queries, bank, "queries")
    k = _check_k(k, "k", bank.shape[0])
    batch, bank_rows = queries.shape[0], bank.shape[0]
    if exclude is None:
        exclude = torch.full((batch,), -1, dtype=torch.long, device=queries.device)
    else:
        exclude = _check_index_tensor(exclude, "exclude", batch, "B")
        if exclude.device != queries.device:
            raise ValueError(f"exclude is on {exclude.device} but queries is on {queries.device}")
        _check_rows_in_bank(exclude, "exclude", bank_rows)
    backend = _resolve_backend(backend, queries.device)
    queries = _in_accumulation_dtype(queries)
    if backend == "reference":
        return TopK(*reference.bank_topk_reference(queries, bank, k, exclude=exclude))
    return TopK(*_op("bank_topk", backend)(queries, bank, k, exclude))


def snca_partials(
    features: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    with_grad: bool = False,
    backend: str = "auto",
) -> SNCAPartials:
    """The raw statistics of one pass over a block of the bank, for exact combines over blocks
    (the sharded bank of ``snca_ext.distributed``); not differentiable: the caller builds the
    gradient from the combined weighted means (``d lse / d f = wmean / T``).

    Args:
        as ``snca_loss``; ``with_grad`` also accumulates the weighted means. ``backend`` must be a
        fused one (the reference does not compute the weighted means).

    Returns:
        ``SNCAPartials(lse_same, lse_other, wmean_same, wmean_other)``.
    """
    features, indices, bank_labels, labels, temperature, backend = _prepare(
        features, indices, bank, bank_labels, temperature, labels, backend
    )
    if backend == "reference":
        raise ValueError("snca_partials needs a fused backend (cpu, cuda or triton), got 'reference'")
    with torch.no_grad():
        lse_same, lse_other, wmean_same, wmean_other, _, _ = _op("snca_forward", backend)(
            features.detach(), labels, indices, bank, bank_labels, temperature, bool(with_grad), 0
        )
    return SNCAPartials(lse_same, lse_other, wmean_same, wmean_other)
