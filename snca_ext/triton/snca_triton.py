"""Triton twin of the fused SNCA op (csrc/cpu/snca_cpu.cpp): ``snca_forward`` and ``bank_topk``.

One kernel streams the bank in tiles of BLOCK_N rows for a block of BLOCK_B queries and keeps, per
query, the online-softmax state of MATH.md: a running max and rescaled sum for the same-class and
the other-class log-sum-exp, optionally the rescaled softmax-weighted sums of bank rows (the
gradient), and optionally a running top-k of the raw inner products, the query's own row excluded.

Split-KV: B = 256 queries make only a handful of query blocks, far too few programs for a GPU,
so the bank is also cut into contiguous runs of tiles, one per program along the grid's second
axis (FlashAttention's split-KV decoding). Each program writes its partials (max, sum, weighted
sums, top-k candidates); a few torch ops combine them in split order, with no atomics, so the
result does not depend on scheduling.

Gradient: one pass. The weighted sums are accumulated in the forward beside the log-sum-exps
(``with_grad``), as the CPU and CUDA backends do, so the bank (656 MB at ImageNet size) is read
once per step instead of twice, and the backward is the shared O(B*D) formula of _autograd.py.
Its cost, two extra tile products per tile, is paid only when features require grad, and the
state it adds per program is two [BLOCK_B, D] accumulators, which fit beside the tile at D = 128;
a two-pass backward would re-read the whole bank and recompute every exponential.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _autograd

_NEG_INF = float("-inf")
# Globals read inside @triton.jit functions must be constexpr.
_MINUS_INF = tl.constexpr(float("-inf"))
_NAN = tl.constexpr(float("nan"))


@triton.jit
def _snca_partials_kernel(
    features_ptr,
    stride_fb,
    stride_fd,
    labels_ptr,
    own_rows_ptr,
    bank_ptr,
    stride_mn,
    stride_md,
    bank_labels_ptr,
    max_same_ptr,
    sum_same_ptr,
    max_other_ptr,
    sum_other_ptr,
    acc_same_ptr,
    acc_other_ptr,
    top_values_ptr,
    top_rows_ptr,
    num_queries,
    bank_rows,
    dim,
    inv_temperature_ptr,
    tiles_per_split,
    WITH_LSE: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    TOPK: tl.constexpr,
    USE_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partials of one (query block, bank split) pair; layouts: [splits, B] for the LSE state,
    [splits, B, D] for the weighted sums, [splits, B, TOPK] for the top-k candidates."""
    query_block = tl.program_id(0)
    split = tl.program_id(1)
    acc_dtype = tl.float64 if USE_FP64 else tl.float32

    queries = query_block * BLOCK_B + tl.arange(0, BLOCK_B)
    query_ok = queries < num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    feats = tl.load(
        features_ptr + queries[:, None].to(tl.int64) * stride_fb + dims[None, :] * stride_fd,
        mask=query_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(acc_dtype)
    own = tl.load(own_rows_ptr + queries, mask=query_ok, other=-1)
    if WITH_LSE:
        labels = tl.load(labels_ptr + queries, mask=query_ok, other=0)
        # Read from memory: a Python float argument would arrive as fp32 even for fp64 inputs.
        inv_temperature = tl.load(inv_temperature_ptr).to(acc_dtype)

    max_same = tl.full([BLOCK_B], _MINUS_INF, acc_dtype)
    max_other = tl.full([BLOCK_B], _MINUS_INF, acc_dtype)
    sum_same = tl.zeros([BLOCK_B], acc_dtype)
    sum_other = tl.zeros([BLOCK_B], acc_dtype)
    nan_same = tl.zeros([BLOCK_B], tl.int32)
    nan_other = tl.zeros([BLOCK_B], tl.int32)
    acc_same = tl.zeros([BLOCK_B, BLOCK_D], acc_dtype)
    acc_other = tl.zeros([BLOCK_B, BLOCK_D], acc_dtype)
    # The running top-k, unsorted. Empty slots hold -inf with distinct negative rows (-1 - slot) so
    # that "the worst slot" (lowest value, then highest row) is always exactly one slot.
    if TOPK > 0:
        slots = tl.arange(0, TOPK)
        top_values = tl.full([BLOCK_B, TOPK], _MINUS_INF, acc_dtype)
        top_rows = tl.zeros([BLOCK_B, TOPK], tl.int32) - 1 - slots[None, :]

    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(bank_rows, BLOCK_N))
    for tile in range(tile_begin, tile_end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < bank_rows
        bank_tile = tl.load(
            bank_ptr + rows[:, None].to(tl.int64) * stride_mn + dims[None, :] * stride_md,
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(acc_dtype)
        if USE_FP64:
            # fp64 exists for the float64 test oracle; plain products keep it exact on any GPU.
            dots = tl.sum(feats[:, None, :] * bank_tile[None, :, :], axis=2)
        else:
            dots = tl.dot(feats, tl.trans(bank_tile), input_precision=INPUT_PRECISION)
        eligible = row_ok[None, :] & (rows[None, :] != own[:, None])
        is_nan = dots != dots

        if WITH_LSE:
            bank_labels = tl.load(bank_labels_ptr + rows, mask=row_ok, other=0)
            logits = dots * inv_temperature
            same = eligible & (bank_labels[None, :] == labels[:, None])
            other = eligible & (bank_labels[None, :] != labels[:, None])
            # NaN logits are kept out of the max and the sums and reported through a flag.
            nan_same = tl.maximum(nan_same, tl.max((same & is_nan).to(tl.int32), axis=1))
            nan_other = tl.maximum(nan_other, tl.max((other & is_nan).to(tl.int32), axis=1))
            logit_same = tl.where(same & ~is_nan, logits, _MINUS_INF)
            logit_other = tl.where(other & ~is_nan, logits, _MINUS_INF)

            new_max_same = tl.maximum(max_same, tl.max(logit_same, axis=1))
            new_max_other = tl.maximum(max_other, tl.max(logit_other, axis=1))
            # An all -inf group subtracts 0 instead of -inf, so exp gives 0, never NaN.
            shift_same = tl.where(new_max_same == _MINUS_INF, 0.0, new_max_same)
            shift_other = tl.where(new_max_other == _MINUS_INF, 0.0, new_max_other)
            scale_same = tl.exp(max_same - shift_same)
            scale_other = tl.exp(max_other - shift_other)
            weight_same = tl.exp(logit_same - shift_same[:, None])
            weight_other = tl.exp(logit_other - shift_other[:, None])
            sum_same = sum_same * scale_same + tl.sum(weight_same, axis=1)
            sum_other = sum_other * scale_other + tl.sum(weight_other, axis=1)
            max_same = new_max_same
            max_other = new_max_other
            if WITH_GRAD:
                if USE_FP64:
                    tile_same = tl.sum(weight_same[:, :, None] * bank_tile[None, :, :], axis=1)
                    tile_other = tl.sum(weight_other[:, :, None] * bank_tile[None, :, :], axis=1)
                else:
                    tile_same = tl.dot(weight_same, bank_tile, input_precision=INPUT_PRECISION)
                    tile_other = tl.dot(weight_other, bank_tile, input_precision=INPUT_PRECISION)
                acc_same = acc_same * scale_same[:, None] + tile_same
                acc_other = acc_other * scale_other[:, None] + tile_other

        if TOPK > 0:
            # Rows arrive in increasing order, so a candidate equal to the current k-th value has
            # a higher row and loses the tie: only strictly larger values enter. Each round moves
            # every query's best remaining candidate (ties to the lower row) into its worst slot;
            # after the first tiles a round or two is all a tile needs.
            candidates = tl.where(eligible & ~is_nan, dots, _MINUS_INF)
            best = tl.max(candidates, axis=1)
            worst = tl.min(top_values, axis=1)
            pending = tl.sum((best > worst).to(tl.int32), axis=0)
            while pending > 0:
                take = best > worst
                best_row = tl.min(tl.where(candidates == best[:, None], rows[None, :], 2147483647), axis=1)
                worst_row = tl.max(tl.where(top_values == worst[:, None], top_rows, -2147483647), axis=1)
                replace = take[:, None] & (top_values == worst[:, None]) & (top_rows == worst_row[:, None])
                top_values = tl.where(replace, best[:, None], top_values)
                top_rows = tl.where(replace, best_row[:, None], top_rows)
                candidates = tl.where(rows[None, :] == best_row[:, None], _MINUS_INF, candidates)
                best = tl.max(candidates, axis=1)
                worst = tl.min(top_values, axis=1)
                pending = tl.sum((best > worst).to(tl.int32), axis=0)

    state = split * num_queries + queries
    if WITH_LSE:
        # A NaN in a group makes its sum NaN, which the combine carries into that group's lse.
        sum_same = tl.where(nan_same > 0, _NAN, sum_same)
        sum_other = tl.where(nan_other > 0, _NAN, sum_other)
        tl.store(max_same_ptr + state, max_same, mask=query_ok)
        tl.store(sum_same_ptr + state, sum_same, mask=query_ok)
        tl.store(max_other_ptr + state, max_other, mask=query_ok)
        tl.store(sum_other_ptr + state, sum_other, mask=query_ok)
        if WITH_GRAD:
            acc_offsets = state[:, None].to(tl.int64) * dim + dims[None, :]
            acc_mask = query_ok[:, None] & dim_ok[None, :]
            tl.store(acc_same_ptr + acc_offsets, acc_same, mask=acc_mask)
            tl.store(acc_other_ptr + acc_offsets, acc_other, mask=acc_mask)
    if TOPK > 0:
        top_offsets = state[:, None].to(tl.int64) * TOPK + slots[None, :]
        tl.store(top_values_ptr + top_offsets, top_values, mask=query_ok[:, None])
        tl.store(top_rows_ptr + top_offsets, top_rows, mask=query_ok[:, None])


# ----------------------------------------------------------------------------- launch plan


class _Plan:
    """Block sizes and bank split of one launch. The same code plans GPU and interpreter runs;
    only the number of programs to aim for comes from the device."""

    def __init__(self, batch: int, bank_rows: int, dim: int, fp64: bool, k: int, with_grad: bool, device):
        self.block_d = max(16, triton.next_power_of_2(dim))
        self.topk = triton.next_power_of_2(k) if k > 0 else 0
        if fp64:
            # Elementwise products materialise [BLOCK_B, BLOCK_N, BLOCK_D]: keep the tiles small.
            self.block_b, self.block_n, self.num_warps = 16, 16, 4
        else:
            # tl.dot needs every side >= 16. Two [BLOCK_B, D] accumulators or a wide top-k state
            # cost registers, so those configurations take fewer queries per program.
            heavy = (with_grad and self.block_d >= 128) or self.topk > 32 or self.block_d > 256
            self.block_b = 32 if heavy else 64
            # Wide rows take shorter tiles, so the pipelined bank tiles still fit in shared memory.
            self.block_n = 64 if self.block_d <= 128 else 32
            self.num_warps = 8 if self.block_d >= 128 else 4
        self.query_blocks = triton.cdiv(batch, self.block_b)
        num_tiles = triton.cdiv(bank_rows, self.block_n)
        # Aim for two waves of programs over the device; each split is a whole number of tiles.
        wanted_splits = triton.cdiv(2 * _device_programs(device), self.query_blocks)
        splits = max(1, min(wanted_splits, num_tiles))
        self.tiles_per_split = triton.cdiv(num_tiles, splits)
        self.splits = triton.cdiv(num_tiles, self.tiles_per_split)

    @property
    def grid(self) -> tuple[int, int]:
        # Query blocks vary fastest, so the programs that read the same bank split run side by
        # side and share its tiles through L2.
        return (self.query_blocks, self.splits)


def _device_programs(device: torch.device) -> int:
    """How many programs run at once: the SM count on a GPU. The interpreter runs programs one
    after another, so a few splits suffice there to exercise the combine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _input_precision() -> str:
    # Triton's default would be tf32; honour PyTorch's float32 matmul setting instead.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(features, labels, own_rows, bank, bank_labels, temperature, with_lse, with_grad, k):
    batch, dim = features.shape
    bank_rows = bank.shape[0]
    fp64 = features.dtype == torch.float64
    plan = _Plan(batch, bank_rows, dim, fp64, k, with_grad, features.device)
    acc_dtype = features.dtype
    splits = plan.splits
    state_shape = (splits, batch) if with_lse else (0,)
    max_same = features.new_empty(state_shape, dtype=acc_dtype)
    sum_same = features.new_empty(state_shape, dtype=acc_dtype)
    max_other = features.new_empty(state_shape, dtype=acc_dtype)
    sum_other = features.new_empty(state_shape, dtype=acc_dtype)
    acc_shape = (splits, batch, dim) if with_grad else (0,)
    acc_same = features.new_empty(acc_shape, dtype=acc_dtype)
    acc_other = features.new_empty(acc_shape, dtype=acc_dtype)
    top_shape = (splits, batch, plan.topk) if k > 0 else (0,)
    top_values = features.new_empty(top_shape, dtype=acc_dtype)
    top_rows = features.new_empty(top_shape, dtype=torch.int32)
    wrap_triton(_snca_partials_kernel)[plan.grid](
        features,
        features.stride(0),
        features.stride(1),
        labels,
        own_rows,
        bank,
        bank.stride(0),
        bank.stride(1),
        bank_labels,
        max_same,
        sum_same,
        max_other,
        sum_other,
        acc_same,
        acc_other,
        top_values,
        top_rows,
        batch,
        bank_rows,
        dim,
        features.new_full((1,), 1.0 / temperature),
        plan.tiles_per_split,
        WITH_LSE=with_lse,
        WITH_GRAD=with_grad,
        TOPK=plan.topk,
        USE_FP64=fp64,
        INPUT_PRECISION=_input_precision(),
        BLOCK_B=plan.block_b,
        BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d,
        num_warps=plan.num_warps,
    )
    return (max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows)


# ----------------------------------------------------------------------------- combine


def _combine_lse(part_max: Tensor, part_sum: Tensor, part_acc: Tensor | None):
    """log-sum-exp (and normalised weighted sum) of a group from its per-split partials."""
    top = part_max.amax(dim=0)
    shift = torch.where(top == _NEG_INF, torch.zeros_like(top), top)
    # exp(-inf - shift) = 0 drops the splits that saw no row of the group.
    scale = torch.exp(part_max - shift)
    total = (part_sum * scale).sum(dim=0)
    lse = torch.where(total == 0, torch.full_like(total, _NEG_INF), shift + torch.log(total))
    if part_acc is None:
        return lse, None
    weighted = (part_acc * scale[:, :, None]).sum(dim=0)
    wmean = torch.where(total[:, None] == 0, torch.zeros_like(weighted), weighted / total[:, None])
    return lse, wmean


def _combine_topk(part_values: Tensor, part_rows: Tensor, k: int, dtype: torch.dtype):
    """Top k of the per-split candidates: value descending, ties to the lower bank row."""
    batch = part_values.shape[1]
    values = part_values.permute(1, 0, 2).reshape(batch, -1)
    rows = part_rows.permute(1, 0, 2).reshape(batch, -1).long()
    # Two stable sorts give the (value desc, row asc) order; empty slots (-inf) sort last.
    by_row = torch.argsort(rows, dim=1, stable=True)
    values, rows = values.gather(1, by_row), rows.gather(1, by_row)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    values, rows = values.gather(1, by_value), rows.gather(1, by_value)
    rows = torch.where(rows < 0, torch.full_like(rows, -1), rows)
    return values.to(dtype), rows


# ----------------------------------------------------------------------------- the ops


def _check(features: Tensor, bank: Tensor, own_rows: Tensor, k: int, name: str) -> None:
    if features.dim() != 2 or bank.dim() != 2:
        raise ValueError(
            f"{name} and bank must be 2-D, got shapes {tuple(features.shape)}, {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0 or bank.shape[1] != features.shape[1]:
        raise ValueError(f"bank must be [N>0, D={features.shape[1]}], got shape {tuple(bank.shape)}")
    allowed = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.float64: (torch.float64,)}
    if features.dtype not in allowed or bank.dtype not in allowed[features.dtype]:
        raise TypeError(f"bank dtype {bank.dtype} does not go with {name} dtype {features.dtype}")
    if own_rows.shape != (features.shape[0],):
        raise ValueError(
            f"the own-row tensor must have B={features.shape[0]} entries, got {tuple(own_rows.shape)}"
        )
    if not 0 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [0, N={bank.shape[0]}], got {k}")


_FORWARD_SCHEMA = (
    "(Tensor features, Tensor labels, Tensor indices, Tensor bank, Tensor bank_labels, "
    "float temperature, bool with_grad, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_TOPK_SCHEMA = "(Tensor queries, Tensor bank, int k, Tensor exclude) -> (Tensor, Tensor)"


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
    if batch == 0:
        empty = features.new_empty(0)
        return (
            empty,
            empty.clone(),
            features.new_zeros(grad_rows, dim),
            features.new_zeros(grad_rows, dim),
            features.new_empty(0, k),
            features.new_empty(0, k, dtype=torch.long),
        )
    max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows = _launch(
        features,
        labels.long().contiguous(),
        indices.long().contiguous(),
        bank,
        bank_labels.long().contiguous(),
        temperature,
        True,
        with_grad,
        k,
    )
    lse_same, wmean_same = _combine_lse(max_same, sum_same, acc_same if with_grad else None)
    lse_other, wmean_other = _combine_lse(max_other, sum_other, acc_other if with_grad else None)
    if not with_grad:
        wmean_same = features.new_empty(0, dim)
        wmean_other = features.new_empty(0, dim)
    if k > 0:
        values, rows = _combine_topk(top_values, top_rows, k, features.dtype)
    else:
        values, rows = features.new_empty(batch, 0), features.new_empty(batch, 0, dtype=torch.long)
    return lse_same, lse_other, wmean_same, wmean_other, values, rows


def _bank_topk_impl(queries: Tensor, bank: Tensor, k: int, exclude: Tensor) -> tuple[Tensor, Tensor]:
    """Triton ``snca_ext::bank_topk``: the k largest <q_i, m_j>, j != exclude[i]."""
    _check(queries, bank, exclude, k, "queries")
    queries = queries.detach()
    batch = queries.shape[0]
    if batch == 0 or k == 0:
        return queries.new_empty(batch, k), queries.new_empty(batch, k, dtype=torch.long)
    exclude = exclude.long().contiguous()
    *_, top_values, top_rows = _launch(queries, exclude, exclude, bank, exclude, 1.0, False, False, k)
    return _combine_topk(top_values, top_rows, k, queries.dtype)


snca_forward = triton_op("snca_ext::snca_forward_triton", mutates_args=(), schema=_FORWARD_SCHEMA)(
    _snca_forward_impl
)
bank_topk = triton_op("snca_ext::bank_topk_triton", mutates_args=(), schema=_TOPK_SCHEMA)(_bank_topk_impl)
_autograd.register_snca_forward("snca_ext::snca_forward_triton")
_autograd.register_bank_topk("snca_ext::bank_topk_triton")
