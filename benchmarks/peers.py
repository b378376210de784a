"""What a GPU user would write instead of snca_ext's fused op: SNCA as two FlexAttention calls.

MATH.md's gradient is two softmax-weighted means of bank rows, which is what an attention layer
returns when the bank is both its keys and its values; the two log-sum-exps are what attention
kernels return beside the output. So with queries = the batch, keys = values = the bank and
scale = 1/T, two calls of ``torch.nn.attention.flex_attention`` give the whole op:

    call "all":  mask "not my own row"                  -> lse_all,  out_all
    call "same": mask "same class and not my own row"   -> lse_same, out_same
    loss_i = lse_all_i - lse_same_i         (0 for a row with no positive: lse_same_i = -inf)
    d loss / d f_i = (out_all_i - out_same_i) / (T * B)     (for the mean over the batch)

The gradient is computed in the forward and handed back by a custom autograd Function: one pass
over the bank, no backward through flex_attention (which would be a second pass, as for any
attention layer). The block masks depend on the bank and on the batch (its own rows and labels):
they are built once by ``flex_bank``, outside any timing.

Two layouts of the bank, because the attention kernels parallelise over (batch, head, query block):

- ``chunks=1``: the bank as one sequence, ``[1, 1, N, D]``, queries ``[1, 1, B, D]``. At B = 256
  that is two query blocks of 128, so the whole bank is streamed by two thread blocks on the GPU.
- ``chunks=S``: the bank cut into S equal sequences ``[S, 1, L, D]`` (zero rows pad the last,
  masked out), the queries repeated over them; each chunk's (lse, out) are combined with a
  log-sum-exp, as split-KV attention kernels do. This fills the GPU.

``sort_by_class=True`` reorders the bank by label (and maps the own rows along), so a class's rows
are contiguous and the "same" call's block mask skips every block without a row of the query
block's classes.

Eager ``flex_attention`` (no torch.compile) materialises the B x N scores: it runs anywhere and is
what the CPU test checks; ``compiled=True`` is the GPU peer (torch 2.14's compiled CPU flex_attention
does not return the log-sum-exp).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

FLEX_BLOCK = 128  # flex_attention's default block size (rows of the bank per block)


@dataclass(frozen=True)
class FlexBank:
    """The bank laid out for the two FlexAttention calls, with the block masks of one batch.

    keys: [chunks, 1, rows_per_chunk, D], the bank (sorted by class if asked), zero rows at the end.
    mask_all / mask_same: block masks over (chunk, query, row of the chunk).
    """

    keys: Tensor
    mask_all: BlockMask
    mask_same: BlockMask
    batch: int


def split_bank(bank: Tensor, chunks: int, block_size: int = FLEX_BLOCK) -> Tensor:
    """[N, D] -> [chunks, 1, L, D]: the bank cut into ``chunks`` sequences of L rows, L the smallest
    multiple of ``block_size`` that holds them all; zero rows fill the end."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    n, dim = bank.shape
    rows = math.ceil(math.ceil(n / chunks) / block_size) * block_size
    keys = bank.new_zeros(chunks * rows, dim)
    keys[:n] = bank
    return keys.view(chunks, 1, rows, dim)


def flex_bank(
    indices: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    labels: Tensor | None = None,
    sort_by_class: bool = False,
    chunks: int = 1,
    block_size: int = FLEX_BLOCK,
) -> FlexBank:
    """Lay out ``bank`` for ``flex_snca_loss`` and build the block masks of this batch.

    Args:
        indices: [B] int64, each query's own bank row, or -1 for none (then ``labels`` is needed).
        bank: [N, D]; bank_labels: [N] int64.
        labels: [B] the queries' classes; default ``bank_labels[indices]``.
        sort_by_class: reorder the bank by label, so the "same class" mask is block-sparse.
        chunks: split the bank into this many sequences (the split-KV layout); 1 = one sequence.
        block_size: rows per block of the block masks.
    """
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D [B], got shape {tuple(indices.shape)}")
    if bank.dim() != 2 or bank_labels.shape != (bank.shape[0],):
        raise ValueError(
            f"bank must be [N, D] and bank_labels [N], got {tuple(bank.shape)} and {tuple(bank_labels.shape)}"
        )
    if labels is not None and labels.shape != indices.shape:
        raise ValueError(f"labels must have B={indices.shape[0]} entries, got shape {tuple(labels.shape)}")
    if labels is None:
        if bool((indices < 0).any()):
            raise ValueError("labels must be given when a query has no bank row (indices == -1)")
        labels = bank_labels[indices]
    n = bank.shape[0]
    batch = indices.shape[0]
    own = indices
    if sort_by_class:
        order = torch.argsort(bank_labels, stable=True)
        bank, bank_labels = bank[order], bank_labels[order]
        position = torch.empty_like(order)
        position[order] = torch.arange(n, device=order.device)
        own = torch.where(indices >= 0, position[indices.clamp(min=0)], -1)
    keys = split_bank(bank, chunks, block_size)
    rows = keys.shape[2]
    row_labels = bank_labels.new_full((chunks * rows,), -1)
    row_labels[:n] = bank_labels

    def not_own(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        row = b * rows + kv
        return (row < n) & (row != own[q])

    def same_not_own(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return not_own(b, h, q, kv) & (row_labels[b * rows + kv] == labels[q])

    def block_mask(mask_mod: Callable) -> BlockMask:
        return create_block_mask(
            mask_mod, chunks, None, batch, rows, device=bank.device, BLOCK_SIZE=block_size
        )

    return FlexBank(
        keys=keys,
        mask_all=block_mask(not_own),
        mask_same=block_mask(same_not_own),
        batch=batch,
    )


def _attend(query: Tensor, keys: Tensor, block_mask: BlockMask, scale: float) -> tuple[Tensor, Tensor]:
    """(lse [B], softmax-weighted mean of the key rows [B, D]) over every chunk, in fp32."""
    out, aux = flex_attention(
        query, keys, keys, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True)
    )
    lse_chunks = aux.lse[:, 0].float()  # natural log: flex_attention converts its base-2 state
    lse = torch.logsumexp(lse_chunks, dim=0)  # -inf where no chunk has an allowed row
    # An empty chunk (lse -inf, out 0) weighs 0; a row empty everywhere gives -inf - -inf = NaN: 0.
    weights = torch.where(torch.isneginf(lse_chunks), 0.0, torch.exp(lse_chunks - lse))
    return lse, (weights[..., None] * out[:, 0].float()).sum(dim=0)


def _loss_and_grad(
    features: Tensor, keys: Tensor, mask_all: BlockMask, mask_same: BlockMask, temperature: float
) -> tuple[Tensor, Tensor]:
    chunks, _, _, dim = keys.shape
    batch = features.shape[0]
    # flex_attention needs one dtype for queries and keys: the features take the bank's.
    query = features.to(keys.dtype).view(1, 1, batch, dim).expand(chunks, 1, batch, dim)
    lse_all, mean_all = _attend(query, keys, mask_all, 1.0 / temperature)
    lse_same, mean_same = _attend(query, keys, mask_same, 1.0 / temperature)
    positive = lse_same > -math.inf
    loss = torch.where(positive, lse_all - lse_same, 0.0).sum() / batch
    grad = torch.where(positive[:, None], mean_all - mean_same, 0.0) / (temperature * batch)
    return loss, grad


@functools.cache
def _compiled_loss_and_grad() -> Callable:
    # dynamic=False: one kernel per shape, as flex_attention's Triton templates are specialised.
    return torch.compile(_loss_and_grad, dynamic=False)


class _FlexSncaLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, keys, mask_all, mask_same, temperature, compiled):
        fn = _compiled_loss_and_grad() if compiled else _loss_and_grad
        loss, grad = fn(features.detach(), keys, mask_all, mask_same, temperature)
        ctx.save_for_backward(grad.to(features.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None


def flex_snca_loss(
    features: Tensor, prepared: FlexBank, temperature: float, *, compiled: bool = False
) -> Tensor:
    """SNCA loss (mean over the batch, margin 0) by two FlexAttention calls on ``prepared``.

    Args:
        features: [B, D] the batch (the same B queries ``prepared`` was built for).
        prepared: ``flex_bank(...)`` of the bank and this batch's indices / labels.
        temperature: T > 0.
        compiled: run ``torch.compile`` of the two calls (the GPU peer) instead of eager.

    Returns:
        The scalar loss in fp32; its gradient with respect to ``features`` is computed in the same
        forward (one pass over the bank).
    """
    if features.dim() != 2 or features.shape != (prepared.batch, prepared.keys.shape[-1]):
        raise ValueError(
            f"features must be [B={prepared.batch}, D={prepared.keys.shape[-1]}], got {tuple(features.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _FlexSncaLoss.apply(
        features, prepared.keys, prepared.mask_all, prepared.mask_same, temperature, compiled
    )
