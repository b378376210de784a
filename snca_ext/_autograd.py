"""Fake (meta) kernels and autograd formulas shared by every backend's registration of the ops.

Each backend registers an op with the schema of ``snca_ext::snca_forward`` or
``snca_ext::bank_topk`` (csrc/ops.cpp); these helpers give all of them the same shape function
and the same backward, which never reads the bank again except for the k top rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in, and return their statistics in: float64 for float64
    features, else float32 (bfloat16/float16 features included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def snca_forward_fake(features, labels, indices, bank, bank_labels, temperature, with_grad, k):
    rows, dim = features.shape
    grad_rows = rows if with_grad else 0
    acc = accumulation_dtype(features.dtype)
    return (
        features.new_empty(rows, dtype=acc),
        features.new_empty(rows, dtype=acc),
        features.new_empty(grad_rows, dim, dtype=acc),
        features.new_empty(grad_rows, dim, dtype=acc),
        features.new_empty(rows, k, dtype=acc),
        features.new_empty(rows, k, dtype=torch.long),
    )


def bank_topk_fake(queries, bank, k, exclude):
    rows = queries.shape[0]
    return queries.new_empty(rows, k), queries.new_empty(rows, k, dtype=torch.long)


def _topk_rows_grad(grad_values: Tensor | None, topk_indices: Tensor, bank: Tensor, dtype) -> Tensor | None:
    """d(sum g * <q_i, m_j>) / d q_i = sum_k g_ik m_{j_ik}: a gather of k rows per query.

    Written in differentiable operations: it is linear in g and does not depend on q, so its own
    derivatives are exact and the top-k values differentiate twice.
    """
    if grad_values is None or topk_indices.shape[1] == 0:
        return None
    valid = topk_indices >= 0
    # A padding entry (-1) contributes nothing, even when the bank row it stands on holds inf/NaN.
    rows = torch.where(valid[..., None], bank[topk_indices.clamp(min=0)].to(dtype), 0)
    weights = torch.where(valid, grad_values, torch.zeros_like(grad_values))
    return torch.einsum("bk,bkd->bd", weights, rows)


ONCE_DIFFERENTIABLE_MESSAGE = (
    "snca_ext ops are once differentiable: the gradient of snca_loss / snca_stats was built with "
    "create_graph=True and is now being differentiated again, but its derivative (a covariance of "
    "the bank rows under the softmax) is not computed by the fused op. Use backend='reference' "
    "for second derivatives (it materialises B x N)."
)


class _OnceDifferentiable(torch.autograd.Function):
    """Identity on a computed gradient whose own backward refuses: differentiating the gradient
    again would otherwise treat the accumulated means as constants and return wrong numbers."""

    @staticmethod
    def forward(grad: Tensor, anchor: Tensor) -> Tensor:
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(ONCE_DIFFERENTIABLE_MESSAGE)


def refuse_second_order(grad: Tensor, anchor: Tensor) -> Tensor:
    """``grad``, made to raise ``RuntimeError`` if it is differentiated again.

    Only under ``create_graph=True`` (grad mode on inside a backward) does it do anything.
    ``anchor`` is a tensor of the forward that depends on the features (an output of the op), so
    that the gradient is connected to the features even when the upstream gradients are constants:
    then no second derivative can silently come out as zero.
    """
    if not torch.is_grad_enabled() or not (anchor.requires_grad or grad.requires_grad):
        return grad
    return _OnceDifferentiable.apply(grad, anchor)


def lse_grad(
    grad_lse_same: Tensor, grad_lse_other: Tensor, wmean_same: Tensor, wmean_other: Tensor, inv_temperature
) -> Tensor:
    """The features' gradient from the upstream gradients of the two log-sum-exps.

    d lse / d f_i = wmean_i / T (README, "How it works"): the backward only scales what the forward
    accumulated and never reads the bank.
    """
    return (grad_lse_same[:, None] * wmean_same + grad_lse_other[:, None] * wmean_other) * inv_temperature


def _snca_forward_setup(ctx, inputs, output):
    _, _, _, bank, _, temperature, with_grad, k = inputs
    lse_same, _, wmean_same, wmean_other, _, topk_indices = output
    ctx.inv_temperature = 1.0 / temperature
    ctx.with_grad = with_grad
    # The bank is saved only for the top-k rows' gradient, so without a top-k it may be updated
    # in place between the forward and the backward. lse_same only anchors the refusal of a
    # second derivative (refuse_second_order); saving an output costs no memory.
    ctx.save_for_backward(wmean_same, wmean_other, topk_indices, bank if k > 0 else None, lse_same)
    ctx.mark_non_differentiable(wmean_same, wmean_other, topk_indices)


def _snca_forward_backward(ctx, grad_lse_same, grad_lse_other, _g_ws, _g_wo, grad_topk_values, _g_ti):
    wmean_same, wmean_other, topk_indices, bank, lse_same = ctx.saved_tensors
    if not ctx.with_grad:
        raise RuntimeError(
            "snca_forward was called with with_grad=False, so it kept no gradient accumulators; "
            "call it with with_grad=True when features require grad"
        )
    grad = lse_grad(grad_lse_same, grad_lse_other, wmean_same, wmean_other, ctx.inv_temperature)
    grad = refuse_second_order(grad, lse_same)
    topk_grad = None if bank is None else _topk_rows_grad(grad_topk_values, topk_indices, bank, grad.dtype)
    if topk_grad is not None:
        grad = grad + topk_grad
    return grad, None, None, None, None, None, None, None


def _bank_topk_setup(ctx, inputs, output):
    _, bank, _, _ = inputs
    _, indices = output
    ctx.save_for_backward(indices, bank)
    ctx.mark_non_differentiable(indices)


def _bank_topk_backward(ctx, grad_values, _grad_indices):
    indices, bank = ctx.saved_tensors
    grad = _topk_rows_grad(grad_values, indices, bank, grad_values.dtype)
    return grad, None, None, None


def register_snca_forward(op_name: str) -> None:
    """Registers the fake kernel and the autograd formula of an op with snca_forward's schema."""
    torch.library.register_fake(op_name)(snca_forward_fake)
    torch.library.register_autograd(op_name, _snca_forward_backward, setup_context=_snca_forward_setup)


def register_bank_topk(op_name: str) -> None:
    """Registers the fake kernel and the autograd formula of an op with bank_topk's schema."""
    torch.library.register_fake(op_name)(bank_topk_fake)
    torch.library.register_autograd(op_name, _bank_topk_backward, setup_context=_bank_topk_setup)
