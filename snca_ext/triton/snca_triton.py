"""Triton twin of the fused SNCA op (csrc/cpu/snca_forward.cpp, bank_topk.cpp): ``snca_forward``
and ``bank_topk``.

One kernel streams the bank in tiles of BLOCK_N rows for a block of BLOCK_B queries and keeps, per
query, the online-softmax state of the README's "How it works": a running max and rescaled sum for
the same-class and the other-class log-sum-exp, optionally the rescaled softmax-weighted sums of
bank rows (the gradient), and optionally a running top-k of the raw inner products, the query's
own row excluded.

Split-KV: B = 256 queries make only a handful of query blocks, far too few programs for a GPU,
so the bank is also cut into contiguous runs of tiles, one per program along the grid's second
axis (FlashAttention's split-KV decoding). Each program writes its partials (max, sum, weighted
sums, top-k candidates); a few torch ops combine them in split order, with no atomics, so the
result does not depend on scheduling.

Gradient: one pass. The weighted sums are accumulated in the forward beside the log-sum-exps
(``with_grad``), as the CPU and CUDA backends do, so the bank (656 MB at ImageNet size) is read
once per step instead of twice, and the backward is the shared O(B*D) formula of _autograd.py.
Its cost, two extra tile products per tile, is paid only when features require grad, and the
state it adds per program is two [BLOCK_B, D] accumulators, which fit beside the tile at D = 128
(at D > 128 each program keeps 128 of their columns and the scores are computed once per part);
a two-pass backward would re-read the whole bank and recompute every exponential.

Precision: fp32 features run on tf32 tensor cores with split operands (each value = a high and a
low tf32 part; the products high*high + high*low + low*high, about fp32 accuracy; a bf16/fp16
bank is exact in tf32 and needs two). The split rounds in software, so every product is exact
and the interpreter's fp32 matmul computes what a tensor core does up to the order of the fp32
additions. Only where PyTorch allows TF32 matmuls does one tf32 product do. fp64 uses fp64 MMAs.

Non-finite scores follow one contract with every backend: a group's lse is NaN if any of its
scores is NaN, else +inf if any is +inf; -inf scores add nothing; in the top-k NaN ranks above
+inf. A split product cannot carry inf (inf * 0 = NaN in a cross term), so the rare tile whose
scores come out non-finite recomputes them in IEEE fp32.

Top-k: a running list of at most 128 per query lives in registers; a larger k (any k <= N) runs
in rounds, each a streaming pass that continues after the previous round's last (value, row).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _autograd, combine

_NEG_INF = float("-inf")
# Globals read inside @triton.jit functions must be constexpr.
_MINUS_INF = tl.constexpr(float("-inf"))
_PLUS_INF = tl.constexpr(float("inf"))
# No NaN global: Triton checks before each launch that every global a kernel reads still equals
# (==) its value at compile time, which a NaN never does. Kernels write float("nan") in place.


@triton.jit
def _tf32_round(x):
    """x rounded to the nearest tf32 value (ties away from zero, as cvt.rna.tf32.f32 does), held
    in fp32. A product of two such values is exact in fp32, so a tensor core and the interpreter's
    fp32 matmul compute the same products; only the order of the fp32 additions differs. For
    finite x only: a NaN's payload could carry into the sign bit."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_split(x, FINITE: tl.constexpr):
    """x = high + low, both tf32 values (low up to a rounding of 2^-22 |x|). +-inf and NaN stay in
    the high part alone (their low part would be inf - inf = NaN); FINITE skips those guards. A
    finite |x| within half a tf32 step of the fp32 maximum rounds to inf, as the hardware does."""
    high = _tf32_round(x)
    if not FINITE:
        high = tl.where(x != x, x, high)
    low = x - high
    if not FINITE:
        low = tl.where(tl.abs(low) < _PLUS_INF, low, 0.0)
    return high, _tf32_round(low)


@triton.jit
def _dot_split(a_high, a_low, b_high, b_low, B_EXACT: tl.constexpr):
    """a @ b on tf32 tensor cores at about fp32 accuracy ("3xTF32"): the three products of the
    split parts that matter, the small ones first; low x low (below 2^-22 relative) is dropped.
    With B_EXACT (b already a tf32 value: a bf16/fp16 bank) b_low is zero and its product skipped."""
    out = tl.dot(a_low, b_high, input_precision="tf32")
    if not B_EXACT:
        out = tl.dot(a_high, b_low, out, input_precision="tf32")
    return tl.dot(a_high, b_high, out, input_precision="tf32")


@triton.jit
def _fma_dots(
    features_ptr, stride_fb, stride_fd, queries, query_ok, bank_ptr, stride_mn, stride_md, rows, row_ok, dim
):
    """The [queries, rows] inner products in plain fp32 FMAs, one dimension after the other."""
    out = tl.zeros([queries.shape[0], rows.shape[0]], tl.float32)
    for d in range(dim):
        f = tl.load(features_ptr + queries.to(tl.int64) * stride_fb + d * stride_fd, mask=query_ok, other=0.0)
        m = tl.load(bank_ptr + rows.to(tl.int64) * stride_mn + d * stride_md, mask=row_ok, other=0.0)
        out += f.to(tl.float32)[:, None] * m.to(tl.float32)[None, :]
    return out


@triton.jit
def _order_key(x, USE_FP64: tl.constexpr):
    """An integer whose order is torch.topk's order of the scores: NaN above +inf, -0.0 == 0.0.
    Integer keys make the top-k a total order that max/min reductions handle exactly."""
    x = tl.where(x == 0, 0.0, x)  # -0.0 and 0.0 tie
    if USE_FP64:
        bits = x.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        key = tl.where(x != x, 0x7FF8000000000000, key)
    else:
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(x != x, 0x7FC00000, key)
    return key


@triton.jit
def _key_value(key, EMPTY: tl.constexpr, USE_FP64: tl.constexpr):
    """The score of an _order_key (the map is its own inverse); -inf for an empty slot."""
    if USE_FP64:
        value = tl.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).to(tl.float64, bitcast=True)
    else:
        value = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
    return tl.where(key == EMPTY, _MINUS_INF, value)


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
    cursor_keys_ptr,
    cursor_rows_ptr,
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
    PRECISION: tl.constexpr,
    BANK_EXACT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_D: tl.constexpr,
):
    """Partials of one (query block, bank split) pair; layouts: [splits, B] for the LSE state,
    [splits, B, D] for the weighted sums, [splits, B, TOPK] for the top-k candidates.

    PRECISION: "split" (fp32 features: tf32 tensor cores on split operands, about fp32 accuracy),
    "tf32" (one tf32 product, when PyTorch allows TF32 matmuls) or "ieee" (fp64 products).
    GRAD_D < BLOCK_D: the weighted sums are cut into GRAD_D-column parts, one per program along
    the grid's third axis; every part computes the whole scores, part 0 alone writes the LSE
    state and the top-k."""
    query_block = tl.program_id(0)
    split = tl.program_id(1)
    grad_part = tl.program_id(2)
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    key_dtype = tl.int64 if USE_FP64 else tl.int32
    EMPTY: tl.constexpr = -9223372036854775808 if USE_FP64 else -2147483648

    queries = query_block * BLOCK_B + tl.arange(0, BLOCK_B)
    query_ok = queries < num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    feats = tl.load(
        features_ptr + queries[:, None].to(tl.int64) * stride_fb + dims[None, :] * stride_fd,
        mask=query_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(acc_dtype)
    if PRECISION == "split":
        # The queries never change: split them once, not once per tile.
        feats_high, feats_low = _tf32_split(feats, False)
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
    acc_dims = grad_part * GRAD_D + tl.arange(0, GRAD_D)
    acc_dim_ok = acc_dims < dim
    acc_same = tl.zeros([BLOCK_B, GRAD_D], acc_dtype)
    acc_other = tl.zeros([BLOCK_B, GRAD_D], acc_dtype)
    # The running top-k as order keys, unsorted. Empty slots hold the EMPTY key (below every
    # score, -inf included) with distinct negative rows (-1 - slot), so that "the worst slot"
    # (lowest key, then highest row) is always exactly one slot. Only candidates ranked after the
    # cursor (key, row) enter: a later round of a large k continues where the previous one ended.
    if TOPK > 0:
        slots = tl.arange(0, TOPK)
        top_keys = tl.full([BLOCK_B, TOPK], EMPTY, key_dtype)
        top_rows = tl.zeros([BLOCK_B, TOPK], tl.int32) - 1 - slots[None, :]
        cursor_key = tl.load(cursor_keys_ptr + queries, mask=query_ok, other=EMPTY)
        cursor_row = tl.load(cursor_rows_ptr + queries, mask=query_ok, other=0)

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
        if PRECISION == "split":
            if BANK_EXACT:
                bank_high = bank_tile
                bank_low = bank_tile
            else:
                bank_high, bank_low = _tf32_split(bank_tile, False)
            dots = _dot_split(feats_high, feats_low, tl.trans(bank_high), tl.trans(bank_low), BANK_EXACT)
        else:
            dots = tl.dot(feats, tl.trans(bank_tile), input_precision=PRECISION)
        if PRECISION != "ieee":
            # A non-finite input breaks the tf32 products (inf * 0 = NaN in a split's cross term,
            # and tf32 rounding can carry a huge value to inf), but it always makes the tile's
            # result non-finite too: such a rare tile recomputes those scores in IEEE fp32.
            finite = tl.abs(dots) < _PLUS_INF
            if tl.min(finite.to(tl.int32)) == 0:
                exact = _fma_dots(
                    features_ptr,
                    stride_fb,
                    stride_fd,
                    queries,
                    query_ok,
                    bank_ptr,
                    stride_mn,
                    stride_md,
                    rows,
                    row_ok,
                    dim,
                )
                dots = tl.where(finite, dots, exact)
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
            # An all -inf group subtracts 0 instead of -inf, so exp gives 0, never NaN; a score at
            # a +inf max weighs 1 (exp(inf - inf) would be NaN): the sum counts the +inf scores,
            # the lse is +inf and the weighted mean is their mean, the softmax's limit.
            shift_same = tl.where(new_max_same == _MINUS_INF, 0.0, new_max_same)
            shift_other = tl.where(new_max_other == _MINUS_INF, 0.0, new_max_other)
            scale_same = tl.where(max_same == shift_same, 1.0, tl.exp(max_same - shift_same))
            scale_other = tl.where(max_other == shift_other, 1.0, tl.exp(max_other - shift_other))
            weight_same = tl.where(
                logit_same == shift_same[:, None], 1.0, tl.exp(logit_same - shift_same[:, None])
            )
            weight_other = tl.where(
                logit_other == shift_other[:, None], 1.0, tl.exp(logit_other - shift_other[:, None])
            )
            sum_same = sum_same * scale_same + tl.sum(weight_same, axis=1)
            sum_other = sum_other * scale_other + tl.sum(weight_other, axis=1)
            max_same = new_max_same
            max_other = new_max_other
            if WITH_GRAD:
                # A non-finite bank value enters the weighted sums as 0: its row's weight is 0
                # (a -inf or NaN score) or its group's lse is +inf, whose gradient the combine
                # sets to NaN; either way 0 * inf must not make the whole mean NaN.
                if GRAD_D == BLOCK_D:
                    sum_tile = bank_tile
                else:
                    # This program's columns, read again (from L1: the scores just read them).
                    sum_tile = tl.load(
                        bank_ptr + rows[:, None].to(tl.int64) * stride_mn + acc_dims[None, :] * stride_md,
                        mask=row_ok[:, None] & acc_dim_ok[None, :],
                        other=0.0,
                    ).to(acc_dtype)
                sum_tile = tl.where(tl.abs(sum_tile) < _PLUS_INF, sum_tile, 0.0)
                if PRECISION == "split":
                    # Softmax weights lie in [0, 1]: no non-finite guard needed.
                    same_high, same_low = _tf32_split(weight_same, True)
                    other_high, other_low = _tf32_split(weight_other, True)
                    if BANK_EXACT:
                        sum_high = sum_tile
                        sum_low = sum_tile
                    else:
                        sum_high, sum_low = _tf32_split(sum_tile, True)
                    tile_same = _dot_split(same_high, same_low, sum_high, sum_low, BANK_EXACT)
                    tile_other = _dot_split(other_high, other_low, sum_high, sum_low, BANK_EXACT)
                else:
                    tile_same = tl.dot(weight_same.to(acc_dtype), sum_tile, input_precision=PRECISION)
                    tile_other = tl.dot(weight_other.to(acc_dtype), sum_tile, input_precision=PRECISION)
                acc_same = acc_same * scale_same[:, None] + tile_same
                acc_other = acc_other * scale_other[:, None] + tile_other

        if TOPK > 0:
            # Rows arrive in increasing order, so a candidate whose key equals the current worst
            # has a higher row and loses the tie: only strictly larger keys enter. Each round
            # moves every query's best remaining candidate (ties to the lower row) into its worst
            # slot; after the first tiles a round or two is all a tile needs.
            keys = _order_key(dots, USE_FP64)
            after = (keys < cursor_key[:, None]) | (
                (keys == cursor_key[:, None]) & (rows[None, :] > cursor_row[:, None])
            )
            candidates = tl.where(eligible & after, keys, EMPTY)
            best = tl.max(candidates, axis=1)
            worst = tl.min(top_keys, axis=1)
            pending = tl.sum((best > worst).to(tl.int32), axis=0)
            while pending > 0:
                take = best > worst
                best_row = tl.min(tl.where(candidates == best[:, None], rows[None, :], 2147483647), axis=1)
                worst_row = tl.max(tl.where(top_keys == worst[:, None], top_rows, -2147483647), axis=1)
                replace = take[:, None] & (top_keys == worst[:, None]) & (top_rows == worst_row[:, None])
                top_keys = tl.where(replace, best[:, None], top_keys)
                top_rows = tl.where(replace, best_row[:, None], top_rows)
                candidates = tl.where(rows[None, :] == best_row[:, None], EMPTY, candidates)
                best = tl.max(candidates, axis=1)
                worst = tl.min(top_keys, axis=1)
                pending = tl.sum((best > worst).to(tl.int32), axis=0)

    state = split * num_queries + queries
    # The parts of a D-split gradient computed the same state: part 0 writes it.
    state_ok = query_ok & (grad_part == 0)
    if WITH_LSE:
        # A NaN in a group makes its sum NaN, which the combine carries into that group's lse.
        sum_same = tl.where(nan_same > 0, float("nan"), sum_same)
        sum_other = tl.where(nan_other > 0, float("nan"), sum_other)
        tl.store(max_same_ptr + state, max_same, mask=state_ok)
        tl.store(sum_same_ptr + state, sum_same, mask=state_ok)
        tl.store(max_other_ptr + state, max_other, mask=state_ok)
        tl.store(sum_other_ptr + state, sum_other, mask=state_ok)
        if WITH_GRAD:
            acc_offsets = state[:, None].to(tl.int64) * dim + acc_dims[None, :]
            acc_mask = query_ok[:, None] & acc_dim_ok[None, :]
            tl.store(acc_same_ptr + acc_offsets, acc_same, mask=acc_mask)
            tl.store(acc_other_ptr + acc_offsets, acc_other, mask=acc_mask)
    if TOPK > 0:
        top_offsets = state[:, None].to(tl.int64) * TOPK + slots[None, :]
        top_values = _key_value(top_keys, EMPTY, USE_FP64)
        tl.store(top_values_ptr + top_offsets, top_values, mask=state_ok[:, None])
        tl.store(top_rows_ptr + top_offsets, top_rows, mask=state_ok[:, None])


# ----------------------------------------------------------------------------- launch plan

# Widths of the running top-k the kernel is compiled with. A larger k runs in rounds of the
# largest width, each a streaming pass that continues after the previous round's last (value,
# row): registers bound the per-query list, never the k the API accepts (k <= N).
TOPK_WIDTHS = (32, 128)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelConfig:
    """Everything that selects one compiled kernel: its constexprs and launch options."""

    features: str  # "fp32" or "fp64"
    bank: str  # "fp32", "bf16", "fp16" or "fp64"
    with_lse: bool
    with_grad: bool
    topk: int  # width of the running top-k, 0 for none
    precision: str  # "split", "tf32" or "ieee"
    block_b: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    grad_d: int = 0  # columns of the weighted sums per program; 0: all of block_d

    @property
    def name(self) -> str:
        mode = ("lse+grad" if self.with_grad else "lse") if self.with_lse else "topk"
        if self.with_lse and self.topk:
            mode += "+topk"
        grad_columns = f" g{self.grad_d}" if self.grad_d else ""
        return (
            f"{self.features}/{self.bank} {mode} k{self.topk} {self.precision} "
            f"{self.block_b}x{self.block_n}x{self.block_d}{grad_columns} w{self.num_warps} s{self.num_stages}"
        )

    @property
    def grad_parts(self) -> int:
        """Programs along the grid's third axis, each accumulating grad_d columns."""
        return self.block_d // self.grad_d if self.grad_d else 1

    def launch_options(self) -> dict:
        # maxnreg: left to itself ptxas sometimes caps a kernel at 128 registers and spills;
        # the explicit 255 (the most a thread may have at 8 warps) lets it keep every value.
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "maxnreg": 255}

    def constexprs(self) -> dict:
        return {
            "WITH_LSE": self.with_lse,
            "WITH_GRAD": self.with_grad,
            "TOPK": self.topk,
            "USE_FP64": self.features == "fp64",
            "PRECISION": self.precision,
            "BANK_EXACT": self.bank in ("bf16", "fp16"),
            "BLOCK_B": self.block_b,
            "BLOCK_N": self.block_n,
            "BLOCK_D": self.block_d,
            "GRAD_D": self.grad_d or self.block_d,
        }


def topk_width(k: int) -> int:
    """The running top-k width for a request of k (a round's share when k exceeds every width)."""
    return next((width for width in TOPK_WIDTHS if k <= width), TOPK_WIDTHS[-1]) if k > 0 else 0


def kernel_config(
    dim: int, features: str, bank: str, with_lse: bool, with_grad: bool, topk: int, precision: str
) -> KernelConfig:
    """The tile shape of one launch. It depends on no device: every configuration fits the opt-in
    shared memory of sm_80/86/89/90 without spills (checked ahead of time for each of them by
    benchmarks/static_triton.py and tests/test_triton_static.py)."""
    # tl.dot needs every side >= 16; narrow rows are padded to 64 columns, a few wasted MMAs
    # against one compiled kernel fewer per width.
    block_d = max(64, triton.next_power_of_2(dim))
    wide_bank = bank in ("fp32", "fp64")  # 4 or 8 bytes a value, and split into two parts (fp32)
    # Register budget (255 a thread at 8 warps): the split queries, two [BLOCK_B, D] gradient
    # accumulators or the log-sum-exp state beside a running top-k, and the bank tile's split
    # parts as MMA fragments. Those configurations take 16 queries a program; the gradient beside
    # a wide bank or a 128-wide top-k also halves the tile. At D > 128 the gradient's two
    # [16, D] accumulators do not fit beside the scores (ptxas spilled whatever the tile): each
    # program keeps 128 of their columns, the scores computed once per 128 columns, and a wide
    # bank's tile is quartered to fit the 99 KB of shared memory of sm_86/89.
    wide_rows = block_d > 128
    if with_grad or features == "fp64" or topk > 32 or (with_lse and topk > 0) or wide_rows:
        block_b = 16
    else:
        block_b = 32
    if wide_rows:
        block_n = 16 if with_grad and wide_bank else 32
    else:
        block_n = 32 if with_grad and (wide_bank or topk > 32) else 64
    grad_d = 128 if with_grad and wide_rows else 0
    # fp64 values take two registers each: 8 warps share them even at D = 64.
    num_warps = 8 if block_d >= 128 or features == "fp64" else 4
    # Pipelined bank tiles in shared memory: two stages for wide banks and rows, three otherwise;
    # one for fp64 at D > 128 with the gradient (two took 102,656 bytes, 1,280 over sm_86/89's).
    if features == "fp64" and grad_d:
        num_stages = 1
    else:
        num_stages = 2 if wide_bank or wide_rows else 3
    return KernelConfig(
        features,
        bank,
        with_lse,
        with_grad,
        topk,
        precision,
        block_b,
        block_n,
        block_d,
        num_warps,
        num_stages,
        grad_d,
    )


def fuses_topk(dim: int, features: str, with_grad: bool, k: int) -> bool:
    """Whether snca_forward's top-k of k rides on its log-sum-exp pass (else it takes rounds of its
    own after it): k fits one running list, and the list fits beside the gradient's accumulators
    (not at D > 128, whose programs each hold a part of them, nor in fp64: both spilled)."""
    return 0 < k <= TOPK_WIDTHS[-1] and not (with_grad and (dim > 128 or features == "fp64"))


def launch_configs(max_dim: int = 256) -> list[KernelConfig]:
    """Every configuration the launcher can choose for D <= max_dim."""
    configs = []
    dims = [64 << i for i in range(max(0, (max_dim // 64).bit_length()))]
    banks = ("fp32", "bf16", "fp16")
    pairs = [("fp32", bank, precision) for bank in banks for precision in ("split", "tf32")]
    pairs.append(("fp64", "fp64", "ieee"))
    for dim in dims:
        for features, bank, precision in pairs:
            for with_grad in (False, True):
                for topk in (0, *TOPK_WIDTHS):
                    if topk == 0 or fuses_topk(dim, features, with_grad, topk):
                        configs.append(kernel_config(dim, features, bank, True, with_grad, topk, precision))
            for topk in TOPK_WIDTHS:
                configs.append(kernel_config(dim, features, bank, False, False, topk, precision))
    return list(dict.fromkeys(configs))


class _Plan:
    """The kernel configuration and bank split of one launch. The same code plans GPU and
    interpreter runs; only the number of programs to aim for comes from the device."""

    def __init__(self, config: KernelConfig, batch: int, bank_rows: int, device):
        self.config = config
        self.query_blocks = triton.cdiv(batch, config.block_b)
        num_tiles = triton.cdiv(bank_rows, config.block_n)
        # Aim for two waves of programs over the device; each split is a whole number of tiles.
        wanted_splits = triton.cdiv(2 * _device_programs(device), self.query_blocks)
        splits = max(1, min(wanted_splits, num_tiles))
        self.tiles_per_split = triton.cdiv(num_tiles, splits)
        self.splits = triton.cdiv(num_tiles, self.tiles_per_split)

    @property
    def grid(self) -> tuple[int, int, int]:
        # Query blocks vary fastest, so the programs that read the same bank split run side by
        # side and share its tiles through L2.
        return (self.query_blocks, self.splits, self.config.grad_parts)


def _device_programs(device: torch.device) -> int:
    """How many programs run at once: the SM count on a GPU. The interpreter runs programs one
    after another, so a few splits suffice there to exercise the combine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _device_guard(device: torch.device):
    """Launch on the tensors' device (cuda:1 as well), not on the current one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _precision(features: Tensor) -> str:
    if features.dtype == torch.float64:
        return "ieee"
    # One tf32 product only where PyTorch itself is allowed TF32 matmuls; otherwise split
    # operands on tf32 tensor cores, at least as accurate as an fp32 matmul.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "split"


def order_keys(values: Tensor) -> Tensor:
    """The kernel's _order_key in torch: integers ordered as torch.topk orders the scores."""
    if values.dtype == torch.float64:
        int_dtype, flip, nan_key = torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF8000000000000
    else:
        int_dtype, flip, nan_key = torch.int32, 0x7FFFFFFF, 0x7FC00000
    values = torch.where(values == 0, torch.zeros_like(values), values)
    bits = values.view(int_dtype)
    keys = torch.where(bits < 0, bits ^ flip, bits)
    return torch.where(torch.isnan(values), torch.full_like(keys, nan_key), keys)


def _launch(features, labels, own_rows, bank, bank_labels, temperature, with_lse, with_grad, k, cursor=None):
    """One streaming pass: per-split partials. ``cursor`` (keys, rows) restricts the top-k to the
    candidates ranked after it (a later round of a large k)."""
    batch, dim = features.shape
    bank_rows = bank.shape[0]
    width = topk_width(k)
    config = kernel_config(
        dim,
        _DTYPE_NAMES[features.dtype],
        _DTYPE_NAMES[bank.dtype],
        with_lse,
        with_grad,
        width,
        _precision(features),
    )
    plan = _Plan(config, batch, bank_rows, features.device)
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
    top_shape = (splits, batch, width) if k > 0 else (0,)
    top_values = features.new_empty(top_shape, dtype=acc_dtype)
    top_rows = features.new_empty(top_shape, dtype=torch.int32)
    if cursor is None:
        # The largest key: every candidate ranks after it.
        key_max = torch.iinfo(torch.int64 if features.dtype == torch.float64 else torch.int32).max
        cursor = (own_rows.new_full((batch,), key_max), own_rows.new_full((batch,), -1))
    cursor_keys = cursor[0].to(torch.int64 if features.dtype == torch.float64 else torch.int32)
    with _device_guard(features.device):
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
            cursor_keys.contiguous(),
            cursor[1].to(torch.int32).contiguous(),
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
            **config.constexprs(),
            **config.launch_options(),
        )
    return (max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows)


# ----------------------------------------------------------------------------- combine


def _combine_groups(max_same, sum_same, max_other, sum_other, acc_same, acc_other, with_grad):
    """(lse_same, lse_other, wmean_same, wmean_other) from the per-split partials, both groups in
    one exact combine (snca_ext/combine.py)."""
    part_acc = torch.stack([acc_same, acc_other], dim=1) if with_grad else None
    reduce_max, reduce_sum = combine.local_reduce(0)
    lse, wmean = combine.combine_lse(
        torch.stack([max_same, max_other], dim=1),
        torch.stack([sum_same, sum_other], dim=1),
        part_acc,
        reduce_max=reduce_max,
        reduce_sum=reduce_sum,
    )
    # Separate tensors: a custom op's outputs may not alias one another.
    if wmean is None:
        return lse[0].clone(), lse[1].clone(), None, None
    # The gradient of a NaN or +inf log-sum-exp is NaN (the contract of snca_ext/reference.py).
    wmean = torch.where((torch.isnan(lse) | torch.isposinf(lse))[..., None], torch.nan, wmean)
    return lse[0].clone(), lse[1].clone(), wmean[0].clone(), wmean[1].clone()


def _merge_split_topk(top_values: Tensor, top_rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of every split's candidates; the kernel's empty slots (rows < 0) become -1."""
    batch = top_values.shape[1]
    values = top_values.permute(1, 0, 2).reshape(batch, -1)
    rows = top_rows.permute(1, 0, 2).reshape(batch, -1).long()
    rows = torch.where(rows < 0, torch.full_like(rows, -1), rows)
    return combine.merge_topk(values, rows, k)


def _topk_rounds(queries, exclude, bank, k):
    """The k best rows of every query, in rounds of at most the widest top-k width: each round is
    one streaming pass that takes the next candidates after the previous round's last (value,
    row). Every round launches the same compiled kernel (the same tile shape and products), so a
    pair's score is bit-identical in every round, which the cursor comparison relies on."""
    width = TOPK_WIDTHS[-1]
    launch_k = min(k, width)
    values, rows = [], []
    cursor = None
    found = 0
    while found < k:
        take = min(width, k - found)
        *_, part_values, part_rows = _launch(
            queries, exclude, exclude, bank, exclude, 1.0, False, False, launch_k, cursor
        )
        round_values, round_rows = _merge_split_topk(part_values, part_rows, take)
        values.append(round_values)
        rows.append(round_rows)
        found += take
        # The last kept (value, row) is where the next round starts; a padded round (row -1) has
        # run out of candidates, and the EMPTY cursor key lets nothing through afterwards.
        last_keys = order_keys(round_values[:, -1])
        empty = torch.iinfo(last_keys.dtype).min
        last_keys = torch.where(round_rows[:, -1] < 0, torch.full_like(last_keys, empty), last_keys)
        cursor = (last_keys, round_rows[:, -1])
    return torch.cat(values, dim=1), torch.cat(rows, dim=1)


# ----------------------------------------------------------------------------- the ops


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
    if features.dtype in (torch.bfloat16, torch.float16):
        features = features.float()
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
    indices = indices.long().contiguous()
    # A top-k that fits one running list rides on the log-sum-exp pass where the registers allow;
    # otherwise it takes its own rounds after it.
    fused_topk = fuses_topk(dim, _DTYPE_NAMES[features.dtype], with_grad, k)
    max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows = _launch(
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
    lse_same, lse_other, wmean_same, wmean_other = _combine_groups(
        max_same, sum_same, max_other, sum_other, acc_same, acc_other, with_grad
    )
    if not with_grad:
        wmean_same = features.new_empty(0, dim)
        wmean_other = features.new_empty(0, dim)
    if k > 0:
        if fused_topk:
            values, rows = _merge_split_topk(top_values, top_rows, k)
        else:
            values, rows = _topk_rounds(features, indices, bank, k)
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
    return tuple(_topk_rounds(queries, exclude.long().contiguous(), bank, k))


snca_forward = triton_op("snca_ext::snca_forward_triton", mutates_args=(), schema=_FORWARD_SCHEMA)(
    _snca_forward_impl
)
bank_topk = triton_op("snca_ext::bank_topk_triton", mutates_args=(), schema=_TOPK_SCHEMA)(_bank_topk_impl)
_autograd.register_snca_forward("snca_ext::snca_forward_triton")
_autograd.register_bank_topk("snca_ext::bank_topk_triton")
