"""GPU benchmark table (and a small CUDA smoke run) for benchmarks/gpu_check.sh.

    python3 benchmarks/gpu_table.py [--budget SECONDS] [--out FILE]   # one markdown table
    python3 benchmarks/gpu_table.py --smoke                           # small runs of the CUDA backend
    python3 benchmarks/gpu_table.py --one-launch                      # one forward+backward, for ncu

Times the SNCA loss (forward, and forward+backward) for the fused backends (cuda, triton) and
plain PyTorch (reference.snca_loss_original, reference.snca_loss_reference) at B=256, D=128 and
N = 50,000 / 1,281,167 with an fp32 and a bf16 bank (TF32 off, and the fused backends again with
TF32 on), a same-size cuBLAS product F M^T for calibration, and bank_topk (k = 30, 1024) against
torch.topk on the materialised B x N matrix, and snca_stats with a top-k (k = 30; the cuda backend
runs it inside the lse pass). Each row is the median of CUDA-event timings,
the peak memory beyond the inputs, and the fraction of the floor reached:
floor = max(bank bytes / 4.3 TB/s, products * 2*B*N*D / rate), rate 990e12 (bf16 bank) or
495e12 (fp32, TF32 rate), products = 1 for a forward or a top-k, 3 for forward+backward (the
scores and the two softmax-weighted sums of MATH.md). A failing backend gives a FAIL row; the
rest still run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

B, D, T = 256, 128, 0.05
HBM_BYTES_PER_S = 4.3e12
RATE = {torch.float32: 495e12, torch.bfloat16: 990e12}


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _floor_ms(n: int, bank_dtype: torch.dtype, products: int) -> float:
    bank_bytes = n * D * torch.empty((), dtype=bank_dtype).element_size()
    flops = products * 2 * B * n * D
    return 1e3 * max(bank_bytes / HBM_BYTES_PER_S, flops / RATE[bank_dtype])


def _inputs(n: int, bank_dtype: torch.dtype, classes: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, D, device="cuda", generator=g), dim=1)
    bank_labels = torch.randint(0, classes, (n,), device="cuda", generator=g)
    indices = torch.randperm(n, device="cuda", generator=g)[:B]
    features = torch.nn.functional.normalize(
        bank[indices] + 0.3 * torch.randn(B, D, device="cuda", generator=g), dim=1
    )
    return features.contiguous(), indices, bank.to(bank_dtype).contiguous(), bank_labels


def _loss_fns():
    import snca_ext
    from snca_ext import reference

    def fused(backend):
        return lambda f, i, m, y: snca_ext.snca_loss(f, i, m, y, T, backend=backend)

    return {
        "cuda": fused("cuda"),
        "triton": fused("triton"),
        "torch original": lambda f, i, m, y: reference.snca_loss_original(f, i, m, y, T),
        "torch reference": lambda f, i, m, y: reference.snca_loss_reference(f, i, m, y, T),
    }


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return "FAIL " + (text[:90] + "..." if len(text) > 90 else text)


class Table:
    """Rows of the markdown table; stops timing new rows once the time budget is spent."""

    header = ("case", "backend", "ms (median)", "peak extra MiB", "floor ms", "of floor", "check")

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s
        self.rows: list[tuple[str, ...]] = []

    def add(self, case: str, backend: str, fn, floor: float, check=None, reps: int = 10) -> None:
        if time.monotonic() > self.deadline:
            self.rows.append((case, backend, "skipped (time budget)", "", f"{floor:.3f}", "", ""))
            return
        try:
            ms = _median_ms(fn, reps)
            mib = _peak_extra_mib(fn)
            note = check() if check else ""
            self.rows.append(
                (case, backend, f"{ms:.3f}", f"{mib:.1f}", f"{floor:.3f}", f"{100 * floor / ms:.1f}%", note)
            )
        except Exception as error:  # one backend failing must not stop the others
            self.rows.append((case, backend, _short(error), "", f"{floor:.3f}", "", ""))
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


def _bench_loss(table: Table, tag: str, n: int, bank_dtype, features, indices, bank, bank_labels) -> None:
    from snca_ext import reference

    with torch.no_grad():
        gt = reference.snca_loss_reference(features.double(), indices, bank.double(), bank_labels, T).item()
    leaf = features.detach().requires_grad_(True)
    for name, loss_fn in _loss_fns().items():

        def forward(loss_fn=loss_fn):
            with torch.no_grad():
                return loss_fn(features, indices, bank, bank_labels)

        def check(forward=forward):
            return f"loss rel err {abs(forward().item() - gt) / abs(gt):.1e}"

        def forward_backward(loss_fn=loss_fn):
            leaf.grad = None
            loss_fn(leaf, indices, bank, bank_labels).backward()

        table.add(f"loss fwd, {tag}", name, forward, _floor_ms(n, bank_dtype, 1), check)
        table.add(f"loss fwd+bwd, {tag}", name, forward_backward, _floor_ms(n, bank_dtype, 3))


def _bench_topk(table: Table, tag: str, n: int, bank_dtype, features, bank, k: int) -> None:
    import snca_ext
    from snca_ext import reference

    with torch.no_grad():
        ref_rows = reference.bank_topk_reference(features.double(), bank.double(), k)[1]
    fns = {
        "cuda": lambda: snca_ext.bank_topk(features, bank, k, backend="cuda"),
        "triton": lambda: snca_ext.bank_topk(features, bank, k, backend="triton"),
        "torch.topk (materialised)": lambda: torch.topk(features @ bank.to(features.dtype).T, k, dim=1),
    }
    for name, fn in fns.items():

        def check(fn=fn):
            return f"idx agree {(fn()[1] == ref_rows).float().mean().item():.4f}"

        table.add(f"bank_topk k={k}, {tag}", name, fn, _floor_ms(n, bank_dtype, 1), check)


def _bench_stats_topk(
    table: Table, tag: str, n: int, bank_dtype, features, indices, bank, bank_labels
) -> None:
    """snca_stats with a top-k: the cuda backend runs it inside the lse pass (one pass over the bank)
    where it fits; compare with the loss forward of the same inputs (no top-k) above."""
    import snca_ext
    from snca_ext import reference

    k = 30
    with torch.no_grad():
        ref_rows = reference.bank_topk_reference(features.double(), bank.double(), k, exclude=indices)[1]

    def stats():
        with torch.no_grad():
            return snca_ext.snca_stats(features, indices, bank, bank_labels, T, topk=k, backend="cuda")

    def check():
        return f"idx agree {(stats()[3] == ref_rows).float().mean().item():.4f}"

    table.add(
        f"snca_stats topk={k}, {tag}",
        "cuda (top-k in the lse pass)",
        stats,
        _floor_ms(n, bank_dtype, 1),
        check,
    )


def _bench_matmul(table: Table, tag: str, n: int, bank_dtype, features, bank) -> None:
    """The same-size product F M^T by cuBLAS, TF32 off and on: what this GPU does with these shapes."""
    lhs = features.to(bank_dtype)
    for tf32 in (False, True):
        if bank_dtype != torch.float32 and tf32:
            continue

        def product(tf32=tf32):
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return lhs @ bank.T
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        label = f"matmul B x N x D (calibration){', TF32' if tf32 else ''}, {tag}"
        table.add(label, "cuBLAS", product, _floor_ms(n, bank_dtype, 1))


def _bench_tf32(table: Table, tag: str, n: int, bank_dtype, features, indices, bank, bank_labels) -> None:
    """The fused backends with torch.backends.cuda.matmul.allow_tf32 on (one TF32 product per multiply)."""
    import snca_ext

    leaf = features.detach().requires_grad_(True)
    for backend in ("cuda", "triton"):

        def forward_backward(backend=backend):
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                leaf.grad = None
                snca_ext.snca_loss(leaf, indices, bank, bank_labels, T, backend=backend).backward()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        table.add(f"loss fwd+bwd TF32 on, {tag}", backend, forward_backward, _floor_ms(n, bank_dtype, 3))


def run_one_launch() -> int:
    """One forward+backward of the cuda backend at ImageNet size, bf16 bank (for ncu)."""
    import snca_ext

    features, indices, bank, bank_labels = _inputs(1_281_167, torch.bfloat16, 1000)
    leaf = features.detach().requires_grad_(True)
    snca_ext.snca_loss(leaf, indices, bank, bank_labels, T, backend="cuda").backward()
    torch.cuda.synchronize()
    return 0


def run_table(budget_s: float, out: str | None) -> int:
    table = Table(budget_s)
    for n, classes in ((50_000, 10), (1_281_167, 1000)):
        for bank_dtype in (torch.float32, torch.bfloat16):
            tag = f"N={n:,} bank {str(bank_dtype).replace('torch.', '')}"
            try:
                features, indices, bank, bank_labels = _inputs(n, bank_dtype, classes)
                _bench_matmul(table, tag, n, bank_dtype, features, bank)
                _bench_loss(table, tag, n, bank_dtype, features, indices, bank, bank_labels)
                _bench_tf32(table, tag, n, bank_dtype, features, indices, bank, bank_labels)
                for k in (30, 1024):
                    _bench_topk(table, tag, n, bank_dtype, features, bank, k)
                _bench_stats_topk(table, tag, n, bank_dtype, features, indices, bank, bank_labels)
            except Exception as error:  # the inputs or the float64 check itself failed
                table.rows.append((tag, "(setup)", _short(error), "", "", "", ""))
            torch.cuda.empty_cache()
    text = (
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}, B={B}, D={D}, T={T}\n\n" + table.markdown()
    )
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


def run_smoke() -> int:
    """Small, awkward shapes through every CUDA path (for compute-sanitizer); compares with the
    float64 reference and prints the worst errors."""
    import snca_ext
    from snca_ext import reference

    worst = 0.0
    cases = [  # (B, N, D, features dtype, bank dtype, k)
        (1, 1000, 3, torch.float32, torch.float32, 5),
        (70, 1013, 130, torch.float32, torch.bfloat16, 7),  # generic engine (D > 128)
        (64, 777, 128, torch.float32, torch.bfloat16, 200),
        (33, 300, 64, torch.float32, torch.float16, 30),
        (65, 129, 37, torch.float64, torch.float64, 129),
        (5, 2000, 128, torch.float32, torch.float32, 1100),  # k above the streaming limit
    ]
    for b, n, d, fdtype, bdtype, k in cases:
        g = torch.Generator(device="cuda").manual_seed(b * n + d)
        bank = torch.nn.functional.normalize(
            torch.randn(n, d, device="cuda", generator=g, dtype=torch.float64), dim=1
        )
        labels_bank = torch.randint(0, 7, (n,), device="cuda", generator=g)
        indices = torch.randint(0, n, (b,), device="cuda", generator=g)
        indices[0] = -1
        labels = labels_bank[indices.clamp(min=0)]
        features = torch.nn.functional.normalize(
            torch.randn(b, d, device="cuda", generator=g, dtype=torch.float64), dim=1
        )
        f, m = features.to(fdtype), bank.to(bdtype)
        out = torch.ops.snca_ext.snca_forward(f, labels, indices, m, labels_bank, T, True, min(k, n))
        ref = reference.snca_stats_reference(
            f.double(), indices, m.double(), labels_bank, T, labels=labels, topk=min(k, n)
        )
        lse_err = max((out[i].double() - ref[i]).abs().nan_to_num(0.0).max().item() for i in (0, 1))
        val_err = (out[4].double() - ref[2]).abs().nan_to_num(0.0).max().item()
        idx_agree = (out[5] == ref[3]).float().mean().item()
        values, _ = snca_ext.bank_topk(f, m, min(k, n), backend="cuda")
        torch.cuda.synchronize()
        worst = max(worst, lse_err)
        print(
            f"B={b} N={n} D={d} {fdtype}/{bdtype} k={k}: lse err {lse_err:.2e}, topk value err "
            f"{val_err:.2e}, topk idx agree {idx_agree:.4f}, bank_topk shape {tuple(values.shape)}"
        )
    print(f"smoke done, worst lse error {worst:.2e}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small CUDA runs instead of the table")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which rows are skipped")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--one-launch", action="store_true", help="one cuda forward+backward (for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to time", file=sys.stderr)
        return 2
    if args.one_launch:
        return run_one_launch()
    return run_smoke() if args.smoke else run_table(args.budget, args.out)


if __name__ == "__main__":
    sys.exit(main())
