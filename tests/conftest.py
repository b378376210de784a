import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import snca_ext


def _backends_under_test() -> list[tuple[str, str]]:
    """(backend, device) pairs that the shared op tests run on: every compiled backend on its
    device. The Triton interpreter on CPU is covered by tests/test_triton.py at smaller sizes."""
    pairs = [("cpu", "cpu")] if "cpu" in snca_ext.available_backends("cpu") else []
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in snca_ext.available_backends("cuda") if b != "reference"]
    return pairs


BACKENDS_UNDER_TEST = _backends_under_test()


# The cpu kernel splits the bank's tiles (512 rows) over its threads and merges their
# log-sum-exps, gradient sums and top-k lists: at 1 thread that merge never runs, at 2 it does
# whenever N > 512. Each op test runs the cpu backend at both.
_CASES = [
    (backend, device, threads)
    for backend, device in BACKENDS_UNDER_TEST
    for threads in ((1, 2) if device == "cpu" else (None,))
]


@pytest.fixture(
    params=_CASES,
    ids=[f"{b}-{d}" + (f"-{t}thread{'s' if t > 1 else ''}" if t else "") for b, d, t in _CASES],
)
def backend_device(request) -> tuple[str, str]:
    """``(backend, device)``; the cpu backend at 1 and at 2 threads (restored after the test)."""
    backend, device, threads = request.param
    if threads is not None:
        torch.set_num_threads(threads)
    return backend, device


def pytest_report_header(config) -> str:
    """One line naming the backends this run checks, and the ones it cannot."""
    checked = [f"{backend} on {device}" for backend, device in BACKENDS_UNDER_TEST]
    if "triton" in snca_ext.available_backends("cpu"):
        checked.append("triton in the interpreter on cpu")
    missing = [] if torch.cuda.is_available() else ["cuda and triton on a GPU (no GPU here)"]
    return (
        "snca_ext backends checked: "
        + ", ".join(checked)
        + ("; not run: " + ", ".join(missing) if missing else "")
    )


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The commands set torch's thread count process-wide (digits: 1); without this, every op test
    after the first in-process run would check the kernels on one worker only."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
