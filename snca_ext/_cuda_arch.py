"""Which GPU architectures the CUDA backend is built for, and whether a device can run it.

Used twice: by setup.py (which loads this file by path, before the package exists, so it needs the
standard library only) to decide what to compile, and by ops.py at run time to decide whether the
compiled kernels can run on a device. The kernels need sm_80 or newer (TF32 tensor cores).
"""

from __future__ import annotations

import warnings

MIN_CAPABILITY = (8, 0)

# torch.utils.cpp_extension's names for TORCH_CUDA_ARCH_LIST (the ones it accepts besides "8.6").
NAMED_ARCHES = {
    "Kepler+Tesla": "3.7",
    "Kepler": "3.5+PTX",
    "Maxwell+Tegra": "5.3",
    "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX",
    "Volta+Tegra": "7.2",
    "Volta": "7.0+PTX",
    "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
}


def _entries(arch_list: str) -> list[str]:
    out = []
    for entry in arch_list.replace(" ", ";").replace(",", ";").split(";"):
        entry = entry.strip()
        if entry:
            out.extend(NAMED_ARCHES[entry].split(";") if entry in NAMED_ARCHES else [entry])
    return out


def _capability(entry: str) -> tuple[int, int]:
    """(major, minor) of one entry such as "8.6", "9.0a", "10.0f" or "9.0+PTX"."""
    number = entry.split("+")[0].rstrip("af")
    major, _, minor = number.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 8.6, 9.0a or 9.0+PTX")
    return int(major), int(minor)


def filter_arch_list(arch_list: str) -> tuple[str, list[str]]:
    """Splits a TORCH_CUDA_ARCH_LIST value into the entries the kernels can be built for (sm_80 or
    newer, joined with ";") and the dropped ones.

    >>> filter_arch_list("7.5;8.0;Hopper")
    ('8.0;9.0+PTX', ['7.5'])
    """
    kept, dropped = [], []
    for entry in _entries(arch_list):
        (kept if _capability(entry) >= MIN_CAPABILITY else dropped).append(entry)
    return ";".join(kept), dropped


def build_arch_list(env_value: str | None, visible: list[tuple[int, int]]) -> tuple[str, str]:
    """The arch list to compile the CUDA kernels for ("" = skip them) and a message saying why.

    env_value: TORCH_CUDA_ARCH_LIST (None or "" when unset); visible: the compute capabilities of
    the GPUs torch sees (used when env_value is unset, as torch does; Ampere and Hopper, "8.0;9.0",
    when there are none).
    """
    if env_value:
        source = f"TORCH_CUDA_ARCH_LIST={env_value}"
    elif visible:
        env_value = ";".join(f"{major}.{minor}" for major, minor in sorted(set(visible)))
        source = f"the visible GPUs ({env_value})"
    else:
        env_value, source = "8.0;9.0", "the default for a machine without a GPU (8.0;9.0)"
    kept, dropped = filter_arch_list(env_value)
    if not kept:
        return "", (
            f"CUDA backend: not built: {source} has no architecture >= sm_80, which the kernels need "
            "(TF32 tensor cores); the cpu backend is built, and on the GPU `auto` uses triton or reference"
        )
    message = f"CUDA backend: built for {kept} (from {source})"
    if dropped:
        message += f"; dropped {';'.join(dropped)}: the kernels need sm_80 or newer"
    return kept, message


def runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a binary built for arch_list has code a GPU of this compute capability can run.

    Machine code for sm_XY runs on sm_XZ with Z >= Y (same major); "a" variants only on sm_XY
    itself; PTX ("+PTX") is compiled by the driver for any capability at least its own.
    """
    for entry in _entries(arch_list):
        built = _capability(entry)
        number = entry.split("+")[0]
        if entry.endswith("+PTX") and capability >= built:
            return True
        if number.endswith("a"):
            if capability == built:
                return True
        elif capability[0] == built[0] and capability[1] >= built[1]:
            return True
    return False


def unusable_reason(arch_list: str, capability: tuple[int, int]) -> str | None:
    """Why the compiled CUDA kernels cannot run on a GPU of this capability, or None when they can."""
    if runs_on(arch_list, capability):
        return None
    name = f"sm_{capability[0]}{capability[1]}"
    if capability < MIN_CAPABILITY:
        return f"the GPU is {name}; the CUDA kernels need sm_80 or newer (TF32 tensor cores)"
    return (
        f"snca_ext._C has CUDA code for {arch_list or 'no architecture'}, none of which runs on this "
        f"{name} GPU; rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}"
    )


_device_reason: dict[int, str | None] = {}


def compiled_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST snca_ext._C was built with ("" without CUDA kernels)."""
    import torch

    return torch.ops.snca_ext._cuda_archs()


def device_unusable_reason(device) -> str | None:
    """unusable_reason for a CUDA device and the compiled binary, looked up once per device; the
    first time a device is found unusable, one warning says why (``auto`` then falls back)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_reason:
        reason = unusable_reason(compiled_arch_list(), torch.cuda.get_device_capability(index))
        _device_reason[index] = reason
        if reason is not None:
            warnings.warn(
                f"snca_ext: backend 'cuda' is skipped on cuda:{index}: {reason}", RuntimeWarning, stacklevel=4
            )
    return _device_reason[index]
