"""Checks of the GPU kernels: what their compiled code says without a GPU (static_report.py for
the CUDA kernels, static_triton.py for the Triton ones) and what a lent GPU shows (gpu_check.sh:
the build, the tensor-core rounding probe, the edge shapes under compute-sanitizer, the timing
table against the peers, ncu, the GPU tests). The timings of the pytest-benchmark suite are in
benchmarks/, the accuracy experiments in experiments/."""
