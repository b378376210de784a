"""The Triton kernel compiled ahead of time for sm_90, without a GPU (benchmarks/static_triton.py):
the default training configuration (fp32 features and bank, D = 128, forward with gradient) keeps
every value in registers, fits the opt-in shared memory and runs its products on tensor cores.
``python -m benchmarks.static_triton`` checks every configuration on every target."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from benchmarks import static_triton
from snca_ext.triton import snca_triton as kernels


def test_default_configurations_compile_for_sm90_without_spills():
    configs = [kernels.kernel_config(128, "fp32", bank, True, True, 0, "split") for bank in ("fp32", "bf16")]
    for config, row in zip(configs, static_triton.triton_static_rows(configs, [90], jobs=2), strict=True):
        check_row(config, row)


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
