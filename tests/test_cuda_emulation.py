"""The arithmetic of the CUDA tensor-core engines, emulated on the CPU, held to the accuracy rule.

How a tensor core rounds its fp32 accumulation is not documented, and measurements disagree
(round-to-nearest or round-toward-zero). This file replays exactly what the kernels compute. The
fp32 engine (csrc/cuda/engine_tf32.cuh): TF32 splits of the fp32 operands, MMAs of k = 8 whose exact inner
products are added to their accumulator with one rounding (RN or RZ, both tried), each chunk of
k-steps (4 in the scores, a 64-row tile in the weighted sums) started from zero and added into an
fp32 register in round-to-nearest, the online log-sum-exp with lazy rescaling (a running sum per
half of the tile's columns), the combine of split partials. It then checks the rule the GPU tests apply
(tests/test_ops.py): at least as accurate as plain PyTorch in fp32, on the same problems.
The 16-bit engine (csrc/cuda/engine_mma16.cuh, bf16/fp16 features): below, from "the 16-bit
engine", held to the rule of that path: at least as accurate as plain PyTorch under autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.problems import loss_errors_allowed, make_problem

from snca_ext import _autograd, ops, reference

ROWS = COLS = 64  # queries per block, bank rows per tile (tile_config.h)
K_STEP = 8  # the k of one TF32 MMA (mma.sync m16n8k8)
SCORE_CHUNK = 4  # k-steps per chunk in the scores (engine_tf32.cuh: TensorCoreEngine::scores)
SUM_CHUNK = 8  # k-steps per chunk in the weighted sums: one tile (TensorCoreEngine::accumulate)
LAZY_RESCALE = 8.0
NEG_INF = float("-inf")


def tf32(x: torch.Tensor) -> torch.Tensor:
    """The kernel's tf32_trunc: the top 10 explicit mantissa bits (the low 13 bits masked off)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, lo, hi_finite): x ~ hi + lo for finite x; a non-finite x keeps lo = 0 (x - hi would be
    NaN) and hi_finite = 0. (The kernel splits finite values only: emulate_forward sets the
    non-finite ones to 0 first.)"""
    hi = tf32(x)
    finite = torch.isfinite(x)
    lo = torch.where(finite, tf32(torch.where(finite, x - hi, 0.0)), 0.0)
    return hi, lo, torch.where(finite, hi, 0.0)


def round_to_fp32(v: torch.Tensor, mode: str) -> torch.Tensor:
    """float64 -> float32 rounded to nearest ("rn") or toward zero ("rz")."""
    f = v.to(torch.float32)
    if mode == "rz":
        over = f.double().abs() > v.abs()
        f = torch.where(over, torch.nextafter(f, torch.zeros_like(f)), f)
    return f


def mma_steps(terms: list[tuple[torch.Tensor, torch.Tensor]], mode: str, chunk: int = 1) -> torch.Tensor:
    """The chunks of one product as the kernel issues them: [..., S, R, C], S = K / (chunk * K_STEP).

    terms: (a [..., R, K], b [..., K, C]) pairs in the order the kernel issues them within a k-step
    (the small cross terms first). A chunk of `chunk` k-steps starts from zero; each MMA adds its
    exact inner product of K_STEP terms to the chunk's accumulator with one rounding in `mode`
    ("rn" or "rz"), k-step after k-step.
    """
    exact = []
    for a, b in terms:
        a_s = a.double().unflatten(-1, (-1, chunk, K_STEP)).movedim(-4, -2)  # [..., S, c, R, 8]
        b_s = b.double().unflatten(-2, (-1, chunk, K_STEP))  # [..., S, c, 8, C]
        exact.append(a_s @ b_s)  # [..., S, c, R, C]
    acc = None
    for j in range(chunk):
        for e in exact:
            part = e[..., j, :, :]
            acc = round_to_fp32(part if acc is None else acc.double() + part, mode)
    return acc


def add_steps(acc: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """acc + each chunk in turn, each addition an fp32 FADD (round to nearest)."""
    for i in range(steps.shape[-3]):
        acc = round_to_fp32(acc.double() + steps[..., i, :, :].double(), "rn")
    return acc


def mma_carried(terms: list[tuple[torch.Tensor, torch.Tensor]], mode: str, acc: torch.Tensor) -> torch.Tensor:
    """The design the kernel does not use: one accumulator carried through every MMA (its rounding
    error then grows with the number of steps, and under RZ it is biased)."""
    for c0 in range(0, terms[0][0].shape[-1], K_STEP):
        for a, b in terms:
            exact = a[..., c0 : c0 + K_STEP].double() @ b[..., c0 : c0 + K_STEP, :].double()
            acc = round_to_fp32(acc.double() + exact, mode)
    return acc


def combine_splits(partials, B, dp, D):
    """The combine kernel (lse_combine_kernel) over the splits' partials, each a dict per group of
    (reference max, sum, accumulator, NaN flags, +inf flags): (lse_same, lse_other, wmean_same,
    wmean_other), the weighted means cut to the features' D."""
    out = []
    for g in ("same", "other"):
        maxes = torch.stack([p[g][0] for p in partials])
        top = maxes.max(0).values
        factor = torch.where(maxes == NEG_INF, 0.0, torch.exp(maxes - top))
        total = torch.zeros(B)
        acc = torch.zeros(B, dp)
        for i, part in enumerate(partials):
            total = round_to_fp32(total.double() + part[g][1].double() * factor[i].double(), "rn")
            acc = round_to_fp32(acc.double() + part[g][2].double() * factor[i].double()[:, None], "rn")
        nan = torch.stack([p[g][3] for p in partials]).any(0)
        inf = torch.stack([p[g][4] for p in partials]).any(0)
        lse = torch.where(total > 0, top + torch.log(total), NEG_INF)
        lse = torch.where(nan, math.nan, torch.where(inf, math.inf, lse))
        inv = torch.where(total > 0, 1.0 / total, 0.0)
        wmean = torch.where((nan | inf)[:, None], math.nan, acc * inv[:, None])[:, :D]
        out.append((lse, wmean))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def tile_scores_and_groups(scores, features, operand_bank, labels, indices, bank_labels, temperature):
    """What both engines do with a tile's raw scores [T, B, COLS]: the IEEE fp32 inner product of
    the inputs (the bank as the engine's operands hold it) where that is not finite (the rare path,
    ieee_scores_where_not_finite), the scores s = c / T in fp32, and each group's members (eligible:
    in the bank, not the query's own row). Returns (c, s, {"same": ..., "other": ...})."""
    num_tiles, B = scores.shape[0], features.shape[0]
    N = operand_bank.shape[0]
    ieee = torch.zeros(num_tiles * COLS, B)
    ieee[:N] = operand_bank.float() @ features.float().T
    ieee = ieee.view(num_tiles, COLS, B).mT
    c = torch.where(ieee.isfinite(), scores, ieee)
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    s_all = round_to_fp32(c.double() * inv_t, "rn")
    cols = torch.arange(num_tiles * COLS).view(num_tiles, 1, COLS)
    eligible = (cols < N) & (cols != indices[None, :, None])
    tile_labels = torch.full((num_tiles * COLS,), -1, dtype=torch.long)
    tile_labels[:N] = bank_labels
    same = tile_labels.view(num_tiles, 1, COLS) == labels[None, :, None]
    return c, s_all, {"same": eligible & same, "other": eligible & ~same}


def split_tiles(num_tiles: int, splits: int) -> list[range]:
    """The tiles of each split (split_range in stream_common.cuh)."""
    q, r = divmod(num_tiles, splits)
    return [range(s * q + min(s, r), s * q + min(s, r) + q + (s < r)) for s in range(splits)]


def non_finite_flags(member, s_all, tiles: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: a NaN, a +inf score among the group's members in these tiles."""
    member, s = member[tiles.start : tiles.stop], s_all[tiles.start : tiles.stop]
    return (member & s.isnan()).any(2).any(0), (member & (s == math.inf)).any(2).any(0)


def emulate_forward(
    features, labels, indices, bank, bank_labels, temperature, *, mode, splits=1, carry=False
):
    """(lse_same, lse_other, wmean_same, wmean_other) as the tensor-core engine computes them.

    carry=True replays the carried accumulation instead (mma_carried), to show why it was dropped.
    """
    B, D = features.shape
    N = bank.shape[0]
    dp = 64 if D <= 64 else 128
    num_tiles = math.ceil(N / COLS)
    q = torch.zeros(B, dp)
    q[:, :D] = features
    m = torch.zeros(num_tiles * COLS, dp)
    m[:N, :D] = bank.float()
    m = m.view(num_tiles, COLS, dp)
    fp32_bank = bank.dtype == torch.float32
    # The MMAs see finite operands only: non-finite values enter as 0 (and their scores are put
    # back from the IEEE product below).
    q = torch.where(q.isfinite(), q, 0.0)
    m = torch.where(m.isfinite(), m, 0.0)
    q_hi, q_lo, q_fin = split(q)
    # A bf16/fp16 value is exact in TF32: the bank is not split, its low part is 0.
    b_hi, b_lo, b_fin = split(m) if fp32_bank else (m, torch.zeros_like(m), m)
    cross = [(q_lo, b_fin.mT)] + ([(q_fin, b_lo.mT)] if fp32_bank else [])
    terms = [*cross, (q_hi, b_hi.mT)]
    if carry:
        scores = torch.stack(
            [mma_carried([(a, b[t]) for a, b in terms], mode, torch.zeros(B, COLS)) for t in range(num_tiles)]
        )
    else:
        scores = add_steps(torch.zeros(num_tiles, B, COLS), mma_steps(terms, mode, SCORE_CHUNK))  # [T, B, C]
    _, s_all, members = tile_scores_and_groups(
        scores, features, bank, labels, indices, bank_labels, temperature
    )
    partials = []
    for tiles in split_tiles(num_tiles, splits):
        result = {}
        for g, member_all in members.items():
            nan, inf = non_finite_flags(member_all, s_all, tiles)
            # The kernel keeps a running sum per half of the tile's columns (the two warps that
            # hold a row), both rescaled by the same factors, and adds them at the end.
            ref, halves = torch.full((B,), NEG_INF), torch.zeros(2, B)
            weights, facs = [], []
            for tile in tiles:
                s_t, member = s_all[tile], member_all[tile]
                # NaN and +inf scores are flagged, not summed; -inf ones contribute nothing.
                v = torch.where(member & (s_t.isfinite() | (s_t == NEG_INF)), s_t, NEG_INF)
                tile_max = v.max(1).values
                move = tile_max > ref + LAZY_RESCALE
                new_ref = torch.where(move, tile_max, ref)
                fac = torch.where(move, torch.where(ref == NEG_INF, 0.0, torch.exp(ref - new_ref)), 1.0)
                p = torch.where(v == NEG_INF, 0.0, torch.exp(v - new_ref[:, None]))
                tile_sums = p.view(B, 2, COLS // 2).sum(2).double().T
                halves = round_to_fp32(halves.double() * fac.double() + tile_sums, "rn")
                ref = new_ref
                weights.append(p)
                facs.append(fac)
            acc = torch.zeros(B, dp)
            if weights:
                p_hi, p_lo, p_fin = split(torch.stack(weights))  # [t, B, COLS]
                sl = slice(tiles.start, tiles.stop)
                # Non-finite bank values enter the weighted sums as 0 (their weights are 0).
                wterms = (
                    [(p_lo, b_fin[sl])] + ([(p_fin, b_lo[sl])] if fp32_bank else []) + [(p_hi, b_fin[sl])]
                )
                steps = None if carry else mma_steps(wterms, mode, SUM_CHUNK)  # [t, S, B, dp]
                for i in range(len(weights)):
                    acc = round_to_fp32(acc.double() * facs[i].double()[:, None], "rn")
                    if carry:
                        acc = mma_carried([(a[i], b[i]) for a, b in wterms], mode, acc)
                    else:
                        acc = add_steps(acc, steps[i])
            total = round_to_fp32(halves[0].double() + halves[1].double(), "rn")
            result[g] = (ref, total, acc, nan, inf)
        partials.append(result)
    return combine_splits(partials, B, dp, D)


def emulated_loss_and_grad(features, indices, bank, bank_labels, temperature, **kw):
    labels = bank_labels[indices]
    lse_same, lse_other, ws, wo = emulate_forward(
        features, labels, indices, bank, bank_labels, temperature, **kw
    )
    lse_same.requires_grad_()
    lse_other.requires_grad_()
    loss = ops.loss_from_lse(lse_same, lse_other)
    g_same, g_other = torch.autograd.grad(loss, (lse_same, lse_other))
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    return loss.detach(), _autograd.lse_grad(g_same, g_other, ws, wo, inv_t), (lse_same, lse_other)


MODELS = [
    pytest.param({"mode": "rn"}, id="rn"),
    pytest.param({"mode": "rz"}, id="rz"),
    pytest.param({"mode": "rz", "splits": 5}, id="rz-5splits"),
]


def low_precision_errors(bank_dtype, classes, temperature, **model):
    """(loss error, its allowance, gradient error, its allowance) by the rule of tests/test_ops.py."""
    features, indices, bank, bank_labels = make_problem(8, 2500, 128, classes=classes, seed=3)
    bank_low = bank.to(bank_dtype)
    ours, ours_grad, _ = emulated_loss_and_grad(
        features.float(), indices, bank_low, bank_labels, temperature, **model
    )
    return loss_errors_allowed(features, indices, bank_low, bank_labels, temperature, ours, ours_grad)


def test_rounding_helpers():
    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-12, -(1.0 + 2**-11), 3.0, math.inf, -math.inf, math.nan])
    assert tf32(x)[:4].tolist() == [1.0, 1.0, -1.0, 3.0]  # truncation toward zero
    hi, lo, fin = split(x)
    assert (hi[:4].double() + lo[:4].double()).tolist() == x[:4].double().tolist()
    assert lo[4:].tolist() == [0.0, 0.0, 0.0] and fin[4:].tolist() == [0.0, 0.0, 0.0]
    v = torch.tensor([1.0 + 2**-30, -(1.0 + 2**-30)], dtype=torch.float64)
    assert round_to_fp32(v, "rz").tolist() == [1.0, -1.0]
    w = torch.tensor([1.0 + 2**-23 - 2**-30], dtype=torch.float64)
    assert round_to_fp32(w, "rz").item() == 1.0 and round_to_fp32(w, "rn").item() == 1.0 + 2**-23


@pytest.mark.parametrize("model", MODELS)
def test_fp32_bank_at_least_as_accurate_as_plain_pytorch(model):
    features, indices, bank, bank_labels = make_problem(16, 3001, 64, classes=10, seed=2)
    labels = bank_labels[indices]
    for temperature in (0.05, 0.01):
        gt = reference.snca_stats_reference(features, indices, bank, bank_labels, temperature)
        args32 = (features.float(), indices, bank.float(), bank_labels, temperature)
        plain = reference.snca_stats_reference(*args32)
        ours = emulate_forward(
            features.float(), labels, indices, bank.float(), bank_labels, temperature, **model
        )
        for ours_t, plain_t, gt_t in zip(ours[:2], plain[:2], gt[:2], strict=True):
            ours_err = (ours_t.double() - gt_t).abs().max().item()
            plain_err = (plain_t.double() - gt_t).abs().max().item()
            assert ours_err <= 2 * plain_err + 2e-6 * gt_t.abs().max().item(), (ours_err, plain_err)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("bank_dtype", "classes"), [(torch.bfloat16, 3), (torch.bfloat16, 50), (torch.float16, 3)]
)
def test_low_precision_bank_at_least_as_accurate_as_plain_pytorch(model, bank_dtype, classes):
    for temperature in (0.05, 0.01):
        loss_err, loss_allowed, grad_err, grad_allowed = low_precision_errors(
            bank_dtype, classes, temperature, **model
        )
        assert loss_err <= loss_allowed, (temperature, loss_err, loss_allowed)
        assert grad_err <= grad_allowed, (temperature, grad_err, grad_allowed)


def test_an_accumulator_carried_through_the_mmas_fails_under_rz():
    """Why every k-step starts from zero: carried through a split's MMAs, the accumulator of the
    weighted sums collects a biased RZ error per step, and the gradient breaks the rule. (Also shows
    that the tests above can fail.)"""
    _, _, grad_err, grad_allowed = low_precision_errors(torch.bfloat16, 3, 0.05, mode="rz", carry=True)
    assert grad_err > grad_allowed


def test_non_finite_scores_follow_the_contract():
    """Each group's lse is the IEEE log-sum-exp of its scores; an inf feature is not split into NaN."""
    features, indices, bank, bank_labels = make_problem(4, 200, 64, classes=3, dtype=torch.float32, seed=5)
    labels = bank_labels[indices]
    features[1, 0] = math.inf  # query 1: scores +-inf (or NaN where the bank value is 0)
    bank[7, :] = math.nan  # a NaN row: NaN in one group of every query that sees it
    lse_same, lse_other, _, _ = emulate_forward(features, labels, indices, bank, bank_labels, 0.05, mode="rn")
    gt_same, gt_other, _, _ = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, 0.05, labels=labels
    )
    for ours_t, gt_t in ((lse_same, gt_same), (lse_other, gt_other)):
        assert torch.equal(ours_t.isnan(), gt_t.isnan())
        assert torch.equal(ours_t == math.inf, gt_t == math.inf)
        finite = gt_t.isfinite()
        torch.testing.assert_close(ours_t[finite].double(), gt_t[finite], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the 16-bit engine

K16 = 16  # the k of one 16-bit MMA (mma.sync m16n8k16)
LOG2E = float(torch.tensor(math.log2(math.e), dtype=torch.float32))  # the kernel's fp32 constant
SUM_STEPS16 = 4  # k-steps of 16 bank rows per chunk of the weighted sums: one tile (accumulate())


def to_fp32(v: torch.Tensor) -> torch.Tensor:
    """One fp32 rounding (RN) of a value computed exactly in float64 (an FFMA, an FADD, an FMUL)."""
    return round_to_fp32(v.double(), "rn")


def exp_fast(x: torch.Tensor) -> torch.Tensor:
    """exp_fast() of snca_forward.cu: 2^(fp32(x log2 e)) on ex2.approx.ftz, modelled correctly
    rounded (the MUFU's own error, about 2 ulp, is not replayed), results below 2^-126 flushed."""
    y = to_fp32(torch.exp2(to_fp32(x.double() * LOG2E).double()))
    return torch.where(y.abs() < 2.0**-126, 0.0, y)


def mma16_chunks(a: torch.Tensor, b: torch.Tensor, mode: str, per_chunk: int) -> torch.Tensor:
    """a @ b as 16-bit MMAs (k = 16): exact products, each MMA adds its 16 to the chunk's fp32
    accumulator with one rounding in `mode`, per_chunk MMAs per chunk from zero: [..., S, R, C]."""
    a_s = a.double().unflatten(-1, (-1, per_chunk, K16)).movedim(-4, -2)  # [..., S, c, R, 16]
    b_s = b.double().unflatten(-2, (-1, per_chunk, K16))  # [..., S, c, 16, C]
    exact = a_s @ b_s
    acc = None
    for j in range(per_chunk):
        part = exact[..., j, :, :]
        acc = round_to_fp32(part if acc is None else acc.double() + part, mode)
    return acc


def emulate_forward16(
    features,
    labels,
    indices,
    bank,
    bank_labels,
    temperature,
    *,
    mode,
    splits=1,
    weights_dtype=None,
    carry=False,
    lazy=0.0,
):
    """(lse_same, lse_other, wmean_same, wmean_other) as the 16-bit engine computes them.

    features: bf16/fp16 (their dtype decides); the bank is rounded to it (the converting load).
    weights_dtype: what the weights P are rounded to for the weighted sums (the kernel: the
    features' dtype; None keeps them in fp32). carry=True carries the weighted sums' MMA
    accumulator through the split instead of one chunk per tile (the design the kernel avoids).
    lazy: the margin of the reference maxima (the kernel: 0, the fp32 engine's LAZY_RESCALE).
    """
    dt = features.dtype
    weights_dtype = dt if weights_dtype is None else weights_dtype
    B, D = features.shape
    N = bank.shape[0]
    dp = 64 if D <= 64 else 128
    num_tiles = math.ceil(N / COLS)
    q = torch.zeros(B, dp, dtype=torch.float64)
    q[:, :D] = features.double()
    m = torch.zeros(num_tiles * COLS, dp, dtype=torch.float64)
    m[:N, :D] = bank.to(dt).double()
    # The MMAs see finite operands only (init and load_tile set non-finite values to 0).
    q = torch.where(q.isfinite(), q, 0.0)
    m = torch.where(m.isfinite(), m, 0.0).view(num_tiles, COLS, dp)
    # Scores: one chunk from zero per tile, carried through Dp (dp / 16 MMAs).
    c = mma16_chunks(q, m.mT, mode, dp // K16)[..., 0, :, :]  # [T, B, COLS]
    c, s_all, members = tile_scores_and_groups(
        c, features, bank.to(dt), labels, indices, bank_labels, temperature
    )
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    partials = []
    for tiles in split_tiles(num_tiles, splits):
        state = {}
        for g, member_all in members.items():
            nan, inf = non_finite_flags(member_all, s_all, tiles)
            state[g] = {
                "member": member_all,
                "nan": nan,
                "inf": inf,
                "ref": torch.full((B,), NEG_INF),
                "lanes": torch.zeros(B, 2, 4),  # [row, warp half h, lane t]: a running sum each
                "acc": torch.zeros(B, dp),
            }
        for tile in tiles:
            p_of = {}
            for g in ("same", "other"):
                st = state[g]
                s_t, member = s_all[tile], st["member"][tile]
                keep = member & s_t.isfinite()  # NaN/+inf flagged above, -inf contributes nothing
                raw = torch.where(keep, c[tile], NEG_INF)
                # rows_fast: the maximum of the raw products, scaled once.
                tile_max = to_fp32(raw.max(1).values.double() * inv_t)
                ref = st["ref"]
                move = tile_max > ref + lazy  # the kernel: the running maximum itself (lazy = 0)
                fac = torch.where(
                    move, torch.where(ref == NEG_INF, 0.0, exp_fast(to_fp32(ref.double() - tile_max))), 1.0
                )
                ref = torch.where(move, tile_max, ref)
                base = torch.where(ref == NEG_INF, 0.0, ref)
                # weights_fast: exp_fast(fma(c, 1/T, -base)).
                p = torch.where(
                    raw == NEG_INF, 0.0, exp_fast(to_fp32(raw.double() * inv_t - base.double()[:, None]))
                )
                # The lane 4 g + t of warp half h sums its columns 32 h + 8 u + 2 t + q of the tile.
                lane_sums = p.view(B, 2, 4, 4, 2).sum((2, 4)).double()
                st["lanes"] = to_fp32(st["lanes"].double() * fac.double()[:, None, None] + lane_sums)
                st["ref"] = ref
                p_of[g] = (p, fac)
            mt = m[tile]
            for g in ("same", "other"):
                st = state[g]
                p, fac = p_of[g]
                pw = p if weights_dtype is None else p.to(weights_dtype).double()
                if carry:
                    acc = to_fp32(st["acc"].double() * fac.double()[:, None])
                    for k0 in range(0, COLS, K16):
                        exact = pw[:, k0 : k0 + K16].double() @ mt[k0 : k0 + K16]
                        acc = round_to_fp32(acc.double() + exact, mode)
                    st["acc"] = acc
                    continue
                chunk = mma16_chunks(pw, mt, mode, SUM_STEPS16)[0]  # one chunk: the tile
                st["acc"] = to_fp32(st["acc"].double() * fac.double()[:, None] + chunk.double())
        result = {}
        for g in ("same", "other"):
            st = state[g]
            acc = st["acc"]
            # The end of the split: lanes t ^ 1, then t ^ 2 (two shuffles), then the two halves.
            lanes = st["lanes"]
            pairs = to_fp32(lanes[..., 0::2].double() + lanes[..., 1::2].double())  # (t0 + t1), (t2 + t3)
            halves = to_fp32(pairs[..., 0].double() + pairs[..., 1].double())
            total = to_fp32(halves[:, 0].double() + halves[:, 1].double())
            result[g] = (st["ref"], total, acc, st["nan"], st["inf"])
        partials.append(result)
    return combine_splits(partials, B, dp, D)


def loss_and_grad(stats, temperature):
    lse_same, lse_other, ws, wo = (t.detach() for t in stats)
    lse_same.requires_grad_()
    lse_other.requires_grad_()
    loss = ops.loss_from_lse(lse_same, lse_other)
    g_same, g_other = torch.autograd.grad(loss, (lse_same, lse_other))
    inv_t = torch.tensor(1.0 / temperature, dtype=ws.dtype)
    return loss.detach().double(), _autograd.lse_grad(g_same, g_other, ws, wo, inv_t).double()


def errors16(features_dtype, bank_dtype, classes, temperature, dim=128, **model):
    """(loss error, its allowance, gradient error, its allowance) of the emulated 16-bit engine
    against float64 on the rounded inputs, the allowances those of autocast (loss: its error plus
    a hair; gradient: twice its error plus a hair, as tests/problems.py's rule)."""
    features, indices, bank, bank_labels = make_problem(
        8, 2500, dim, classes=classes, dtype=torch.float32, seed=7
    )
    features, bank = features.to(features_dtype), bank.to(bank_dtype)
    labels = bank_labels[indices].clone()
    labels[1] = classes  # a query whose class has no bank row: no positive
    gt_in = features.double().requires_grad_()
    gt = reference.snca_loss_reference(
        gt_in, indices, bank.to(features_dtype).double(), bank_labels, temperature, labels=labels
    )
    (gt_grad,) = torch.autograd.grad(gt, gt_in)
    args = (features, labels, indices, bank, bank_labels, temperature)
    ours, ours_grad = loss_and_grad(emulate_forward16(*args, **model), temperature)
    autocast = reference.snca_partials_autocast_reference(
        features, indices, bank, bank_labels, temperature, labels=labels
    )
    auto, auto_grad = loss_and_grad(autocast, temperature)
    assert ours_grad[1].abs().max() == 0  # no positive: no gradient
    scale = gt_grad.abs().max().item()
    return (
        abs(ours.item() - gt.item()),
        abs(auto.item() - gt.item()) + 1e-6 * abs(gt.item()),
        (ours_grad - gt_grad).abs().max().item(),
        2 * (auto_grad - gt_grad).abs().max().item() + 1e-6 * scale,
    )


PAIRS16 = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16-fp16"),
    pytest.param(torch.float16, torch.bfloat16, id="fp16-bf16"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("features_dtype", "bank_dtype"), PAIRS16)
def test_16bit_engine_at_least_as_accurate_as_autocast(model, features_dtype, bank_dtype):
    for classes, temperature in ((3, 0.05), (50, 0.005)):
        loss_err, loss_allowed, grad_err, grad_allowed = errors16(
            features_dtype, bank_dtype, classes, temperature, **model
        )
        assert loss_err <= loss_allowed, (classes, temperature, loss_err, loss_allowed)
        assert grad_err <= grad_allowed, (classes, temperature, grad_err, grad_allowed)


def test_16bit_engine_at_d64():
    loss_err, loss_allowed, grad_err, grad_allowed = errors16(
        torch.bfloat16, torch.bfloat16, 3, 0.05, dim=37, mode="rz"
    )
    assert loss_err <= loss_allowed and grad_err <= grad_allowed


def test_16bit_weights_kept_in_fp32_also_pass():
    """Rounding P to the features' dtype is the kernel's choice, not a requirement of the rule."""
    _, _, grad_err, grad_allowed = errors16(
        torch.bfloat16, torch.bfloat16, 3, 0.05, mode="rz", weights_dtype=torch.float32
    )
    assert grad_err <= grad_allowed


def test_16bit_weights_in_fp8_fail():
    """The tests above can fail: weights rounded to fp8 (e4m3) break the gradient's rule."""
    _, _, grad_err, grad_allowed = errors16(
        torch.bfloat16, torch.bfloat16, 3, 0.05, mode="rn", weights_dtype=torch.float8_e4m3fn
    )
    assert grad_err > grad_allowed


def test_16bit_lazy_reference_fails_in_bf16():
    """Why the 16-bit engine keeps the running maximum: with the fp32 engine's lazy margin the
    largest weight, rounded to bf16 anywhere in [1, e^8], breaks the gradient's rule at T = 0.005."""
    _, _, grad_err, grad_allowed = errors16(
        torch.bfloat16, torch.bfloat16, 50, 0.005, mode="rn", lazy=LAZY_RESCALE
    )
    assert grad_err > grad_allowed


def test_16bit_sums_fold_each_tile_against_a_carried_rz_accumulator():
    """Why the weighted sums take each tile from zero: at ImageNet size a split streams ~600 tiles
    (2,400 MMAs of k = 16); carried through them, an RZ accumulator drifts by ~1e-4 (relative),
    the per-tile chunk (folded in with a round-to-nearest FFMA) stays near fp32's rounding."""
    gen = torch.Generator().manual_seed(11)
    tiles = 600
    p = torch.rand(tiles, 1, COLS, generator=gen).to(torch.bfloat16).double()
    m = torch.rand(tiles, COLS, 8, generator=gen).to(torch.bfloat16).double()
    exact = (p @ m).sum(0)
    carried = chunked = torch.zeros(1, 8)
    chunks = mma16_chunks(p, m, "rz", SUM_STEPS16)[:, 0]  # [tiles, 1, 8]
    for t in range(tiles):
        chunked = to_fp32(chunked.double() + chunks[t].double())
        for k0 in range(0, COLS, K16):
            carried = round_to_fp32(carried.double() + p[t, :, k0 : k0 + K16] @ m[t, k0 : k0 + K16], "rz")
    err_chunked = ((chunked.double() - exact) / exact).abs().max().item()
    err_carried = ((carried.double() - exact) / exact).abs().max().item()
    assert err_carried > 3e-5 and err_chunked < err_carried / 10, (err_chunked, err_carried)


def test_16bit_non_finite_scores_follow_the_contract():
    """Each group's lse is the IEEE log-sum-exp of its scores (computed on the rounded inputs)."""
    features, indices, bank, bank_labels = make_problem(4, 200, 64, classes=3, dtype=torch.float32, seed=5)
    features, bank = features.to(torch.bfloat16), bank.to(torch.bfloat16)
    labels = bank_labels[indices]
    features[1, 0] = math.inf
    bank[7, :] = math.nan
    lse_same, lse_other, _, _ = emulate_forward16(
        features, labels, indices, bank, bank_labels, 0.05, mode="rz"
    )
    gt_same, gt_other, _, _ = reference.snca_stats_reference(
        features.double(), indices, bank.double(), bank_labels, 0.05, labels=labels
    )
    for ours_t, gt_t in ((lse_same, gt_same), (lse_other, gt_other)):
        assert torch.equal(ours_t.isnan(), gt_t.isnan())
        assert torch.equal(ours_t == math.inf, gt_t == math.inf)
        finite = gt_t.isfinite()
        torch.testing.assert_close(ours_t[finite].double(), gt_t[finite], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the streaming top-k

TOPK_BUFFER = 256  # tile_config.h: kTopkBuffer


def _beats(v1: float, i1: int, v2: float, i2: int) -> bool:
    """stream_common.cuh: beats(): NaN first, then the larger value, ties to the lower row."""
    nan1, nan2 = math.isnan(v1), math.isnan(v2)
    if nan1 or nan2:
        return nan1 and (not nan2 or i1 < i2)
    return v1 > v2 or (v1 == v2 and i1 < i2)


def _count_beating(values: list, rows: list, count: int, v: float, i: int) -> int:
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if _beats(values[mid], rows[mid], v, i):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _warp_sort(cv: list, ci: list) -> None:
    """bank_topk.cu: warp_sort(), its compare-exchange network index for index."""
    size = 2
    while size <= TOPK_BUFFER:
        stride = size // 2
        while stride > 0:
            for p in range(TOPK_BUFFER // 2):
                x = 2 * p - (p & (stride - 1))
                y = x + stride
                forward = (x & size) == 0
                if _beats(cv[y], ci[y], cv[x], ci[x]) if forward else _beats(cv[x], ci[x], cv[y], ci[y]):
                    cv[x], cv[y], ci[x], ci[y] = cv[y], cv[x], ci[y], ci[x]
            stride //= 2
        size *= 2


def _streaming_topk(scores: list, start: int, k: int, exclude: int) -> tuple[list, list]:
    """bank_topk.cu: topk_partial_kernel for one query over one split (rows start.., tiles of 64):
    the threshold filter, the candidate buffer, its merge (sort, then rank) when full and at the end."""
    lv, li, buf = [], [], []
    threshold = -math.inf

    def flush():
        nonlocal lv, li, threshold
        cv = [v for v, _ in buf] + [-math.inf] * (TOPK_BUFFER - len(buf))
        ci = [i for _, i in buf] + [2**31 - 1] * (TOPK_BUFFER - len(buf))
        _warp_sort(cv, ci)
        nb, n_old = len(buf), len(lv)
        nv, ni = [None] * k, [None] * k
        for t in range(nb):
            rank = t + _count_beating(lv, li, n_old, cv[t], ci[t])
            if rank < k:
                nv[rank], ni[rank] = cv[t], ci[t]
                if rank == k - 1:
                    threshold = cv[t]
        for p in range(n_old):
            rank = p + _count_beating(cv, ci, nb, lv[p], li[p])
            if rank < k:
                nv[rank], ni[rank] = lv[p], li[p]
                if rank == k - 1:
                    threshold = lv[p]
        count = min(k, n_old + nb)
        assert None not in nv[:count] and None not in ni[:count]  # every rank < count written once
        lv, li = nv[:count], ni[:count]
        buf.clear()

    def take(v, row):
        full = len(lv) == k
        return row != exclude and (not full or (math.isnan(v) and not math.isnan(threshold)) or v > threshold)

    for t0 in range(0, len(scores), 64):
        tile = [(scores[c], start + c) for c in range(t0, min(t0 + 64, len(scores)))]
        new = [(v, row) for v, row in tile if take(v, row)]
        if not new:
            continue
        if len(buf) + len(new) > TOPK_BUFFER:
            flush()
            new = [(v, row) for v, row in tile if take(v, row)]
        buf.extend(new)
    if buf:
        flush()
    return lv, li


@pytest.mark.parametrize(("n", "k"), [(700, 1), (700, 30), (1500, 300), (3000, 1024), (300, 1024)])
def test_streaming_topk_emulation_matches_the_sorted_order(n, k):
    """The buffered top-k of one split (threshold, 256-candidate buffer, bitonic sort, merge by rank)
    gives the first k of the full order, with ties (to the lower row) and NaN (first)."""
    gen = torch.Generator().manual_seed(n + k)
    scores = (torch.randint(0, 200, (n,), generator=gen).float() / 8).tolist()  # many ties
    for j in torch.randint(0, n, (5,), generator=gen).tolist():
        scores[j] = math.nan
    start, exclude = 1000, 1000 + n // 2
    values, rows = _streaming_topk(scores, start, k, exclude)
    order = sorted(
        ((v, start + c) for c, v in enumerate(scores) if start + c != exclude),
        key=lambda e: (not math.isnan(e[0]), -e[0] if not math.isnan(e[0]) else 0.0, e[1]),
    )[:k]
    assert rows == [r for _, r in order]
    assert [str(v) for v in values] == [str(v) for v in (v for v, _ in order)]
