"""Top-k / kNN search over the bank: ``snca_ext.bank_topk`` against ``torch.topk`` on the
materialised matrix, faiss-cpu exact inner-product search and pykeops ``argKmin``.

Each implementation's neighbours are checked once against ours before it is timed: the exact
(float64) similarities of the rows it returns must be the k largest, so only ties within float32
rounding may pick a different row.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import snca_ext
from benchmarks import harness

PLAIN_IMPLS = {
    "torch-topk": ("torch.topk on the materialised B x N matrix", "baseline", ("cpu", "cuda")),
    "faiss-flatip": ("faiss-cpu IndexFlatIP (BLAS path)", "peer", ("cpu",)),  # host memory only
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


def _search_fn(impl: str, inputs: harness.BankInputs, k: int, request) -> Callable[[], Tensor]:
    """A call returning the [B, k] neighbour rows; index building (faiss) is setup, not timed."""
    queries, bank = inputs.features, inputs.bank
    if impl.startswith("snca_ext-"):
        backend = impl.removeprefix("snca_ext-")
        return lambda: snca_ext.bank_topk(queries, bank, k, backend=backend)[1]
    if impl == "torch-topk":
        return lambda: torch.topk(queries @ bank.T, k, dim=1).indices
    if impl == "faiss-flatip":
        faiss = harness.import_peer("faiss", "faiss-cpu")
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.numpy())
        faiss.omp_set_num_threads(torch.get_num_threads())
        previous = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD

        def restore() -> None:
            faiss.cvar.distance_compute_blas_threshold = previous

        request.addfinalizer(restore)
        queries_np = queries.numpy()
        return lambda: torch.from_numpy(index.search(queries_np, k)[1])
    if impl == "pykeops":
        keops = harness.import_peer("pykeops.torch", "pykeops")
        lazy_queries = keops.LazyTensor(queries[:, None, :])
        lazy_bank = keops.LazyTensor(bank[None, :, :])
        return lambda: (-(lazy_queries * lazy_bank).sum(-1)).argKmin(k, dim=1)
    raise ValueError(f"unknown top-k implementation {impl!r}")


def test_bank_topk(benchmark, request, profile, inputs, size, device, impl):
    label, kind = _impls(device)[impl]
    k = profile.topk
    search = _search_fn(impl, inputs, k, request)
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
            "check": f"same neighbours as snca_ext.bank_topk up to float32 ties ({identical:.1%} same sets)",
        },
    )
