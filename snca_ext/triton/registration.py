"""The Triton ops' registration: ``snca_ext::snca_forward_triton`` and
``snca_ext::bank_topk_triton``, with the schemas of ``snca_ext::snca_forward`` and
``snca_ext::bank_topk`` (csrc/ops.cpp), through ``triton_op`` so that torch.compile traces them,
with the fake kernels and autograd formulas every backend shares (snca_ext/_autograd.py)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .. import _autograd
from .configs import DTYPE_NAMES, fuses_topk
from .launch import combine_groups, launch, merge_split_topk, topk_rounds


def _check(features: Tensor, bank: Tensor, own_rows: Tensor, k: int, name: str) -> None:
    if features.dim() != 2 or bank.dim() != 2:
        raise ValueError(
            f"{name} and bank must be 2-D, got shapes {tuple(features.shape)}, {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0 or bank.shape[1] != features.shape[1]:
        raise ValueError(f"bank must be [N>0, D={features.shape[1]}], got shape {tuple(bank.shape)}")
    allowed = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.float64: (torch.float64,)}
    allowed[torch.bfloat16] = allowed[torch.float16] = allowed[torch.float32]
    if features.dtype not in allowed or bank.dtype not in allowed[features.dtype]:
        raise TypeError(f"bank dtype {bank.dtype} does not go with {name} dtype {features.dtype}")
    if own_rows.shape != (features.shape[0],):
        raise ValueError(
            f"the own-row tensor must have B={features.shape[0]} entries, got {tuple(own_rows.shape)}"
        )
    if not 0 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [0, N={bank.shape[0]}], got {k}")


# The schemas of csrc/ops.cpp, for a package whose compiled library did not load (it imports and
# works without it); test_triton.py checks that they match the compiled library's.
_SCHEMAS = {
    "snca_forward": (
        "(Tensor features, Tensor labels, Tensor indices, Tensor bank, Tensor bank_labels, "
        "float temperature, bool with_grad, int k) -> (Tensor lse_same, Tensor lse_other, "
        "Tensor wmean_same, Tensor wmean_other, Tensor topk_values, Tensor topk_indices)"
    ),
    "bank_topk": "(Tensor queries, Tensor bank, int k, Tensor exclude) -> (Tensor values, Tensor indices)",
}


def schema(op: str) -> str:
    """The schema of ``snca_ext::<op>`` without its name: the compiled library's own (csrc/ops.cpp,
    the one copy) when it is loaded, else the copy above."""
    try:
        registered = getattr(torch.ops.snca_ext, op).default._schema
    except (AttributeError, RuntimeError):
        return _SCHEMAS[op]
    return str(registered).removeprefix(f"snca_ext::{op}")


def _snca_forward_impl(
    features: Tensor,
    labels: Tensor,
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    temperature: float,
    with_grad: bool,
    k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``snca_ext::snca_forward``: outputs and conventions as in csrc/ops.cpp."""
    _check(features, bank, indices, k, "features")
    features = features.detach()
    batch, dim = features.shape
    grad_rows = batch if with_grad else 0
    # Every statistic in the accumulation dtype: float32 for bf16/fp16 features too.
    acc = _autograd.accumulation_dtype(features.dtype)
    if batch == 0:
        empty = features.new_empty(0, dtype=acc)
        return (
            empty,
            empty.clone(),
            features.new_zeros(grad_rows, dim, dtype=acc),
            features.new_zeros(grad_rows, dim, dtype=acc),
            features.new_empty(0, k, dtype=acc),
            features.new_empty(0, k, dtype=torch.long),
        )
    indices = indices.long().contiguous()
    # A top-k that fits one running list rides on the log-sum-exp pass where the registers allow;
    # otherwise it takes its own rounds after it.
    fused_topk = fuses_topk(dim, DTYPE_NAMES[features.dtype], with_grad, k)
    max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows = launch(
        features,
        labels.long().contiguous(),
        indices,
        bank,
        bank_labels.long().contiguous(),
        temperature,
        True,
        with_grad,
        k if fused_topk else 0,
    )
    lse_same, lse_other, wmean_same, wmean_other = combine_groups(
        max_same, sum_same, max_other, sum_other, acc_same, acc_other, with_grad
    )
    if not with_grad:
        wmean_same = features.new_empty(0, dim, dtype=acc)
        wmean_other = features.new_empty(0, dim, dtype=acc)
    if k > 0:
        if fused_topk:
            values, rows = merge_split_topk(top_values, top_rows, k)
        else:
            values, rows = topk_rounds(features, indices, bank, k)
    else:
        values, rows = features.new_empty(batch, 0, dtype=acc), features.new_empty(batch, 0, dtype=torch.long)
    return lse_same, lse_other, wmean_same, wmean_other, values, rows


def _bank_topk_impl(queries: Tensor, bank: Tensor, k: int, exclude: Tensor) -> tuple[Tensor, Tensor]:
    """Triton ``snca_ext::bank_topk``: the k largest <q_i, m_j>, j != exclude[i]."""
    _check(queries, bank, exclude, k, "queries")
    if queries.dtype not in (torch.float32, torch.float64):
        # As the CPU op: snca_ext.bank_topk ranks 16-bit queries in float32 (exact ranking).
        raise TypeError(f"queries must be float32 or float64, got {queries.dtype}")
    queries = queries.detach()
    batch = queries.shape[0]
    if batch == 0 or k == 0:
        return queries.new_empty(batch, k), queries.new_empty(batch, k, dtype=torch.long)
    return tuple(topk_rounds(queries, exclude.long().contiguous(), bank, k))


snca_forward = triton_op("snca_ext::snca_forward_triton", mutates_args=(), schema=schema("snca_forward"))(
    _snca_forward_impl
)
bank_topk = triton_op("snca_ext::bank_topk_triton", mutates_args=(), schema=schema("bank_topk"))(
    _bank_topk_impl
)
_autograd.register_snca_forward("snca_ext::snca_forward_triton")
_autograd.register_bank_topk("snca_ext::bank_topk_triton")
