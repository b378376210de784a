"""Benchmarks of the fused SNCA op against plain PyTorch and the libraries users would pick instead.

Run with ``pytest benchmarks --benchmark-only`` (``--full-sizes`` or ``SNCA_BENCH_FULL=1`` for the
CIFAR/ImageNet sizes) and turn the saved JSON into ``benchmarks/RESULTS.md`` with
``python -m benchmarks.report``.
"""
