"""Top-k / kNN search over the bank: ``snca_ext.bank_topk`` against ``torch.topk`` on the
materialised matrix, faiss-cpu exact inner-product search and pykeops ``argKmin``.

Each implementation's neighbours are checked once against ours before it is timed: the exact
(float64) similarities of the rows it returns must be the k largest, so only ties within float32
rounding may pick a different row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import snca_ext
from benchmarks import harness

PLAIN_IMPLS = {
    "torch-topk": ("torch.topk on the materialised B x N matrix", "baseline", ("cpu", "cuda")),
    "faiss-flatip": ("faiss-cpu IndexFlatIP", "peer", ("cpu",)),  # host memory only
    "pykeops": ("pykeops argKmin", "peer", ("cpu", "cuda")),
}
# faiss searches fewer queries than this per call with its own SIMD loop, more with BLAS. Its default
# (128,000 in faiss 1.15) keeps B = 256 on the SIMD loop: ~7 s at N = 1.28M on 2 cores against ~0.5 s
# for BLAS. 20 is the value faiss shipped with for years, what a user who knows would set.
FAISS_BLAS_THRESHOLD = 20
SIMILARITY_ATOL = 1e-5  # float32 rounding of a unit-vector inner product, D = 128


def _impls(device: str) -> dict[str, tuple[str, str]]:
    found = {
        f"snca_ext-{backend}": (f"snca_ext.bank_topk (fused, {backend})", "ours")
        for backend in harness.fused_backends(device)
    }
    found.update(
        {impl: (label, kind) for impl, (label, kind, where) in PLAIN_IMPLS.items() if device in where}
    )
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = [(device, impl) for device in harness.devices() for impl in _impls(device)]
    metafunc.parametrize(("device", "impl"), cases, ids=[f"{device}-{impl}" for device, impl in cases])


def _expected_rows(inputs: harness.BankInputs, k: int) -> Tensor:
    key = ("bank_topk", k)
    if key not in inputs.memo:
        inputs.memo[key] = snca_ext.bank_topk(inputs.features, inputs.bank, k)[1]
    return inputs.memo[key]


def assert_same_neighbours(
    queries: Tensor, bank: Tensor, rows: Tensor, expected: Tensor, label: str
) -> float:
    """``rows`` must be a valid top-k of ``queries`` against ``bank`` (as ``expected`` is): distinct
    rows whose exact similarities, sorted, equal those of ``expected``. Returns the fraction of
    queries whose neighbour set is identical to ``expected``'s."""
    rows = rows.to(expected.device, torch.long)
    assert rows.shape == expected.shape, (
        f"{label} returned shape {tuple(rows.shape)}, expected {tuple(expected.shape)}"
    )
    assert bool(((rows >= 0) & (rows < bank.shape[0])).all()), f"{label} returned rows outside [0, N)"
    assert bool((rows.sort(dim=1).values.diff(dim=1) != 0).all()), f"{label} returned a row twice for a query"

    def exact_similarities(chosen: Tensor) -> Tensor:
        sims = (bank[chosen].double() * queries.double()[:, None, :]).sum(dim=-1)
        return sims.sort(dim=1, descending=True).values

    torch.testing.assert_close(
        exact_similarities(rows),
        exact_similarities(expected),
        rtol=0,
        atol=SIMILARITY_ATOL,
        msg=lambda m: f"{label} does not return the same neighbours as snca_ext.bank_topk: {m}",
    )
    same_set = (rows.sort(dim=1).values == expected.sort(dim=1).values).all(dim=1)
    return float(same_set.double().mean())


def _tune_faiss(faiss, search: Callable[[], object], library_threshold: int) -> dict[str, object]:
    """Set faiss up as a user who knows it would: its BLAS path (see FAISS_BLAS_THRESHOLD) and the
    thread count that is fastest here (its OpenMP and OpenBLAS threads can fight over 2 cores), or
    its SIMD path if that wins after all. One untimed search per candidate; the winner stays set."""
    threads = torch.get_num_threads()
    candidates = [(threads, FAISS_BLAS_THRESHOLD), (threads, library_threshold)]
    if threads > 1:
        candidates.append((1, FAISS_BLAS_THRESHOLD))
    timings = []
    for omp_threads, threshold in candidates:
        faiss.omp_set_num_threads(omp_threads)
        faiss.cvar.distance_compute_blas_threshold = threshold
        start = time.perf_counter()
        search()
        timings.append((time.perf_counter() - start, omp_threads, threshold))
    _, omp_threads, threshold = min(timings)
    faiss.omp_set_num_threads(omp_threads)
    faiss.cvar.distance_compute_blas_threshold = threshold
    return {
        "faiss_threads": omp_threads,
        "faiss_blas_threshold": threshold,
        "faiss_tuning": {f"threads={n} blas_threshold={t}": round(s, 4) for s, n, t in timings},
    }


def _search_fn(
    impl: str, inputs: harness.BankInputs, k: int, request
) -> tuple[Callable[[], Tensor], dict[str, object]]:
    """(a call returning the [B, k] neighbour rows, setup details for the report); index building and
    tuning (faiss) are setup, not timed."""
    queries, bank = inputs.features, inputs.bank
    if impl.startswith("snca_ext-"):
        backend = impl.removeprefix("snca_ext-")
        return lambda: snca_ext.bank_topk(queries, bank, k, backend=backend)[1], {}
    if impl == "torch-topk":
        return lambda: torch.topk(queries @ bank.T, k, dim=1).indices, {}
    if impl == "faiss-flatip":
        faiss = harness.import_peer("faiss", "faiss-cpu")
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.numpy())
        # faiss and torch share the OpenMP runtime here: faiss's thread count is torch's too.
        previous = (torch.get_num_threads(), faiss.cvar.distance_compute_blas_threshold)

        def restore() -> None:
            faiss.omp_set_num_threads(previous[0])
            torch.set_num_threads(previous[0])
            faiss.cvar.distance_compute_blas_threshold = previous[1]

        request.addfinalizer(restore)
        queries_np = queries.numpy()
        config = _tune_faiss(faiss, lambda: index.search(queries_np, k), previous[1])
        return lambda: torch.from_numpy(index.search(queries_np, k)[1]), config
    if impl == "pykeops":
        keops = harness.import_peer("pykeops.torch", "pykeops")
        lazy_queries = keops.LazyTensor(queries[:, None, :])
        lazy_bank = keops.LazyTensor(bank[None, :, :])
        return lambda: (-(lazy_queries * lazy_bank).sum(-1)).argKmin(k, dim=1), {}
    raise ValueError(f"unknown top-k implementation {impl!r}")


def test_bank_topk(benchmark, request, profile, inputs, size, device, impl):
    label, kind = _impls(device)[impl]
    k = profile.topk
    search, setup = _search_fn(impl, inputs, k, request)
    if "faiss_threads" in setup:
        label += (
            f", tuned: {setup['faiss_threads']} thread(s), BLAS threshold {setup['faiss_blas_threshold']}"
        )
    if impl == "pykeops":
        try:  # the first call compiles a C++ kernel: no working compiler is a setup problem, not ours
            rows = search()
        except Exception as error:
            pytest.skip(
                f"pykeops could not build its kernel here: {type(error).__name__}: {str(error)[:300]}"
            )
    else:
        rows = search()
    identical = assert_same_neighbours(inputs.features, inputs.bank, rows, _expected_rows(inputs, k), label)

    harness.run_case(
        benchmark,
        search,
        profile=profile,
        device=inputs.device,
        group=f"bank_topk k={k} | {device} | B={size.batch} D={size.dim} N={size.bank_rows}",
        info={
            "op": "bank_topk",
            "mode": f"k={k}",
            "k": k,
            "impl": impl,
            "label": label,
            "kind": kind,
            **size.info(),
            **setup,
            "check": f"same neighbours as snca_ext.bank_topk up to float32 ties ({identical:.1%} same sets)",
        },
    )
