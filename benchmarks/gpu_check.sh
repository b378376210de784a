#!/usr/bin/env bash
# The one GPU check for a session lent a GPU (an H200): run from anywhere, it works in the repo
# root and writes nothing outside the repo except /tmp (and $OUT, when the device tool sets it).
#
#   bash benchmarks/gpu_check.sh
#
# Steps, each time-boxed so the whole stays under about 8 minutes:
#   1. build snca_ext._C with the CUDA kernels for sm_90 (TORCH_CUDA_ARCH_LIST=9.0)
#   2. the test suite on the GPU (python3 -m pytest -x -q tests)
#   3. compute-sanitizer memcheck on a small CUDA smoke run, if compute-sanitizer is there
#   4. the benchmark table (benchmarks/gpu_table.py): cuda / triton / plain PyTorch
# A failing step is reported and the next one still runs; the exit status is non-zero if any
# step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG_DIR=${OUT:-/tmp/snca_gpu_check}
mkdir -p "$LOG_DIR"
failed=()
step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s in)"; }

step "environment"
python3 --version
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"

step "build (sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SNCA_EXT_BUILD_CUDA=1
# torch finds nvcc through PATH; point CUDA_HOME at the toolkit folder so that -lcudart resolves.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if timeout 240 python3 setup.py build_ext --inplace >"$LOG_DIR/build.log" 2>&1; then
  grep -iE "warning" "$LOG_DIR/build.log" | grep -v "^Remark" | head -20
  echo "build ok in ${SECONDS}s"
else
  tail -40 "$LOG_DIR/build.log"
  echo "BUILD FAILED (log: $LOG_DIR/build.log)"
  exit 1
fi
python3 - <<'EOF' || failed+=("import")
import torch, snca_ext
print("backends on cuda:", snca_ext.available_backends("cuda"))
assert torch._C._dispatch_has_kernel_for_dispatch_key("snca_ext::snca_forward", "CUDA"), "no CUDA kernel registered"
EOF

step "tests on the GPU"
timeout 180 python3 -m pytest -x -q tests 2>&1 | tail -40 || failed+=("tests")

step "compute-sanitizer memcheck (smoke run)"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$sanitizer" ]; then
  timeout 120 "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 \
    python3 benchmarks/gpu_table.py --smoke 2>&1 | tail -30 || failed+=("memcheck")
else
  echo "compute-sanitizer: not found, plain smoke run instead"
  timeout 60 python3 benchmarks/gpu_table.py --smoke 2>&1 | tail -30 || failed+=("smoke")
fi

step "benchmark table"
budget=$((450 - SECONDS))
[ "$budget" -lt 60 ] && budget=60
timeout $((budget + 60)) python3 benchmarks/gpu_table.py --budget "$budget" --out "$LOG_DIR/gpu_table.md" \
  || failed+=("benchmark")

step "done in ${SECONDS}s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
