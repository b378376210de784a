"""The one harness every benchmark in this folder shares: sizes, inputs, peak memory, timing.

A case is measured in three steps: one untimed call whose result is checked against our op (it
also absorbs one-off costs: torch.compile, pykeops compilation, thread-pool start-up), one call
that measures the added peak memory, then ``benchmark.pedantic`` rounds for the time. The number
of rounds comes from the memory call's duration and the profile's time budget, so a 10 s case is
not run twenty times and a 1 ms case is not timed once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

import snca_ext

FULL_ENV = "SNCA_BENCH_FULL"
SIZES_ENV = "SNCA_BENCH_SIZES"
TEMPERATURE = 0.05  # the original project's ImageNet and CIFAR setting
MB = 1e6
BENCH_EXTRA = "pip install -e .[bench]"


@dataclass(frozen=True)
class Size:
    batch: int
    dim: int
    bank_rows: int
    classes: int

    @property
    def label(self) -> str:  # a test id that `-k N50000` can select
        return f"N{self.bank_rows}"

    def info(self) -> dict[str, int]:
        return {"B": self.batch, "D": self.dim, "N": self.bank_rows, "classes": self.classes}


@dataclass(frozen=True)
class Profile:
    name: str
    sizes: tuple[Size, ...]
    topk: int
    time_budget_s: float  # timed seconds aimed at per case (never fewer than min_rounds rounds)
    min_rounds: int = 3
    max_rounds: int = 30


# The one size table. "full" is CIFAR-10's and ImageNet's sizes; "default" finishes in a few
# minutes on a 2-core CPU; "tiny" is the CI smoke run.
PROFILES: dict[str, Profile] = {
    "tiny": Profile("tiny", (Size(32, 32, 2_000, 10),), topk=5, time_budget_s=0.02),
    "default": Profile(
        "default", (Size(256, 128, 10_000, 10), Size(256, 128, 50_000, 10)), topk=30, time_budget_s=1.5
    ),
    "full": Profile(
        "full", (Size(256, 128, 50_000, 10), Size(256, 128, 1_281_167, 1000)), topk=30, time_budget_s=3.0
    ),
}


def resolve_profile(option: str | None, full_flag: bool, environ: Mapping[str, str] = os.environ) -> Profile:
    """``--bench-sizes`` wins, then ``--full-sizes``, then SNCA_BENCH_FULL=1, then SNCA_BENCH_SIZES."""
    if option is None and (full_flag or environ.get(FULL_ENV, "") not in ("", "0")):
        option = "full"
    if option is None:
        option = environ.get(SIZES_ENV) or "default"
    if option not in PROFILES:
        raise ValueError(f"benchmark sizes must be one of {sorted(PROFILES)}, got {option!r}")
    return PROFILES[option]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def fused_backends(device: str) -> list[str]:
    """Our compiled/Triton backends usable on ``device`` (the reference is benchmarked on its own;
    Triton on CPU is the interpreter, a correctness tool, not something to time)."""
    return [
        b
        for b in snca_ext.available_backends(device)
        if b != "reference" and (b, device) != ("triton", "cpu")
    ]


def import_peer(module: str, package: str) -> ModuleType:
    """The peer library, or a skip that says how to get it: a missing peer never fails the run."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.skip(f"{package} is not installed ({error}); `{BENCH_EXTRA}` installs the peers")


# ----------------------------------------------------------------------------- inputs


@dataclass
class BankInputs:
    size: Size
    device: torch.device
    features: Tensor  # [B, D] unit rows, near their own bank rows (as in training)
    indices: Tensor  # [B] distinct bank rows, the queries' own
    labels: Tensor  # [B] = bank_labels[indices]
    bank: Tensor  # [N, D] unit rows
    bank_labels: Tensor  # [N]
    temperature: float = TEMPERATURE
    memo: dict = field(default_factory=dict)  # per-size expected results, computed once


def make_inputs(size: Size, device: str, seed: int = 0) -> BankInputs:
    generator = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(size.bank_rows, size.dim, generator=generator), dim=1)
    bank_labels = torch.randint(0, size.classes, (size.bank_rows,), generator=generator)
    indices = torch.randperm(size.bank_rows, generator=generator)[: size.batch]
    noise = torch.randn(size.batch, size.dim, generator=generator) / math.sqrt(size.dim)
    features = F.normalize(bank[indices] + noise, dim=1)
    to = torch.device(device)
    return BankInputs(
        size=size,
        device=to,
        features=features.to(to),
        indices=indices.to(to),
        labels=bank_labels[indices].to(to),
        bank=bank.to(to),
        bank_labels=bank_labels.to(to),
    )


class InputCache:
    """Holds the inputs of one (size, device) at a time: the ImageNet bank is 656 MB, and the items
    are sorted by device and size (conftest.py), so each is built once and freed before the next."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._inputs: BankInputs | None = None

    def get(self, size: Size, device: str) -> BankInputs:
        key = (size, device)
        if key != self._key:
            self._key, self._inputs = None, None
            gc.collect()
            self._inputs = make_inputs(size, device)
            self._key = key
        return self._inputs


# ----------------------------------------------------------------------------- peak memory

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name} line")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_growth(call: Callable[[], object]) -> tuple[int | None, str]:
    """Peak RSS during ``call`` minus RSS just before it, with the inputs already resident.

    A process's peak RSS (ru_maxrss) never goes down, so deltas of it are useless once a
    materialised baseline has touched gigabytes. Linux lets a process reset its own high-water
    mark: writing 5 to /proc/self/clear_refs sets VmHWM back to the current VmRSS, and the kernel
    then tracks the peak exactly (every page, no sampling) until we read VmHWM after the call. The
    call runs in this process, so the number is what a user's training step would see. Before the
    reset, malloc_trim hands freed heap pages back to the kernel: otherwise a buffer the previous
    case freed could be reused without touching new pages and the growth would be undercounted.
    """
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    if not os.path.exists("/proc/self/status") or not _reset_peak_rss():
        call()
        return None, "unavailable (needs Linux /proc/self/clear_refs)"
    before = _status_bytes("VmRSS")
    call()
    return _status_bytes("VmHWM") - before, "RSS growth (VmHWM after clear_refs)"


def _cuda_growth(call: Callable[[], object], device: torch.device) -> tuple[int, str]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "CUDA max_memory_allocated growth"


def measure_added_memory(call: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return _cuda_growth(call, device)
    return _rss_growth(call)


# ----------------------------------------------------------------------------- one case


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device sync, so wall-clock time covers the GPU work."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def run_case(
    benchmark,
    fn: Callable[[], object],
    *,
    profile: Profile,
    device: torch.device,
    group: str,
    info: Mapping[str, object],
) -> None:
    """Measure the added peak memory of one more call of ``fn`` (already checked and warmed up by the
    caller), then time it with pytest-benchmark; both land in the saved JSON."""
    call = synchronised(fn, device)
    start = time.perf_counter()
    added, method = measure_added_memory(call, device)
    seconds = time.perf_counter() - start
    rounds = min(profile.max_rounds, max(profile.min_rounds, math.ceil(profile.time_budget_s / seconds)))
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(
        {
            "device": device.type,
            "threads": torch.get_num_threads(),
            "profile": profile.name,
            "added_memory_bytes": added,
            "memory_method": method,
        }
    )
    gc.collect()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
