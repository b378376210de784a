"""Triton kernels of the fused SNCA op (filled in by the GPU backend work)."""

AVAILABLE = False
