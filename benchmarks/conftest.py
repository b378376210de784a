"""Options, collection and shared fixtures of the benchmark suite.

pytest benchmarks --benchmark-only                        default sizes, a few minutes on 2 cores
pytest benchmarks --benchmark-only --full-sizes           B=256, D=128, N=50,000 and 1,281,167
SNCA_BENCH_FULL=1 pytest benchmarks --benchmark-only      the same
pytest benchmarks --bench-sizes=tiny                      the CI smoke size
"""

from __future__ import annotations

import fnmatch
import os
import platform
from importlib import metadata

import pytest
import torch

import snca_ext
from benchmarks import harness

_PROFILE = pytest.StashKey[harness.Profile]()
_DEVICE_ORDER = {"cpu": 0, "cuda": 1}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("snca_ext benchmarks")
    group.addoption(
        "--bench-sizes",
        choices=sorted(harness.PROFILES),
        default=None,
        help=f"size table row to run (default: 'default', or ${harness.SIZES_ENV})",
    )
    group.addoption(
        "--full-sizes",
        action="store_true",
        default=False,
        help=f"run the full sizes (B=256, D=128, N=50,000 and 1,281,167); same as {harness.FULL_ENV}=1",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        profile = harness.resolve_profile(config.getoption("--bench-sizes"), config.getoption("--full-sizes"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from error
    config.stash[_PROFILE] = profile
    # The plain-PyTorch cases need ~8 GB each at ImageNet size, and concurrent cases would also
    # corrupt each other's RSS and timings: the suite must run one case at a time.
    workers = config.getoption("numprocesses", default=None)
    if workers not in (None, 0, "0"):
        raise pytest.UsageError("run the benchmarks serially: drop -n/--numprocesses (pytest-xdist)")


def pytest_report_header(config: pytest.Config) -> str:
    profile = config.stash[_PROFILE]
    sizes = ", ".join(f"B={s.batch} D={s.dim} N={s.bank_rows}" for s in profile.sizes)
    return (
        f"snca_ext benchmarks: sizes={profile.name} ({sizes}), k={profile.topk}, devices={harness.devices()}"
    )


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` too, unless pytest's own python_files already does (no duplicates)."""
    if not (file_path.name.startswith("bench_") and file_path.suffix == ".py"):
        return None
    patterns = parent.config.getini("python_files")
    if parent.session.isinitpath(file_path) or any(
        fnmatch.fnmatch(file_path.name, pattern) or fnmatch.fnmatch(str(file_path), pattern)
        for pattern in patterns
    ):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        sizes = metafunc.config.stash[_PROFILE].sizes
        metafunc.parametrize("size", sizes, ids=[size.label for size in sizes])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order by module, device, then bank size, so each size's inputs are built once (InputCache)."""

    def key(indexed):
        index, item = indexed
        params = getattr(getattr(item, "callspec", None), "params", {})
        size = params.get("size")
        return (
            str(item.path),
            _DEVICE_ORDER.get(params.get("device"), 9),
            size.bank_rows if isinstance(size, harness.Size) else 0,
            index,
        )

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    peers = {}
    for package in ("faiss-cpu", "pytorch-metric-learning", "pykeops"):
        try:
            peers[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            peers[package] = None
    machine_info["snca_ext"] = {
        "version": snca_ext.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_backends": snca_ext.available_backends("cpu"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_gb": round(pages * page_size / 1e9, 1),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "sizes": config.stash[_PROFILE].name,
        "peers": peers,
    }


@pytest.fixture(scope="session")
def profile(pytestconfig: pytest.Config) -> harness.Profile:
    return pytestconfig.stash[_PROFILE]


@pytest.fixture(scope="session")
def input_cache() -> harness.InputCache:
    return harness.InputCache()


@pytest.fixture
def inputs(input_cache: harness.InputCache, size: harness.Size, device: str) -> harness.BankInputs:
    return input_cache.get(size, device)
