"""The configurations of the Triton kernel (kernel.py): which compiled kernel (constexprs, tile
shape, warps, pipeline stages) a launch takes, and the list of every one the launcher can choose,
which gpu_checks/static_triton.py compiles ahead of time for sm_80/86/89/90 to check registers,
spills and shared memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

# Widths of the running top-k the kernel is compiled with. A larger k runs in rounds of the
# largest width, each a streaming pass that continues after the previous round's last (value,
# row): registers bound the per-query list, never the k the API accepts (k <= N).
TOPK_WIDTHS = (32, 128)
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelConfig:
    """Everything that selects one compiled kernel: its constexprs and launch options."""

    features: str  # "fp32", "fp64", "bf16" or "fp16"
    bank: str  # "fp32", "bf16", "fp16" or "fp64"
    with_lse: bool
    with_grad: bool
    topk: int  # width of the running top-k, 0 for none
    precision: str  # "split", "tf32", "16bit" or "ieee"
    block_b: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    grad_d: int = 0  # columns of the weighted sums per program; 0: all of block_d
    arch: int = 0  # the one target it is for (90: warpgroup-MMA tiles), 0 for every target

    @property
    def name(self) -> str:
        mode = ("lse+grad" if self.with_grad else "lse") if self.with_lse else "topk"
        if self.with_lse and self.topk:
            mode += "+topk"
        grad_columns = f" g{self.grad_d}" if self.grad_d else ""
        target = f" sm_{self.arch} only" if self.arch else ""
        return (
            f"{self.features}/{self.bank} {mode} k{self.topk} {self.precision} "
            f"{self.block_b}x{self.block_n}x{self.block_d}{grad_columns} w{self.num_warps} s{self.num_stages}"
            f"{target}"
        )

    @property
    def grad_parts(self) -> int:
        """Programs along the grid's third axis, each accumulating grad_d columns."""
        return self.block_d // self.grad_d if self.grad_d else 1

    def launch_options(self) -> dict:
        # maxnreg: left to itself ptxas sometimes caps a kernel at 128 registers and spills;
        # the explicit 255 (the most a thread may have at 8 warps) lets it keep every value.
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "maxnreg": 255}

    def constexprs(self) -> dict:
        return {
            "WITH_LSE": self.with_lse,
            "WITH_GRAD": self.with_grad,
            "TOPK": self.topk,
            "USE_FP64": self.features == "fp64",
            "PRECISION": self.precision,
            "BANK_EXACT": self.bank in ("bf16", "fp16"),
            "BLOCK_B": self.block_b,
            "BLOCK_N": self.block_n,
            "BLOCK_D": self.block_d,
            "GRAD_D": self.grad_d or self.block_d,
        }


def topk_width(k: int) -> int:
    """The running top-k width for a request of k (a round's share when k exceeds every width)."""
    return next((width for width in TOPK_WIDTHS if k <= width), TOPK_WIDTHS[-1]) if k > 0 else 0


def kernel_config(
    dim: int,
    features: str,
    bank: str,
    with_lse: bool,
    with_grad: bool,
    topk: int,
    precision: str,
    arch: int = 0,
) -> KernelConfig:
    """The tile shape of one launch. Every configuration fits the opt-in shared memory of the
    targets it is for without spills (checked ahead of time for each of sm_80/86/89/90 by
    gpu_checks/static_triton.py and tests/test_triton_static.py). The device enters only through
    ``arch`` (its SM version; 0 for the interpreter), and only for the gradient tiles of the
    16-bit features and of the split at D = 128."""
    # tl.dot needs every side >= 16; narrow rows are padded to 64 columns, a few wasted MMAs
    # against one compiled kernel fewer per width.
    block_d = max(64, triton.next_power_of_2(dim))
    if precision == "16bit":
        return _config_16bit(block_d, features, bank, with_lse, with_grad, topk, arch)
    wide_bank = bank in ("fp32", "fp64")  # 4 or 8 bytes a value, and split into two parts (fp32)
    # Register budget (255 a thread at 8 warps): the split queries, two [BLOCK_B, D] gradient
    # accumulators or the log-sum-exp state beside a running top-k, and the bank tile's split
    # parts as MMA fragments. Those configurations take 16 queries a program; the gradient beside
    # a wide bank or a 128-wide top-k also halves the tile. At D > 128 the gradient's two
    # [16, D] accumulators do not fit beside the scores (ptxas spilled whatever the tile): each
    # program keeps 128 of their columns, the scores computed once per 128 columns, and a wide
    # bank's tile is quartered to fit the 99 KB of shared memory of sm_86/89.
    wide_rows = block_d > 128
    if with_grad or features == "fp64" or topk > 32 or (with_lse and topk > 0) or wide_rows:
        block_b = 16
    else:
        block_b = 32
    if wide_rows:
        block_n = 16 if with_grad and wide_bank else 32
    else:
        block_n = 32 if with_grad and (wide_bank or topk > 32) else 64
    grad_d = 128 if with_grad and wide_rows else 0
    # fp64 values take two registers each: 8 warps share them even at D = 64.
    num_warps = 8 if block_d >= 128 or features == "fp64" else 4
    # 8 warps split a [16, 32] score tile (4 m16n8 mma.sync tiles) or a [16, 16] one (2), the
    # spare warps repeating its products: 4.0 multiply-adds per product for the split's 3 (fp32
    # bank) at D = 128, 6.0 at D = 256, 7.5 for the [16, 16] tile (4.5 at 4 warps; 2 spilled on
    # sm_80). 4 warps, as _config_16bit's [<= 32, 32] tiles; except the split with the gradient
    # at D = 128, whose two [16, 128] accumulators then spilled (sm_80; beside a top-k and an fp32
    # bank every target; 16 x 64 tiles at 8 warps as well): there only sm_90 takes 4 warps, where
    # no top-k sits beside an fp32 bank.
    score_tiles = (block_b // 16) * (block_n // 8)
    split_grad = precision == "split" and with_grad and block_d == 128
    hopper = arch == 90 and split_grad and score_tiles < 8 and (topk == 0 or not wide_bank)
    if features != "fp64" and score_tiles < 8 and (not split_grad or hopper):
        num_warps = 4
    # Pipelined bank tiles in shared memory: two stages for wide banks and rows, three otherwise;
    # one for fp64 at D > 128 with the gradient (two took 102,656 bytes, 1,280 over sm_86/89's).
    if features == "fp64" and grad_d:
        num_stages = 1
    else:
        num_stages = 2 if wide_bank or wide_rows else 3
    return KernelConfig(
        features,
        bank,
        with_lse,
        with_grad,
        topk,
        precision,
        block_b,
        block_n,
        block_d,
        num_warps,
        num_stages,
        grad_d,
        90 if hopper else 0,
    )


def _config_16bit(
    block_d: int, features: str, bank: str, with_lse: bool, with_grad: bool, topk: int, arch: int
) -> KernelConfig:
    """The tile shape for bf16/fp16 features: one 16-bit MMA a product, so no split parts in
    registers and half the bytes per operand, which buys more queries a program (each bank tile
    read from L2 serves them all). The limits are sm_80/86's (mma.sync, 255 registers a thread
    at 8 warps, 99 KB of shared memory on sm_86/89); sm_90 runs the same tiles. With the
    gradient, the two [BLOCK_B, D] fp32 accumulators beside the scores spilled at 64 queries by
    64 or 32 rows and at 128 by 32 (sm_80 and sm_86): 32 queries by 64 rows keep every value.
    A running top-k keeps [BLOCK_B, TOPK] keys and rows beside the scores: 16 queries, as fp32.

    sm_90 runs those tiles on mma.sync; its warpgroup MMA (wgmma) needs 64 queries per warpgroup,
    and Triton gives the scores that feed the weighted sums all the warps along the queries. So
    the gradient at D <= 128 on sm_90 takes 128 queries by 32 rows at 8 warps (two warpgroups):
    no spill there (its accumulators live in the wgmma layout), half the warp-instructions per
    score of the 32 x 64 tile (2.4 against 5.0 at D = 128); on sm_80/86 the same tile spilled."""
    wide_rows = block_d > 128
    # sm_90 exactly: sm_100 and sm_120 have other MMAs and budgets, which nothing here checked.
    hopper_grad = arch == 90 and with_grad and not topk and not wide_rows
    if topk:
        block_b = 16
    elif hopper_grad:
        block_b = 128
    elif with_grad:
        block_b = 32
    else:
        block_b = 64
    # The bank tile as loaded (4 bytes a value for an fp32 bank, rounded after the load) in each
    # pipeline stage: at D = 256 a 64-row fp32 tile (64 KB) would leave no room for two stages
    # within the 99 KB of sm_86/89.
    block_n = 32 if (wide_rows and bank == "fp32") or hopper_grad else 64
    grad_d = 128 if with_grad and wide_rows else 0
    # 8 warps split a [<= 32, 32] score tile into fewer mma.sync tiles than warps: the spare
    # warps repeated the products (1.5 to 2 multiply-adds per product at D = 256); 4 do not.
    if block_n == 32 and block_b <= 32:
        num_warps = 4
    else:
        num_warps = 8 if with_grad or block_d >= 128 else 4
    num_stages = 2 if wide_rows else 3
    return KernelConfig(
        features,
        bank,
        with_lse,
        with_grad,
        topk,
        "16bit",
        block_b,
        block_n,
        block_d,
        num_warps,
        num_stages,
        grad_d,
        90 if hopper_grad else 0,
    )


def fuses_topk(dim: int, features: str, with_grad: bool, k: int) -> bool:
    """Whether snca_forward's top-k of k rides on its log-sum-exp pass (else it takes rounds of its
    own after it): k fits one running list, and the list fits beside the gradient's accumulators
    (not at D > 128, whose programs each hold a part of them, nor in fp64: both spilled)."""
    return 0 < k <= TOPK_WIDTHS[-1] and not (with_grad and (dim > 128 or features == "fp64"))


def launch_configs(max_dim: int = 256) -> list[KernelConfig]:
    """Every configuration the launcher can choose for D <= max_dim, on any target."""
    configs = []
    dims = [64 << i for i in range(max(0, (max_dim // 64).bit_length()))]
    banks = ("fp32", "bf16", "fp16")
    pairs = [("fp32", bank, precision) for bank in banks for precision in ("split", "tf32")]
    pairs.append(("fp64", "fp64", "ieee"))
    pairs += [(features, bank, "16bit") for features in ("bf16", "fp16") for bank in banks]
    for dim in dims:
        for features, bank, precision in pairs:
            for with_grad in (False, True):
                for topk in (0, *TOPK_WIDTHS):
                    if topk == 0 or fuses_topk(dim, features, with_grad, topk):
                        for arch in (0, 90):
                            configs.append(
                                kernel_config(dim, features, bank, True, with_grad, topk, precision, arch)
                            )
            for topk in TOPK_WIDTHS:
                configs.append(kernel_config(dim, features, bank, False, False, topk, precision))
    return list(dict.fromkeys(configs))
