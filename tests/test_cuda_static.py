"""The static targets of the GPU kernels, checked without a GPU (gpu_checks/static_report.py does
the full report): every configuration the CUDA kernels can choose fits every architecture's opt-in
shared memory, the built kernels do not spill, and the report's main-loop count reads SASS right."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from gpu_checks import static_report as sr
from snca_ext import backends

needs_c = pytest.mark.skipif(backends.C_IMPORT_ERROR is not None, reason="snca_ext._C not built")


LOW = (torch.bfloat16, torch.float16)


@needs_c
@pytest.mark.parametrize("arch", sorted(sr.OPTIN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_every_configuration_fits_every_architecture(arch, dtype):
    for dim in (1, 31, 32, 63, 64, 65, 100, 127, 128, 129, 256, 1000):
        tc, dp, _, lse_smem, topk_smem, fits, stages = torch.ops.snca_ext._cuda_tile_config(
            dim, dtype, sr.OPTIN[arch]
        )
        assert fits and max(lse_smem, topk_smem) <= sr.OPTIN[arch], (arch, dtype, dim, lse_smem, topk_smem)
        assert bool(tc) == (dtype != torch.float64 and dim <= 128)
        # The 16-bit engine: bf16/fp16 features at D <= 128 (beyond, the op upcasts them to fp32).
        assert (stages > 0) == (dtype in LOW and dim <= 128)
        if tc:
            assert dp == (64 if dim <= 64 else 128)


@needs_c
def test_the_queries_leave_shared_memory_only_where_they_do_not_fit():
    config = {
        arch: torch.ops.snca_ext._cuda_tile_config(128, torch.float32, optin)
        for arch, optin in sr.OPTIN.items()
    }
    assert [config[a][2] for a in (80, 86, 89, 90)] == [1, 0, 0, 1]  # 138,624 bytes > 101,376 on sm_86/89
    with pytest.raises(RuntimeError, match="features_dtype must be float32, float64, bfloat16 or float16"):
        torch.ops.snca_ext._cuda_tile_config(128, torch.int32, 101376)


@needs_c
@pytest.mark.parametrize("dtype", LOW)
def test_the_16bit_pipeline_has_three_stages_where_they_fit(dtype):
    """3 bank tiles in flight at D = 128 on sm_80/sm_90 (108,416 bytes), 2 on sm_86/89 (90,496)."""
    config = {
        arch: torch.ops.snca_ext._cuda_tile_config(128, dtype, optin) for arch, optin in sr.OPTIN.items()
    }
    assert [config[a][6] for a in (80, 86, 89, 90)] == [3, 2, 2, 3]
    assert [config[a][3] for a in (80, 86, 90)] == [108_416, 90_496, 108_416]


def _have(tool: str) -> str | None:
    try:
        return sr._tool(tool)
    except FileNotFoundError:
        return None


# Known and reported in benchmarks/RESULTS.md: the generic (fp64, D > 128) top-k kernels keep a few
# bytes live across the warp-synchronisation subroutine calls ptxas emits there.
STACK_ALLOWED = {("topk_partial_kernel", "GenericEngine"): 8}


@pytest.mark.skipif(not backends.COMPILED_FOR["cuda"], reason="snca_ext._C built without the CUDA kernels")
@pytest.mark.skipif(_have("cuobjdump") is None, reason="no cuobjdump")
def test_the_built_kernels_do_not_spill():
    """A kernel that spills (or keeps an array in local memory) has a stack frame: none may, but
    for the allowance above."""
    from snca_ext import _C

    text = subprocess.run(
        [_have("cuobjdump"), "-res-usage", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    kernels = 0
    function = None
    for line in text.splitlines():
        if "Function " in line:
            function = line.split("Function ")[1].rstrip(":")
        elif "REG:" in line and function and "snca_ext" in function:
            kernels += 1
            usage = dict(field.split(":", 1) for field in line.split() if ":" in field)
            allowed = max(
                (v for (k, e), v in STACK_ALLOWED.items() if k in function and e in function), default=0
            )
            assert int(usage["STACK"]) <= allowed and usage["LOCAL"] == "0", (function, line.strip())
    assert kernels >= 20  # every engine of both ops, for every built architecture


@pytest.mark.skipif(not backends.COMPILED_FOR["cuda"], reason="snca_ext._C built without the CUDA kernels")
@pytest.mark.skipif(_have("cuobjdump") is None or _have("nvdisasm") is None, reason="no cuobjdump/nvdisasm")
def test_the_built_main_loop_meets_its_target(tmp_path):
    """The lse kernels of the forward with gradient at D = 128, per 64 x 64 tile per warp in every
    built architecture: at most TARGET_INSTRUCTIONS warp-instructions for fp32 features / bf16 bank
    (the TF32 engine), at most TARGET_INSTRUCTIONS16 for bf16 / bf16 (the 16-bit engine), and every
    configuration auto can choose there fits and does not spill (the report's hard targets)."""
    from snca_ext import _C

    built = sr.extract_so(Path(_C.__file__), tmp_path)
    targets = [arch for arch in sorted(sr.OPTIN) if arch in built]
    assert targets, built
    _, failures, speed = sr.report(targets, tmp_path, built, triton=False)
    assert not failures, failures
    counts = {
        (line.split()[0], line.split()[1]): int(line.split(": ")[1].split()[0]) for line in speed
    }  # (arch, features) -> warp-instructions
    assert len(counts) == 2 * len(targets), speed
    assert max(v for (_, f), v in counts.items() if f == "fp32") <= sr.TARGET_INSTRUCTIONS, speed
    assert max(v for (_, f), v in counts.items() if f == "bf16") <= sr.TARGET_INSTRUCTIONS16, speed
    # The profile by source line (--profile) reads the same loop: its headline is the count above,
    # its lines hold the MMAs where the engine issues them.
    arch = max(targets)
    text = sr.profile(arch, tmp_path, built, "bf16")
    assert f"{counts[(f'sm_{arch}', 'bf16')]} warp-instructions per 64 x 64 tile" in text, text
    assert "engine_mma16.cuh" in text.split("HMMA")[0].splitlines()[-1], text


SMALL_KERNEL = r"""
#include <mma.h>
using namespace nvcuda;
constexpr int kCols = 64;
__global__ void tiles(const float* q, const float* m, float* out, int num_tiles) {
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
  wmma::fill_fragment(c, 0.0f);
  for (int tile = 0; tile < num_tiles; ++tile) {
#pragma unroll 1
    for (int kk = 0; kk < kCols; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
      wmma::load_matrix_sync(a, q + kk, kCols);
      wmma::load_matrix_sync(b, m + tile * 16 * kCols + kk, kCols);
      wmma::mma_sync(c, a, b, c);
    }
  }
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}
"""


@pytest.mark.skipif(_have("nvcc") is None or _have("nvdisasm") is None, reason="no nvcc/nvdisasm")
def test_the_tile_loop_count_reads_trip_counts_from_the_source(tmp_path):
    source = tmp_path / "tiles.cu"
    source.write_text(SMALL_KERNEL)
    cubin = tmp_path / "tiles.cubin"
    build = [sr._tool("nvcc"), "-O3", "-lineinfo", "-arch=sm_80", "-cubin", "-Xptxas", "-v", "-o", str(cubin)]
    result = subprocess.run([*build, str(source)], capture_output=True, text=True, check=True)
    entry = next(iter(sr.parse_ptxas(result.stderr).values()))
    assert entry.registers > 0 and entry.spill_stores == 0
    text = subprocess.run(
        [sr._tool("nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True, check=True
    )
    (fn,) = sr.parse_nvdisasm(text.stdout).values()
    count = sr.tile_loop_count(fn, dp=64)
    # 8 k-steps of one WMMA m16n16k8 TF32 (4 HMMA.1684 each) per tile; the inner loop's body
    # counted 8 times, so the tile is at least 8 times the MMAs plus its loads.
    assert count.mma == 8 * 4
    assert count.inner_loops == 1 and count.rare_loops == 0
    assert count.instructions > 8 * 4 + 8 * 2
    # The same loop by source line: every instruction counted once, with its inner loop's trips.
    rows = sr.tile_loop_profile(fn, dp=64)
    assert sum(r.count for r in rows) == count.instructions
    assert sum(r.opcodes.get("HMMA", 0) for r in rows) == count.mma
    assert any(r.file and Path(r.file).name == "tiles.cu" for r in rows), rows  # lines from -lineinfo
