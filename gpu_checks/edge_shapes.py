"""Edge shapes through every path of a backend, against the float64 reference: the driver that
gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python3 gpu_checks/edge_shapes.py                         # cuda backend, tiny launches
    python3 gpu_checks/edge_shapes.py --backend cpu --device cpu   # the same cases on the CPU
    python3 gpu_checks/edge_shapes.py --backend cpu --device cpu --tiny --sixteen   # + 16-bit driver check

Covers: B and N of 1 and around the tile sizes (63, 64, 65, 129), D of 1, 37, 64, 65, 128 (the
tensor-core engines) and 130 (the generic one), fp32/bf16/fp16/fp64, k = 0, 1, around 64 and
above the streaming limit (1025), queries without a bank row (-1), gradients, and the non-finite
contract (a NaN bank row; an inf feature, which gives +inf and -inf scores: each group's lse is the
IEEE log-sum-exp of its scores; NaN ranks first in the top-k). The last cases are large enough for
a split to stream many tiles: the streaming top-k at k = 300 and 1024 (candidate buffers merged
mid-split), and 1,000 classes (the fp32 engine skips the same-class products where a tile has no
same-class weight; the lazy rescale over many tiles). snca_stats with a top-k runs it inside the lse pass
where it fits (every tensor-core case here on an H200), bank_topk as a pass of its own. Two more
kinds of case rerun tensor-core shapes: "l2" with SNCA_EXT_SMEM_OPTIN=101376, so that any GPU runs
the configurations of the GPUs with 99 KB of shared memory per block (sm_86/89/120: at D = 128 the
queries read through L2; at D = 64 the top-k of snca_stats as a second pass, the lse pass with it
not fitting), and "tf32" with torch.backends.cuda.matmul.allow_tf32 (one TF32 product per
multiply; a TF32 tolerance). The 16-bit cases (bf16/fp16 features: the 16-bit engine at D <= 128,
the generic one after the op's upcast at D > 128) run B = 1, N off the tile size, D = 3, 64, 100
(the converting load), 128, 130, banks of the features' dtype (the cp.async pipeline) and of the
other ones (the converting load), k up to 1024, 1,000 classes over many tiles, the 2-stage
configuration of sm_86/89 ("l2") and the non-finite contract; they are held to float64 on the
inputs rounded to the features' dtype (the bank included, as the kernel reads it), the gradient
to the autocast rule (at most twice plain PyTorch's error computing in that dtype; the cpu and
reference backends, which upcast, on the bank as stored). Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

# Run as a file (python3 gpu_checks/...), the repo root is not on the path; gpu_check.sh builds
# the extension in place there without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T = 0.05


def _cases():
    # (B, N, D, features dtype, bank dtype, k[, classes])
    yield from [
        (1, 1, 1, torch.float32, torch.float32, 0),
        (1, 65, 37, torch.float32, torch.float32, 1),
        (63, 129, 64, torch.float32, torch.bfloat16, 64),
        (65, 64, 65, torch.float32, torch.float16, 63),
        (64, 130, 128, torch.float32, torch.bfloat16, 65),
        (3, 200, 130, torch.float32, torch.float32, 5),
        (5, 129, 37, torch.float64, torch.float64, 129),
        (2, 1100, 16, torch.float32, torch.float32, 1025),
        (2, 200_000, 16, torch.float32, torch.float32, 1024),
        (3, 50_000, 128, torch.float32, torch.bfloat16, 300, 1000),
        (5, 40_000, 128, torch.float32, torch.float32, 30, 1000),
    ]


def _cases16():
    # The first three are small enough for the sanitizers (--tiny).
    yield from [
        (1, 1, 3, torch.bfloat16, torch.bfloat16, 0),
        (63, 129, 64, torch.bfloat16, torch.bfloat16, 64),
        (65, 130, 128, torch.float16, torch.float32, 65),
        (1, 65, 100, torch.float16, torch.float16, 1),
        (64, 130, 128, torch.bfloat16, torch.bfloat16, 65),
        (5, 1100, 128, torch.float16, torch.bfloat16, 1024),
        (3, 200, 130, torch.bfloat16, torch.bfloat16, 5),
        (3, 50_000, 128, torch.bfloat16, torch.bfloat16, 300, 1000),
    ]


def _autocast_grad(f, indices, m, bank_labels, labels):
    """The gradient of plain PyTorch under autocast in the features' dtype
    (reference.snca_partials_autocast_reference), on the features' device."""
    from snca_ext import _autograd, ops, reference

    a, b_, ws, wo = reference.snca_partials_autocast_reference(f, indices, m, bank_labels, T, labels=labels)
    a, b_ = a.detach().requires_grad_(), b_.detach().requires_grad_()
    ga, gb = torch.autograd.grad(ops.loss_from_lse(a, b_), (a, b_))
    return _autograd.lse_grad(ga, gb, ws, wo, 1.0 / T)


def _problem(b, n, d, fdtype, bdtype, device, seed, classes=3):
    gen = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(0, classes, (n,), generator=gen)
    indices = torch.randint(0, n, (b,), generator=gen)
    indices[0] = -1
    labels = bank_labels[indices.clamp(min=0)]
    features = torch.nn.functional.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    to = {"device": device}
    return (
        features.to(dtype=fdtype, **to),
        labels.to(**to),
        indices.to(**to),
        bank.to(dtype=bdtype, **to),
        bank_labels.to(**to),
    )


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    ours, ref = ours.double().cpu(), ref.double().cpu()
    same_nan = torch.equal(ours.isnan(), ref.isnan())
    same_inf = torch.equal(ours.isinf() & (ours > 0), ref.isinf() & (ref > 0))
    finite = ref.isfinite() & ours.isfinite()
    return (
        same_nan
        and same_inf
        and bool(((ours[finite] - ref[finite]).abs() <= tol * (1 + ref[finite].abs())).all())
    )


def _same_rows(ours: torch.Tensor, ref: torch.Tensor, f, m, exclude, tol: float) -> bool:
    """The top-k rows agree: the same indices, or (large N, where fp32 and float64 can order two
    nearly equal scores differently) rows whose float64 scores equal the reference's, position by
    position, within tol, none repeated and none excluded."""
    ours, ref = ours.cpu(), ref.cpu()
    if torch.equal(ours, ref) or m.shape[0] <= 2000:
        return torch.equal(ours, ref)
    scores = f.double().cpu() @ m.double().cpu().T
    rows = torch.arange(m.shape[0])
    scores[rows.unsqueeze(0) == exclude.cpu().unsqueeze(1)] = -math.inf
    valid = ours >= 0
    got = torch.where(valid, scores.gather(1, ours.clamp(min=0)), -math.inf)
    want = torch.where(ref >= 0, scores.gather(1, ref.clamp(min=0)), -math.inf)
    distinct = all(len(set(r[v].tolist())) == int(v.sum()) for r, v in zip(ours, valid, strict=True))
    return distinct and torch.equal(valid, ref >= 0) and _close(got, want, tol)


def run(
    backend: str, device: str, non_finite: bool = True, limit: int | None = None, sixteen: bool | None = None
) -> int:
    import snca_ext
    from snca_ext import reference

    failures = 0
    base = list(_cases())
    cases = [("plain", case) for case in base[:limit]]
    cases += [("l2", base[4]), ("l2", base[2]), ("tf32", base[4])]
    cases += [("l2", base[9])] if limit is None else []
    # The tiny set (under the sanitizers) still fills the top-k's 256-candidate buffer mid-pass.
    cases += [("plain", (2, 3000, 16, torch.float32, torch.float32, 300))] if limit is not None else []
    if non_finite:
        cases += [("nan", base[2]), ("inf", base[4])]
    if device == "cuda" if sixteen is None else sixteen:
        low = list(_cases16())
        cases += [("plain", case) for case in (low[:3] if limit is not None else low)]
        cases += [("l2", low[4])] + ([("nan", low[1]), ("inf", low[4])] if non_finite else [])
    for case_no, (kind, (b, n, d, fdtype, bdtype, k, *classes)) in enumerate(cases):
        f, labels, indices, m, bank_labels = _problem(b, n, d, fdtype, bdtype, device, case_no, *classes)
        if kind == "nan":
            m[7] = math.nan  # a NaN bank row: NaN in the group it belongs to, first in the top-k
        if kind == "inf":
            f[1, 0] = math.inf  # query 1 only: +inf scores where m[j, 0] > 0, -inf where < 0
        k = min(k, n)
        # TF32 keeps 11 significant bits: scores of unit vectors off by up to ~1e-3, lse by ~1e-3 / T.
        tol = 1e-9 if fdtype == torch.float64 else 5e-2 if kind == "tf32" else 2e-4
        if kind == "l2":
            os.environ["SNCA_EXT_SMEM_OPTIN"] = "101376"
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        try:
            ours = snca_ext.snca_stats(f, indices, m, bank_labels, T, labels=labels, topk=k, backend=backend)
            top = snca_ext.bank_topk(f, m, k, exclude=indices, backend=backend)
        finally:
            os.environ.pop("SNCA_EXT_SMEM_OPTIN", None)
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        sixteen = fdtype in (torch.bfloat16, torch.float16)
        # The GPU backends' 16-bit path reads the bank in the features' dtype: the truth is on those
        # values (the cpu and reference backends compute on the upcast features and the bank as stored).
        m_true = m.to(fdtype).double() if sixteen and backend in ("cuda", "triton") else m.double()
        ref = reference.snca_stats_reference(
            f.double(), indices, m_true, bank_labels, T, labels=labels, topk=k
        )
        ok = all(_close(o, r, tol) for o, r in zip(ours[:3], ref[:3], strict=True))
        ok &= kind not in ("plain", "l2") or _same_rows(ours[3], ref[3], f, m_true, indices, tol)
        # bank_topk keeps its queries' fp32 ranking over the bank as stored (ops.py upcasts them).
        top_ref = (
            ref
            if not sixteen
            else reference.snca_stats_reference(
                f.double(), indices, m.double(), bank_labels, T, labels=labels, topk=k
            )
        )
        ok &= _close(top[0], top_ref[2], tol)
        if kind in ("plain", "l2"):
            leaf = f.detach().clone().requires_grad_(True)
            if kind == "l2":
                os.environ["SNCA_EXT_SMEM_OPTIN"] = "101376"
            try:
                loss = snca_ext.snca_loss(leaf, indices, m, bank_labels, T, labels=labels, backend=backend)
            finally:
                os.environ.pop("SNCA_EXT_SMEM_OPTIN", None)
            loss.backward()
            leaf_ref = f.detach().double().requires_grad_(True)
            loss_ref = reference.snca_loss_reference(leaf_ref, indices, m_true, bank_labels, T, labels=labels)
            loss_ref.backward()
            ok &= _close(loss.detach().reshape(1), loss_ref.detach().reshape(1), tol)
            if sixteen:
                # The gradient comes back in the features' dtype: both sides compared rounded to it,
                # with one rounding of it to spare.
                truth = leaf_ref.grad.to(fdtype).double()
                auto = _autocast_grad(f, indices, m, bank_labels, labels).to(fdtype).double()
                err = (leaf.grad.double() - truth).abs().max()
                spare = torch.finfo(fdtype).eps * truth.abs().max()
                ok &= bool(err <= 2 * (auto - truth).abs().max() + spare)
            else:
                ok &= _close(leaf.grad, leaf_ref.grad, 50 * tol)
        if device == "cuda":
            torch.cuda.synchronize()
        failures += not ok
        label = f"{kind:5s} B={b} N={n} D={d} {fdtype}/{bdtype} k={k}"
        print(f"{'ok  ' if ok else 'FAIL'} {label}" + (f" classes={classes[0]}" if classes else ""))
    print(f"{len(cases) - failures}/{len(cases)} cases agree with the float64 reference")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton", "cpu", "reference"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--finite-only", action="store_true", help="skip the non-finite cases")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the first 4 cases and one small top-k that merges its buffer mid-pass (for the sanitizers)",
    )
    parser.add_argument(
        "--sixteen",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the bf16/fp16-feature cases (default: on the cuda device only; the CPU backends upcast them)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    return run(
        args.backend,
        args.device,
        non_finite=not args.finite_only,
        limit=4 if args.tiny else None,
        sixteen=args.sixteen,
    )


if __name__ == "__main__":
    sys.exit(main())
