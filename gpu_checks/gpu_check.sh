#!/usr/bin/env bash
# The one GPU check for a session lent a GPU: run from anywhere, it works in the repo root and
# writes nothing outside the repo except /tmp (and $OUT, when the device tool sets it).
#
#   bash gpu_checks/gpu_check.sh
#
# Steps, each time-boxed so the whole stays under about 9 minutes (7 before the peers' compiles;
# a step that fails is reported, the next one still runs; the exit status is non-zero if any step
# failed):
#   1. build snca_ext._C for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from the device)
#   2. tensor-core rounding probe: raw inner products against float64, mean error times the sign
#      of the true value, for TF32 and bf16 MMAs and for the cuda backend's own scores
#      (gpu_checks/tc_rounding_probe.py); the kernel's design holds under RN and RZ
#      (tests/test_cuda_emulation.py), this says which one the hardware does
#   3. edge shapes against the float64 reference under compute-sanitizer memcheck, racecheck,
#      synccheck and initcheck, on tiny launches (gpu_checks/edge_shapes.py); the same run checks
#      the non-finite contract shared by every backend (per group: NaN if a score is NaN, +inf if
#      one is +inf, -inf scores contribute nothing; NaN first in the top-k, ties to the lower row),
#      the streaming top-k at k = 300 and 1024, the small-GPU configuration (SNCA_EXT_SMEM_OPTIN)
#      and the TF32 mode
#   4. timings (gpu_checks/gpu_table.py): forward, forward+grad, top-k k = 30 and 1024, bf16
#      features under autocast, fp32 and bf16 banks, TF32 off and on, cuda / triton against the
#      peers (two FlexAttention calls, torch.compile of the original, plain PyTorch), an unmasked
#      SDPA call and a same-size matmul for calibration; every row checked before it is timed
#   5. ncu counters of one forward+grad launch, if ncu is installed
#   6. the tests that run the kernels (tests/test_ops.py and the other op tests, which add the
#      (backend, "cuda") cases when a GPU is visible) with what is left of the 7 minutes; no -x.
#      The application tests need no GPU and run in CI.
set -u -o pipefail
cd "$(dirname "$0")/.."
# The extension is built in place, not installed: every script and the tests import it from here.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG_DIR=${OUT:-/tmp/snca_gpu_check}
mkdir -p "$LOG_DIR"
failed=()
step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s in)"; }

step "environment"
python3 --version
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || echo "nvidia-smi: not available"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"

step "build (this GPU's architecture only)"
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} SNCA_EXT_BUILD_CUDA=1
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
# torch finds nvcc through PATH; point CUDA_HOME at the toolkit folder so that -lcudart resolves.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if timeout 240 python3 setup.py build_ext --inplace >"$LOG_DIR/build.log" 2>&1; then
  grep -E "\[snca_ext\]" "$LOG_DIR/build.log"
  grep -iE "warning" "$LOG_DIR/build.log" | grep -v "^Remark" | head -20
  echo "build ok in ${SECONDS}s"
else
  tail -40 "$LOG_DIR/build.log"
  echo "BUILD FAILED (log: $LOG_DIR/build.log)"
  exit 1
fi
python3 - <<'EOF' || failed+=("import")
import torch, snca_ext
print("compiled for:", torch.ops.snca_ext._cuda_archs(), "| backends on cuda:", snca_ext.available_backends("cuda"))
assert torch._C._dispatch_has_kernel_for_dispatch_key("snca_ext::snca_forward", "CUDA"), "no CUDA kernel registered"
assert "cuda" in snca_ext.available_backends("cuda"), "auto would not pick the cuda backend on this GPU"
EOF

step "tensor-core rounding probe"
timeout 60 python3 gpu_checks/tc_rounding_probe.py 2>&1 | tee "$LOG_DIR/rounding_probe.txt" || failed+=("probe")

step "edge shapes vs reference (plain run, then compute-sanitizer)"
timeout 90 python3 gpu_checks/edge_shapes.py 2>&1 | tail -20 || failed+=("edge shapes")
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    echo "--- $tool"
    timeout 40 "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python3 gpu_checks/edge_shapes.py --finite-only --tiny 2>&1 | tail -8 || failed+=("$tool")
  done
else
  echo "compute-sanitizer: not found, sanitizer runs skipped"
fi

step "timings"
# The peers compile on their first call (torch.compile of FlexAttention and of the original code),
# so the table gets up to 150 s; its cases run most important first (ImageNet size under
# autocast) and rows past the budget are listed as skipped; the timeout leaves room for one row
# (a compile) that starts just before the budget ends. SNCA_GPU_TABLE_BUDGET=<seconds> overrides.
budget=$((330 - SECONDS))
[ "$budget" -lt 90 ] && budget=90
[ "$budget" -gt 150 ] && budget=150
budget=${SNCA_GPU_TABLE_BUDGET:-$budget}
timeout $((budget + 90)) python3 gpu_checks/gpu_table.py --budget "$budget" --out "$LOG_DIR/gpu_table.md" \
  || failed+=("timings")

step "ncu counters (one forward+grad launch)"
if command -v ncu >/dev/null 2>&1; then
  # --clock-control none: ncu would otherwise lock the clocks to base while it profiles, and the
  # GPU's settings are left alone.
  timeout 60 ncu --clock-control none --kernel-name regex:lse_partial_kernel --launch-count 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy python3 gpu_checks/gpu_table.py --one-launch 2>&1 \
    | tail -60 || failed+=("ncu")
else
  echo "ncu: not found, skipped"
fi

step "tests on the GPU"
# What is left of the 7 minutes, but never less than 2 (Triton compiles each kernel once). With
# pytest-xdist a test that crashes its process (a segfault) is reported by name and the others run.
left=$((400 - SECONDS))
[ "$left" -lt 120 ] && left=120
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 4)
timeout "$left" python3 -m pytest -q -p no:cacheprovider -rfE --durations=5 "${parallel[@]}" \
  tests/test_ops.py tests/test_triton.py tests/test_nonfinite.py tests/test_op_errors.py \
  tests/test_double_backward.py tests/test_memory.py tests/test_knn.py tests/test_combine.py \
  tests/test_op_memory.py tests/test_cuda_arch.py >"$LOG_DIR/tests.txt" 2>&1 || failed+=("tests")
tail -60 "$LOG_DIR/tests.txt"

# A crashed test again, alone under cuda-gdb (it debugs host code too): the C++ backtrace.
crashed=$(grep -oE "crashed while running '[^']+'" "$LOG_DIR/tests.txt" | head -1 | cut -d"'" -f2)
if [ -n "$crashed" ] && command -v cuda-gdb >/dev/null 2>&1; then
  step "backtrace of the crashed test $crashed"
  timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary snca" \
    --args python3 -m pytest -q -p no:cacheprovider "$crashed" 2>&1 | grep -vE "^\[(New|Thread)" | tail -50
fi

step "done in ${SECONDS}s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
