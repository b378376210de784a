"""Probe how this GPU's tensor cores round their fp32 accumulation (first step of gpu_check.sh).

    python3 gpu_checks/tc_rounding_probe.py [--k 4096] [--rows 512]

Raw inner products of random vectors against float64: for each path, the mean of
(result - exact) * sign(exact), in units of the fp32 ulp of the exact value. Round-to-nearest
gives about 0; round-toward-zero a clearly negative mean (results pulled toward zero). Paths: a
TF32 matmul and a bf16 matmul (cuBLAS, tensor cores), an fp32 FFMA matmul (control, RN), and the
scores of snca_ext's cuda backend (bank_topk values: its split-TF32 MMAs with each k-step added
in RN, csrc/cuda/engine_tf32.cuh and engine_mma16.cuh), which must stay unbiased whatever the tensor cores do.
tests/test_cuda_emulation.py holds the kernel's arithmetic to the accuracy rule under both models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# Run as a file (python3 gpu_checks/...), the repo root is not on the path; gpu_check.sh builds
# the extension in place there without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def signed_error_ulps(result: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of (result - exact) * sign(exact) / ulp_fp32(exact), over the nonzero entries."""
    exact32 = exact.float().abs()
    ulp = (torch.nextafter(exact32, torch.full_like(exact32, float("inf"))) - exact32).double()
    keep = (exact != 0) & (ulp > 0)
    err = ((result.double() - exact) * exact.sign() / ulp)[keep]
    return err.mean().item(), err.std().item()


def probe(rows: int, k: int, device: str = "cuda") -> list[tuple[str, float, float]]:
    gen = torch.Generator(device=device).manual_seed(0)
    # Positive inputs: every partial sum grows, so a truncating accumulator loses on every step.
    a = torch.rand(rows, k, device=device, generator=gen)
    b = torch.rand(k, rows, device=device, generator=gen)
    out = []
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = a.double() @ b.double()
        out.append(("fp32 FFMA matmul (control)", *signed_error_ulps(a @ b, exact)))
        a_t, b_t = a.bfloat16().float(), b.bfloat16().float()  # exact in TF32 and bf16
        exact_t = a_t.double() @ b_t.double()
        torch.backends.cuda.matmul.allow_tf32 = True
        out.append(("TF32 tensor-core matmul", *signed_error_ulps(a_t @ b_t, exact_t)))
        out.append(("bf16 tensor-core matmul", *signed_error_ulps(a.bfloat16() @ b.bfloat16(), exact_t)))
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            import snca_ext

            if "cuda" in snca_ext.available_backends(device):
                # The largest inner products of each query, i.e. the kernel's raw scores.
                values, rows_idx = snca_ext.bank_topk(a, b.T.contiguous(), 8, backend="cuda")
                exact_v = (a.double() @ b.double()).gather(1, rows_idx)
                out.append(("snca_ext cuda scores (split TF32)", *signed_error_ulps(values, exact_v)))
        except ImportError:
            pass
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--k", type=int, default=4096, help="inner-product length (long: biases show)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to probe", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}: mean signed error in fp32 ulps, K = {args.k}")
    for name, mean, std in probe(args.rows, args.k):
        verdict = "toward zero" if mean < -0.25 else ("away from zero" if mean > 0.25 else "unbiased")
        print(f"  {name:38s} mean {mean:+8.3f}  std {std:7.3f}  -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
