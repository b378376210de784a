"""GPU benchmark table (and a small CUDA smoke run) for gpu_checks/gpu_check.sh.

    python3 gpu_checks/gpu_table.py [--budget SECONDS] [--out FILE] [--cases TEXT]   # markdown table
    python3 gpu_checks/gpu_table.py --smoke                           # small runs of the CUDA backend
    python3 gpu_checks/gpu_table.py --one-launch                      # one forward+backward, for ncu

Times the SNCA loss (forward, and forward+backward) at B=256, D=128, T=0.05 and N = 1,281,167 /
50,000 (most important first: ImageNet size under autocast, bf16 features and a bf16 bank) for:

- ours: the fused backends (cuda, triton), called with the case's dtypes;
- the peers a GPU user would write instead (benchmarks/peers.py): SNCA as two FlexAttention calls,
  compiled, with the bank cut into one chunk per SM and sorted by class, and as one sequence in
  bank order and sorted (where features and bank share a dtype: flex_attention needs one);
- plain PyTorch: the original code (reference.snca_loss_original), torch.compile of it, and the
  log-space reference, under torch.autocast in the bf16-features case (16-bit matmuls, fp32 exp);
- calibration: one unmasked scaled_dot_product_attention call of the same size (flash kernel for
  bf16, memory-efficient for fp32; as one sequence and in one chunk per SM) and a same-size cuBLAS
  product F M^T;
- bank_topk (k = 30, 1024) against torch.topk on the materialised B x N matrix, snca_stats with a
  top-k (k = 30; the cuda backend runs it inside the lse pass), the fused backends with TF32 on.

Every loss and attention row is checked before it is timed, against the float64 reference on the
same (rounded) inputs: loss and, for forward+backward, the gradient, relative errors within the
bounds of the row's arithmetic (TOLERANCE); a row outside them is a FAIL row with its errors, never
a time. The top-k rows give their agreement with the float64 top-k indices.
The check's call also compiles (torch.compile, Triton): the note gives that first call's seconds
when it took over 2 s. Then the median of CUDA-event timings (3-10 of them, about 1 s), the peak
memory beyond the inputs, and the fraction of the floor reached:
floor = max(bank bytes / 4.3 TB/s, products * 2*B*N*D / rate), rate 990e12 (bf16 bank) or
495e12 (fp32, TF32 rate), products = 1 for a forward or a top-k, 3 for forward+backward (the
scores and the two softmax-weighted sums of MATH.md), 2 for an attention call. A failing row gives
a FAIL row; the rest still run. Rows are printed, and written to --out, as they are measured, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

B, D, T = 256, 128, 0.05
HBM_BYTES_PER_S = 4.3e12
RATE = {torch.float32: 495e12, torch.bfloat16: 990e12}
# (loss, gradient) relative errors against float64 beyond which a row is wrong, not rounded
# differently: fp32 arithmetic; TF32 products (inputs rounded to 10 bits); 16-bit matmuls or
# softmax weights (8 bits in bf16; scores up to 1/T = 20; plain PyTorch under autocast is off by
# ~1e-3 in the loss and 1-3e-2 in the gradient at N = 1,500). The gradient's error is
# max|g - g64| / max|g64|. A wrong mask (the own row counted, or another class's rows) moves the
# loss by 10 % or more on these inputs; a wrong scale or sign moves the gradient by 100 %.
TOLERANCE = {"fp32": (1e-4, 1e-3), "tf32": (5e-3, 3e-2), "16-bit": (2e-2, 1e-1)}


class CheckFailed(Exception):
    """A row's result is outside its tolerance: reported as FAIL, not timed."""


def _median_ms(fn: Callable[[], object], target_ms: float = 1000.0, fewest: int = 3, most: int = 10) -> float:
    fn()  # warm-up (the check has already made the first, compiling call)
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < most and (len(times) < fewest or sum(times) < target_ms):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn: Callable[[], object]) -> float:
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


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@dataclass(frozen=True)
class Case:
    n: int
    classes: int
    features_dtype: torch.dtype
    bank_dtype: torch.dtype

    @property
    def autocast(self) -> bool:
        """16-bit features: what a training step under torch.autocast hands the loss."""
        return self.features_dtype != torch.float32

    @property
    def precision(self) -> str:
        """The arithmetic the rows' checks allow for: a bf16 bank with fp32 features is upcast exactly."""
        return "16-bit" if self.autocast else "fp32"

    @property
    def tag(self) -> str:
        text = (
            f"N={self.n:,} {_short_dtype(self.features_dtype)} features, {_short_dtype(self.bank_dtype)} bank"
        )
        return text + (" (autocast)" if self.autocast else "")


CASES = [
    Case(n, classes, features_dtype, bank_dtype)
    for n, classes in ((1_281_167, 1000), (50_000, 10))
    for features_dtype, bank_dtype in (
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float32),
    )
]


@dataclass
class Inputs:
    features: Tensor  # [B, D] unit rows near their own bank rows, as in training
    indices: Tensor  # [B] distinct bank rows, the queries' own
    bank: Tensor  # [N, D] unit rows
    bank_labels: Tensor  # [N]


def _inputs(case: Case, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = F.normalize(torch.randn(case.n, D, device="cuda", generator=g), dim=1)
    bank_labels = torch.randint(0, case.classes, (case.n,), device="cuda", generator=g)
    indices = torch.randperm(case.n, device="cuda", generator=g)[:B]
    noise = torch.randn(B, D, device="cuda", generator=g) / math.sqrt(D)
    features = F.normalize(bank[indices] + noise, dim=1)
    return Inputs(
        features.to(case.features_dtype).contiguous(),
        indices,
        bank.to(case.bank_dtype).contiguous(),
        bank_labels,
    )


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return "FAIL " + (text[:90] + "..." if len(text) > 90 else text)


class Table:
    """Rows of the markdown table, printed and written as they come; stops timing new rows once the
    time budget is spent."""

    header = ("case", "backend", "ms (median)", "peak extra MiB", "floor ms", "of floor", "check")

    def __init__(self, budget_s: float, title: str, out: str | None):
        self.deadline = time.monotonic() + budget_s
        self.title = title
        self.out = Path(out) if out else None
        self.rows: list[tuple[str, ...]] = []
        print(self.title + "\n\n" + "\n".join(self._head()), flush=True)

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def row(self, *cells: str) -> None:
        self.rows.append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)
        if self.out:
            self.out.write_text(self.title + "\n\n" + self.markdown() + "\n")

    def add(self, case: str, backend: str, fn: Callable[[], object], floor: float, check=None) -> None:
        """``check`` (default: one call of ``fn``) runs first and returns a note or raises
        CheckFailed; only then is ``fn`` timed."""
        if self.expired():
            self.row(case, backend, "skipped (time budget)", "", f"{floor:.3f}", "", "")
            return
        try:
            start = time.perf_counter()
            note = check() if check else ""
            if not check:
                fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            if first_s > 2.0:
                note = f"{note}; first call {first_s:.0f} s".lstrip("; ")
            ms = _median_ms(fn)
            mib = _peak_extra_mib(fn)
            self.row(
                case, backend, f"{ms:.3f}", f"{mib:.1f}", f"{floor:.3f}", f"{100 * floor / ms:.1f}%", note
            )
        except CheckFailed as error:
            self.row(case, backend, f"FAIL check: {error}", "", f"{floor:.3f}", "", "")
        except Exception as error:  # one backend failing must not stop the others
            self.row(case, backend, _short(error), "", f"{floor:.3f}", "", "")
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _head(self) -> list[str]:
        return ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]

    def markdown(self) -> str:
        return "\n".join(self._head() + ["| " + " | ".join(row) + " |" for row in self.rows])


def _errors(loss: Tensor, grad: Tensor | None, expected: tuple[float, Tensor], precision: str) -> str:
    """The row's relative errors against float64; CheckFailed beyond TOLERANCE[precision]."""
    loss_tol, grad_tol = TOLERANCE[precision]
    gt_loss, gt_grad = expected
    loss_err = abs(loss.item() - gt_loss) / abs(gt_loss)
    note = f"loss rel err {loss_err:.1e}"
    bad = not loss_err <= loss_tol
    if grad is not None:
        grad_err = ((grad.double() - gt_grad).abs().max() / gt_grad.abs().max()).item()
        note += f", grad {grad_err:.1e}"
        bad = bad or not grad_err <= grad_tol
    if bad:
        raise CheckFailed(f"{note} (bounds {loss_tol:.0e}, {grad_tol:.0e})")
    return note


def _float64_loss_and_grad(data: Inputs) -> tuple[float, Tensor]:
    """The reference on the case's (already rounded) inputs, in float64, with its gradient."""
    from snca_ext import reference

    leaf = data.features.double().requires_grad_()
    loss = reference.snca_loss_reference(leaf, data.indices, data.bank.double(), data.bank_labels, T)
    loss.backward()
    return loss.item(), leaf.grad


def _autocast(fn: Callable[[Tensor], Tensor], case: Case) -> Callable[[Tensor], Tensor]:
    if not case.autocast:
        return fn

    def under_autocast(x: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=case.features_dtype):
            return fn(x)

    return under_autocast


def _loss_impls(case: Case, data: Inputs) -> list[tuple[str, Callable[[], Callable[[Tensor], Tensor]]]]:
    """(row name, factory of features -> loss): a factory sets up outside the timing (block masks)."""
    import snca_ext
    from benchmarks import peers
    from snca_ext import reference

    indices, bank, bank_labels = data.indices, data.bank, data.bank_labels

    def fused(backend: str):
        return lambda: lambda x: snca_ext.snca_loss(x, indices, bank, bank_labels, T, backend=backend)

    def flex(sort: bool, chunks: int):
        def factory():
            prepared = peers.flex_bank(indices, bank, bank_labels, sort_by_class=sort, chunks=chunks)
            return lambda x: peers.flex_snca_loss(x, prepared, T, compiled=True)

        return factory

    def plain(fn):
        return lambda: _autocast(lambda x: fn(x, indices, bank, bank_labels, T), case)

    impls = [("cuda", fused("cuda")), ("triton", fused("triton"))]
    if case.features_dtype == case.bank_dtype:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        impls += [
            (f"FlexAttention x2, sorted by class, {sms} chunks (compiled)", flex(True, sms)),
            ("FlexAttention x2, one sequence (compiled)", flex(False, 1)),
            ("FlexAttention x2, sorted by class, one sequence (compiled)", flex(True, 1)),
        ]
    impls += [
        ("torch original" + (" (autocast)" if case.autocast else ""), plain(reference.snca_loss_original)),
        (
            "torch.compile(original)" + (" (autocast)" if case.autocast else ""),
            plain(torch.compile(reference.snca_loss_original)),
        ),
        ("torch reference" + (" (autocast)" if case.autocast else ""), plain(reference.snca_loss_reference)),
    ]
    return impls


def _bench_loss(table: Table, case: Case, data: Inputs, expected: tuple[float, Tensor]) -> None:
    leaf = data.features.detach().requires_grad_(True)
    for name, factory in _loss_impls(case, data):
        rows = (f"loss fwd, {case.tag}", f"loss fwd+bwd, {case.tag}")
        floors = (_floor_ms(case.n, case.bank_dtype, 1), _floor_ms(case.n, case.bank_dtype, 3))
        if table.expired():
            for row, floor in zip(rows, floors, strict=True):
                table.add(row, name, lambda: None, floor)
            continue
        try:
            loss_fn = factory()
        except Exception as error:  # its set-up (block masks) failed: the other rows still run
            table.row(rows[0], name, _short(error), "", f"{floors[0]:.3f}", "", "")
            continue

        def forward(loss_fn=loss_fn) -> Tensor:
            with torch.no_grad():
                return loss_fn(data.features)

        def forward_backward(loss_fn=loss_fn) -> Tensor:
            leaf.grad = None
            loss = loss_fn(leaf)
            loss.backward()
            return loss.detach()

        def check_forward(forward=forward) -> str:
            return _errors(forward(), None, expected, case.precision)

        def check_forward_backward(forward_backward=forward_backward) -> str:
            loss = forward_backward()
            return _errors(loss, leaf.grad, expected, case.precision)

        table.add(rows[0], name, forward, floors[0], check_forward)
        table.add(rows[1], name, forward_backward, floors[1], check_forward_backward)
        del loss_fn, forward, forward_backward


def _bench_attention(table: Table, case: Case, data: Inputs) -> None:
    """One unmasked scaled_dot_product_attention call of the loss's size (queries the batch, keys =
    values = the bank, scale 1/T): what a FlashAttention-class kernel does with these shapes. As one
    sequence, and cut into one chunk per SM (zero rows pad the last; the check includes them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks import peers

    backend = (
        SDPBackend.EFFICIENT_ATTENTION if case.bank_dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    )
    name = f"SDPA {backend.name.lower()}"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floor = _floor_ms(case.n, case.bank_dtype, 2)
    for chunks in (1, sms):
        plural = "s" if chunks > 1 else ""
        label = f"attention fwd, unmasked (calibration), {chunks} chunk{plural}, {case.tag}"
        if table.expired():
            table.add(label, name, lambda: None, floor)
            continue
        keys = peers.split_bank(data.bank, chunks) if chunks > 1 else data.bank.view(1, 1, case.n, D)
        query = data.features.to(case.bank_dtype).view(1, 1, B, D).expand(chunks, 1, B, D)

        def attend(keys=keys, query=query) -> Tensor:
            with torch.no_grad(), sdpa_kernel(backend):
                return F.scaled_dot_product_attention(query, keys, keys, scale=1.0 / T)

        def check(attend=attend, keys=keys, query=query) -> str:
            out = attend()[:, 0].double()
            keys64 = keys[:, 0].double()
            weights = torch.softmax(query[:, 0].double() @ keys64.transpose(1, 2) / T, dim=2)
            expected = weights @ keys64
            del weights
            err = ((out - expected).abs().max() / expected.abs().max()).item()
            bound = TOLERANCE[case.precision][1]
            if not err <= bound:
                raise CheckFailed(f"out rel err {err:.1e} (bound {bound:.0e})")
            return f"out rel err {err:.1e}"

        table.add(label, name, attend, floor, check)
        del keys, attend, check


def _bench_tf32(table: Table, case: Case, data: Inputs, expected: tuple[float, Tensor]) -> None:
    """The fused backends with torch.backends.cuda.matmul.allow_tf32 on (one TF32 product per multiply)."""
    import snca_ext

    leaf = data.features.detach().requires_grad_(True)
    for backend in ("cuda", "triton"):

        def forward_backward(backend=backend) -> Tensor:
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                leaf.grad = None
                loss = snca_ext.snca_loss(leaf, data.indices, data.bank, data.bank_labels, T, backend=backend)
                loss.backward()
                return loss.detach()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        def check(forward_backward=forward_backward) -> str:
            loss = forward_backward()
            return _errors(loss, leaf.grad, expected, "tf32")

        table.add(
            f"loss fwd+bwd TF32 on, {case.tag}",
            backend,
            forward_backward,
            _floor_ms(case.n, case.bank_dtype, 3),
            check,
        )


def _bench_matmul(table: Table, case: Case, data: Inputs) -> None:
    """The same-size product F M^T by cuBLAS (TF32 off, and on for an fp32 bank): what this GPU does
    with these shapes."""
    lhs = data.features.to(case.bank_dtype)
    for tf32 in (False, True):
        if case.bank_dtype != torch.float32 and tf32:
            continue

        def product(tf32=tf32) -> Tensor:
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return lhs @ data.bank.T
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        label = f"matmul B x N x D (calibration){', TF32' if tf32 else ''}, {case.tag}"
        table.add(label, "cuBLAS", product, _floor_ms(case.n, case.bank_dtype, 1))


def _bench_topk(table: Table, case: Case, data: Inputs, k: int) -> None:
    import snca_ext
    from snca_ext import reference

    features, bank = data.features, data.bank
    with torch.no_grad():
        ref_rows = reference.bank_topk_reference(features.double(), bank.double(), k)[1]
    fns = {
        "cuda": lambda: snca_ext.bank_topk(features, bank, k, backend="cuda"),
        "triton": lambda: snca_ext.bank_topk(features, bank, k, backend="triton"),
        "torch.topk (materialised)": lambda: torch.topk(features @ bank.to(features.dtype).T, k, dim=1),
    }
    for name, fn in fns.items():

        def check(fn=fn) -> str:
            return f"idx agree {(fn()[1] == ref_rows).float().mean().item():.4f}"

        table.add(f"bank_topk k={k}, {case.tag}", name, fn, _floor_ms(case.n, case.bank_dtype, 1), check)


def _bench_stats_topk(table: Table, case: Case, data: Inputs) -> None:
    """snca_stats with a top-k: the cuda backend runs it inside the lse pass (one pass over the bank)
    where it fits; compare with the loss forward of the same inputs (no top-k) above."""
    import snca_ext
    from snca_ext import reference

    k = 30
    with torch.no_grad():
        ref_rows = reference.bank_topk_reference(
            data.features.double(), data.bank.double(), k, exclude=data.indices
        )[1]

    def stats():
        with torch.no_grad():
            return snca_ext.snca_stats(
                data.features, data.indices, data.bank, data.bank_labels, T, topk=k, backend="cuda"
            )

    def check() -> str:
        return f"idx agree {(stats()[3] == ref_rows).float().mean().item():.4f}"

    table.add(
        f"snca_stats topk={k}, {case.tag}",
        "cuda (top-k in the lse pass)",
        stats,
        _floor_ms(case.n, case.bank_dtype, 1),
        check,
    )


def run_one_launch() -> int:
    """One forward+backward of the cuda backend at ImageNet size, bf16 features and bank (for ncu)."""
    import snca_ext

    data = _inputs(Case(1_281_167, 1000, torch.bfloat16, torch.bfloat16))
    leaf = data.features.detach().requires_grad_(True)
    snca_ext.snca_loss(leaf, data.indices, data.bank, data.bank_labels, T, backend="cuda").backward()
    torch.cuda.synchronize()
    return 0


def run_table(budget_s: float, out: str | None, only: str | None) -> int:
    # One compiled graph per (shape, dtype, block mask): more than dynamo's default of 8 recompiles
    # of one function; past the limit dynamo would run the peer eagerly (the B x N scores
    # materialised) and time that: fail instead.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    title = (
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}, B={B}, D={D}, T={T}"
    )
    table = Table(budget_s, title, out)
    start = time.monotonic()
    for case in CASES:
        if only and only not in case.tag:
            continue
        if table.expired():  # not even the inputs and the float64 reference
            table.row(case.tag, "(every row)", "skipped (time budget)", "", "", "", "")
            continue
        try:
            data = _inputs(case)
            expected = _float64_loss_and_grad(data)
        except Exception as error:  # the inputs or the float64 reference itself failed
            table.row(case.tag, "(setup)", _short(error), "", "", "", "")
            continue
        _bench_matmul(table, case, data)
        _bench_loss(table, case, data, expected)
        if case.features_dtype == case.bank_dtype:
            _bench_attention(table, case, data)
        if not case.autocast:
            _bench_tf32(table, case, data, expected)
            for k in (30, 1024):
                _bench_topk(table, case, data, k)
            _bench_stats_topk(table, case, data)
        del data, expected
        torch.cuda.empty_cache()
    print(f"table done in {time.monotonic() - start:.0f} s", flush=True)
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
    parser.add_argument(
        "--cases",
        default=None,
        help="only the cases whose label contains this text, e.g. 'N=1,281,167 bf16 features'",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to time", file=sys.stderr)
        return 2
    if args.one_launch:
        return run_one_launch()
    return run_smoke() if args.smoke else run_table(args.budget, args.out, args.cases)


if __name__ == "__main__":
    sys.exit(main())
