"""Triton kernels of the fused SNCA op: ``snca_forward`` and ``bank_topk`` (csrc/ops.cpp schemas),
registered as ``snca_ext::snca_forward_triton`` and ``snca_ext::bank_topk_triton``.

kernel.py holds the @triton.jit kernel, configs.py the configurations it is compiled with,
launch.py the launch plan and the combine of the partials, registration.py the ops. They run on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them on a
machine without a GPU); the variable must be set before this package is imported.
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

if AVAILABLE:
    from .registration import bank_topk, snca_forward
else:

    def snca_forward(features, labels, indices, bank, bank_labels, temperature, with_grad, k):
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")

    def bank_topk(queries, bank, k, exclude):
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")


__all__ = ["AVAILABLE", "bank_topk", "snca_forward"]
