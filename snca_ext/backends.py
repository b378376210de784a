"""The backends of the fused ops: which implementations this install has (the compiled
``snca_ext._C`` for cpu/cuda, Triton, the plain-PyTorch reference), which can run on a device
(``available_backends``), and the choice for a call (``resolve_backend``, ``kernel_op``)."""

from __future__ import annotations

import os

import torch

from . import _autograd, _cuda_arch

try:
    from . import _C  # noqa: F401  (loading it registers the C++/CUDA kernels)

    C_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # the package still works with the reference backend
    C_IMPORT_ERROR = error

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

if C_IMPORT_ERROR is None:
    _autograd.register_snca_forward("snca_ext::snca_forward")
    _autograd.register_bank_topk("snca_ext::bank_topk")


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if C_IMPORT_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"snca_ext::{op}", dispatch_key)


# Looked up once: torch.compile cannot trace the dispatcher query, and it never changes.
COMPILED_FOR = {"cpu": _has_kernel("snca_forward", "CPU"), "cuda": _has_kernel("snca_forward", "CUDA")}
# Fastest first, per device type; `auto` takes the first usable one.
# Meta tensors (shapes without data, e.g. a model built on torch.device("meta")) go through the
# registered ops, whose fake kernels give the outputs' shapes; the reference would read values.
_PREFERENCE = {
    "cpu": ("cpu", "triton", "reference"),
    "cuda": ("cuda", "triton", "reference"),
    "meta": ("cpu",),
}
_triton_ok: dict[str, bool] = {}


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in _triton_ok:
        try:
            from . import triton as _triton

            _triton_ok[device.type] = bool(_triton.AVAILABLE)
        except ImportError:
            _triton_ok[device.type] = False
    return _triton_ok[device.type]


def _usable(backend: str, device: torch.device) -> bool:
    if device.type == "meta":
        return backend == "cpu" and C_IMPORT_ERROR is None
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and COMPILED_FOR["cpu"]
    if backend == "cuda":
        # The binary may lack code for this GPU (e.g. built for sm_90 only and run on an sm_86):
        # `auto` then falls back, after one warning that names the reason.
        compiled = device.type == "cuda" and COMPILED_FOR["cuda"]
        return compiled and _cuda_arch.device_unusable_reason(device) is None
    return device.type in ("cpu", "cuda") and _triton_usable(device)


def _device_present(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    # torch.cuda.is_available() asks the driver without initialising CUDA and is False without one.
    return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this install, fastest first (``auto`` picks the
    first); none on a device this machine does not have (``"cuda"`` without a GPU or driver)."""
    device = torch.device(device)
    if not _device_present(device):
        return []
    return [b for b in _PREFERENCE.get(device.type, ("reference",)) if _usable(b, device)]


def _missing_backend_message(backend: str, device: torch.device) -> str:
    if device.type == "meta":
        return (
            f"backend={backend!r} cannot run on meta tensors (shapes without data): use "
            "backend='auto', whose registered ops give the outputs' shapes"
            + ("" if C_IMPORT_ERROR is None else f" once snca_ext._C loads ({C_IMPORT_ERROR})")
        )
    if backend in ("cpu", "cuda") and C_IMPORT_ERROR is not None:
        return (
            f"backend={backend!r} needs the compiled extension snca_ext._C, which failed to load "
            f"({C_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .`"
        )
    if backend == "cuda" and device.type == "cuda":
        if not COMPILED_FOR["cuda"]:
            return (
                "backend='cuda' was not built into snca_ext._C (no CUDA toolkit, or no architecture >= "
                "sm_80 in TORCH_CUDA_ARCH_LIST, at build time); rebuild with nvcc"
            )
        return f"backend='cuda' cannot run on {device}: {_cuda_arch.device_unusable_reason(device)}"
    if backend == "triton":
        return (
            f"backend='triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1 for "
            f"CPU tensors); got a tensor on {device}"
        )
    return f"backend={backend!r} cannot run on tensors on {device}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on: ``backend`` if it can run on ``device`` (else a RuntimeError
    saying why), the first usable one for ``auto``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return next(b for b in _PREFERENCE.get(device.type, ("reference",)) if _usable(b, device))
    if not _usable(backend, device):
        raise RuntimeError(_missing_backend_message(backend, device))
    return backend


def kernel_op(name: str, backend: str):
    """The op ``name`` (``snca_forward``, ``bank_topk``) of ``backend`` (not the reference)."""
    if backend == "triton":
        from . import triton as _triton

        return getattr(_triton, name)
    return getattr(torch.ops.snca_ext, name)
