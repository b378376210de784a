"""The Triton kernel compiled ahead of time for sm_90, without a GPU (gpu_checks/static_triton.py):
the default training configurations (fp32 features and bank, and autocast's bf16/fp16 features,
D = 128, forward with gradient) keep every value in registers, fit the opt-in shared memory and
run their products on tensor cores. ``python -m gpu_checks.static_triton`` checks every
configuration on every target."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from gpu_checks import static_triton
from snca_ext.triton import configs as triton_configs


def test_default_configurations_compile_for_sm90_without_spills():
    configs = [
        triton_configs.kernel_config(128, "fp32", bank, True, True, 0, "split") for bank in ("fp32", "bf16")
    ]
    for config, row in zip(configs, static_triton.triton_static_rows(configs, [90], jobs=2), strict=True):
        check_row(config, row)


def test_sixteen_bit_features_run_every_product_on_16_bit_tensor_cores():
    """Autocast's features (bf16 with a bf16 bank, fp16 with an fp32 bank, rounded at the load),
    D = 128 with the gradient: sm_90 multiplies on Hopper's warpgroup MMAs (HGMMA), sm_80 on
    HMMA.16816, and their multiply-adds cover every product of the tile once (scores and both
    weighted sums; the fp32 split takes 2 or 3), no FMA fallback, no spill."""
    configs = [
        triton_configs.kernel_config(128, features, bank, True, True, 0, "16bit", arch)
        for features, bank, arch in (("bf16", "bf16", 90), ("fp16", "fp32", 90), ("bf16", "bf16", 0))
    ]
    rows = static_triton.triton_static_rows(configs, [80, 90], jobs=2)
    # sm_90's tiles on sm_90 alone, the others on both.
    assert [(row["config"], row["target"]) for row in rows] == [
        (configs[0].name, "sm_90"),
        (configs[1].name, "sm_90"),
        (configs[2].name, "sm_80"),
        (configs[2].name, "sm_90"),
    ]
    for config, row in zip([configs[0], configs[1], configs[2], configs[2]], rows, strict=True):
        assert static_triton.fits(row), row
        kinds = row["mma_kinds"].split()
        assert all(kind.startswith("HGMMA." if config.arch == 90 else "HMMA.16816.") for kind in kinds), row
        assert all("TF32" not in kind for kind in kinds), row
        assert row["mma_macs_per_product"] >= 1.0, row


def test_wide_rows_with_gradient_compile_without_spills():
    """D > 128 with the gradient: the two [16, D] accumulators beside the split scores spilled at
    every tile shape (up to 376 bytes at sm_86); each program now keeps 128 of their columns. sm_80
    was the tightest target, sm_86 the tightest shared memory (99 KB) for the fp32 bank's tile."""
    config = triton_configs.kernel_config(256, "fp32", "fp32", True, True, 0, "split")
    assert config.grad_parts == 2
    for row in static_triton.triton_static_rows([config], [80, 86], jobs=2):
        assert static_triton.fits(row), row
        assert row["mma_per_tile"], row  # tensor cores, not FMAs


def test_split_and_tf32_score_tiles_issue_each_product_once():
    """8 warps split a [16, 32] score tile (4 m16n8 MMA tiles) and repeated its products: 4.0
    multiply-adds per product for the split's 3 (fp32 bank) with the gradient at D = 128, 3.0 for
    its 2 (bf16 bank) at D = 256, 1.333 for tf32's 1. 4 warps issue each product once; the split's
    D = 128 gradient takes them on sm_90 alone (its accumulators spilled on sm_80)."""
    cases = [
        (triton_configs.kernel_config(128, "fp32", "fp32", True, True, 0, "split", 90), 90, 3.0),
        (triton_configs.kernel_config(128, "fp32", "fp32", True, True, 0, "tf32"), 80, 1.0),
        (triton_configs.kernel_config(256, "fp32", "bf16", True, True, 0, "split"), 86, 2.0),
    ]
    assert [config.num_warps for config, _, _ in cases] == [4, 4, 4]
    assert triton_configs.kernel_config(128, "fp32", "fp32", True, True, 0, "split", 80).num_warps == 8
    for config, arch, macs in cases:
        (row,) = static_triton.triton_static_rows([config], [arch], jobs=1)
        assert static_triton.fits(row), row
        assert row["mma_macs_per_product"] == macs, row


def check_row(config, row):
    assert row["config"] == config.name and row["target"] == "sm_90"
    assert row["spills_bytes"] == 0, row
    assert row["shared_bytes"] <= static_triton.SHARED_LIMITS[90], row
    assert row["registers"] <= 255
    # Tensor cores: at least the m16n8k8 MMAs of one product of the tile (scores alone), not FMAs.
    one_product = (config.block_b // 16) * (config.block_n // 8) * (128 // 8)
    assert row["mma_per_tile"] and row["mma_per_tile"] >= one_product, row


def test_main_loop_counts_read_the_loop_with_mmas():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0030*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0040*/                   FADD R5, R5, R6 ;
        /*0050*/               @P0 BRA 0x40 ;
        /*0060*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0070*/               @!P0 BRA 0x10 ;
        /*0080*/                   EXIT ;
    """
    # The loop 0x10..0x70 (7 instructions, 2 MMAs) holds the inner loop 0x40..0x50.
    assert static_triton.main_loop_counts(sass) == (7, 2)
    # Two m16n8k8 MMAs in each of 8 warps.
    assert static_triton.mma_macs(static_triton.main_loop(sass), 8) == 2 * 16 * 8 * 8 * 8


def test_main_loop_leaves_out_the_divergent_copies_after_exit():
    """ptxas places the divergent-warp copy of the code around a warp shuffle (BRA.DIV's target,
    the SHFL a CALL) after the kernel's EXIT and branches back into the loop from there. That
    branch is no loop: its span (the EXIT and the copy with its MMAs) outgrew the tile loop on
    sm_80 and halved the MMAs counted (1.333 multiply-adds per product for the split's 2)."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0020*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0030*/                   BRA.DIV ~URZ, 0xa0 ;
        /*0040*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*0050*/                   FADD R5, R5, R6 ;
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
        /*0090*/                   NOP;
        /*00a0*/                   MOV R40, 0xc0 ;
        /*00b0*/                   CALL.REL.NOINC 0x100 ;
        /*00c0*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*00d0*/                   FADD R5, R5, R6 ;
        /*00e0*/                   BRA 0x50 ;
    """
    # The loop 0x10..0x60 (6 instructions, 2 MMAs), not the span 0x50..0xe0 (10, 1).
    assert static_triton.main_loop_counts(sass) == (6, 2)


def test_mma_macs_reads_each_shape():
    body = [
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # m16n8k16, one warp's
        "HGMMA.64x32x16.F32.BF16 R104, gdesc[UR12], RZ, !UPT",  # one warpgroup's (4 warps)
        "DMMA.884 R4, R8, R12, R4",
        "FFMA R5, R5, R6, R7",
    ]
    assert static_triton.mma_macs(body, 8) == 8 * 16 * 8 * 16 + 2 * 64 * 32 * 16 + 8 * 8 * 8 * 4


_LAUNCH_CHECK = """
import inspect
from triton.runtime.jit import JITFunction
from snca_ext.triton import kernel

checked = 0
for name, obj in vars(kernel).items():
    if not isinstance(obj, JITFunction) or obj.__module__ != kernel.__name__:
        continue
    obj.cache_key  # finds the globals it reads, as the first launch does
    for (global_name, _), (value, globals_dict) in obj.used_global_vals.items():
        # The comparison JITFunction.run makes before every launch.
        if globals_dict.get(global_name) != value:
            raise SystemExit(f"{name} reads the global {global_name} = {value!r}: every launch would fail")
    checked += 1
print("kernels checked:", checked)
"""


def test_globals_read_by_the_kernels_pass_tritons_launch_check():
    """Before every launch on a GPU, Triton compares each global a kernel reads with its value at
    compile time (``!=``) and refuses to run if they differ. A NaN global never equals itself: a
    kernel that read one compiled fine and failed every launch on the H200 (2026-11-30). The
    interpreter the suite uses without a GPU makes no such check, so a process without
    TRITON_INTERPRET (real JITFunctions, no GPU needed for this) makes it here."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split("kernels checked:")[1]) >= 3, done.stdout
