"""The Triton kernel of the fused SNCA op: one program streams a run of bank tiles for a block of
queries and writes its partials (log-sum-exp state, weighted sums, top-k candidates); launch.py
plans the grid and combines the partials.

Per query the program keeps the online-softmax state of the README's "How it works": a running
max and rescaled sum for the same-class and the other-class log-sum-exp, optionally the rescaled
softmax-weighted sums of bank rows (the gradient, accumulated in the forward: the bank is read
once per step), and optionally a running top-k of the raw inner products, the query's own row
excluded.

Precision, by the features' dtype:

- fp32 features run on tf32 tensor cores with split operands (each value = a high and a low tf32
  part; the products high*high + high*low + low*high, about fp32 accuracy; a bf16/fp16 bank is
  exact in tf32 and needs two). The split rounds in software, so every product is exact and the
  interpreter's fp32 matmul computes what a tensor core does up to the order of the fp32
  additions. Only where PyTorch allows TF32 matmuls does one tf32 product do.
- bf16/fp16 features (autocast) take one 16-bit MMA per product, as an autocast matmul does: the
  bank tile is rounded to the features' dtype at its load (to nearest even, as ``.to()``), the
  scores accumulate in fp32 (a 16-bit product is exact in fp32), the softmax weights are rounded
  to the features' dtype for the two weighted sums (as FlashAttention does) whose accumulators
  are fp32; the log-sum-exp state and the running max are fp32.
- fp64 uses fp64 MMAs.

Non-finite scores follow one contract with every backend: a group's lse is NaN if any of its
scores is NaN, else +inf if any is +inf; -inf scores add nothing; in the top-k NaN ranks above
+inf. A split product cannot carry inf (inf * 0 = NaN in a cross term), so the rare tile whose
scores come out non-finite recomputes them in IEEE fp32; a 16-bit or fp64 product is the IEEE
product of its operands and needs no such repair.
"""

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be constexpr.
_MINUS_INF = tl.constexpr(float("-inf"))
_PLUS_INF = tl.constexpr(float("inf"))
# No NaN global: Triton checks before each launch that every global a kernel reads still equals
# (==) its value at compile time, which a NaN never does. Kernels write float("nan") in place.
# Triton's interpreter (the CPU test suite) holds bfloat16 values as their raw 16 bits: its tl.dot
# multiplies the bit patterns as integers, its comparisons compare them, and its fp32 -> bf16
# cast truncates. The kernel keeps bf16 tensors to loads, bit operations and the two helpers
# below, which in the interpreter alone compute on the fp32 values instead: the same arithmetic
# (a bf16 product is exact in fp32, the rounding is to nearest even either way).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


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
def _bf16_round(x):
    """fp32 x rounded to the nearest bf16 value, ties to even (as torch's .to(bfloat16)), held in
    fp32; NaN stays NaN (its payload could carry into the sign bit)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def _to_operand(x, DTYPE: tl.constexpr):
    """x (any float dtype) as a 16-bit MMA operand of DTYPE, rounded to nearest even as torch's
    .to() rounds it (Triton's default for a narrowing cast). Through fp32, which holds every bf16
    and fp16 value exactly, so that one rounding, the interpreter's below included, applies."""
    out = x
    if x.dtype != DTYPE:
        wide = x.to(tl.float32)
        if _INTERPRETED and DTYPE == tl.bfloat16:
            wide = _bf16_round(wide)  # the interpreter's cast truncates; an exact value survives it
        out = wide.to(DTYPE)
    return out


@triton.jit
def _dot16(a, b, acc):
    """acc + a @ b for 16-bit a and b: one 16-bit MMA per product, fp32 accumulation."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, out_dtype=tl.float32)
    return out


@triton.jit
def _zero_non_finite16(x):
    """16-bit x with +-inf and NaN replaced by 0, on the bits (exponent all ones)."""
    EXPONENT: tl.constexpr = 0x7F80 if x.dtype == tl.bfloat16 else 0x7C00
    bits = x.to(tl.int16, bitcast=True)
    return tl.where((bits & EXPONENT) == EXPONENT, 0, bits).to(x.dtype, bitcast=True)


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
    "tf32" (one tf32 product, when PyTorch allows TF32 matmuls), "16bit" (bf16/fp16 features: one
    16-bit MMA, the bank and the softmax weights rounded to the features' dtype) or "ieee" (fp64
    products).
    GRAD_D < BLOCK_D: the weighted sums are cut into GRAD_D-column parts, one per program along
    the grid's third axis; every part computes the whole scores, part 0 alone writes the LSE
    state and the top-k.

    One function, about 260 lines, on purpose: the tile loop carries a dozen register tiles (the
    two groups' maxima and sums, the two weighted-sum accumulators, the top-k list), and each phase
    (scores, masks, softmax, sums, top-k) reads and updates most of them; the scores, masks and
    order keys are already @triton.jit helpers above. The static report (gpu_checks/static_triton)
    holds the compiled loop to its register and spill figures."""
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
    )
    # The MMA operands' dtype: the features' own for 16-bit features, else the accumulator's.
    operand_dtype = feats.dtype if PRECISION == "16bit" else acc_dtype
    feats = feats.to(operand_dtype)
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
        )
        if PRECISION == "16bit":
            bank_tile = _to_operand(bank_tile, operand_dtype)
            dots = _dot16(feats, tl.trans(bank_tile), None)
        else:
            bank_tile = bank_tile.to(acc_dtype)
            if PRECISION == "split":
                if BANK_EXACT:
                    bank_high = bank_tile
                    bank_low = bank_tile
                else:
                    bank_high, bank_low = _tf32_split(bank_tile, False)
                dots = _dot_split(feats_high, feats_low, tl.trans(bank_high), tl.trans(bank_low), BANK_EXACT)
            else:
                dots = tl.dot(feats, tl.trans(bank_tile), input_precision=PRECISION)
        if PRECISION == "split" or PRECISION == "tf32":
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
                    )
                    if PRECISION == "16bit":
                        sum_tile = _to_operand(sum_tile, operand_dtype)
                    else:
                        sum_tile = sum_tile.to(acc_dtype)
                if PRECISION == "16bit":
                    # The softmax weights rounded to the operands' dtype, as FlashAttention does;
                    # the rescale rides on the MMA's fp32 accumulator.
                    sum_tile = _zero_non_finite16(sum_tile)
                    p_same = _to_operand(weight_same, operand_dtype)
                    p_other = _to_operand(weight_other, operand_dtype)
                    acc_same = _dot16(p_same, sum_tile, acc_same * scale_same[:, None])
                    acc_other = _dot16(p_other, sum_tile, acc_other * scale_other[:, None])
                else:
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
