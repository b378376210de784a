"""The launcher of the Triton kernel (kernel.py): plans the grid, launches one streaming pass, and
combines the per-program partials.

Split-KV: B = 256 queries make only a handful of query blocks, far too few programs for a GPU,
so the bank is also cut into contiguous runs of tiles, one per program along the grid's second
axis (FlashAttention's split-KV decoding). Each program writes its partials (max, sum, weighted
sums, top-k candidates); a few torch ops combine them in split order, with no atomics, so the
result does not depend on scheduling.

Top-k: a running list of at most 128 per query lives in registers; a larger k (any k <= N) runs
in rounds, each a streaming pass that continues after the previous round's last (value, row).
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from .. import _autograd, combine
from . import configs
from .configs import DTYPE_NAMES, KernelConfig, kernel_config, topk_width
from .kernel import _snca_partials_kernel


class Plan:
    """The kernel configuration and bank split of one launch. The same code plans GPU and
    interpreter runs; only the number of programs to aim for comes from the device."""

    def __init__(self, config: KernelConfig, batch: int, bank_rows: int, device):
        self.config = config
        self.query_blocks = triton.cdiv(batch, config.block_b)
        num_tiles = triton.cdiv(bank_rows, config.block_n)
        # Aim for two waves of programs over the device; each split is a whole number of tiles.
        wanted_splits = triton.cdiv(2 * device_programs(device), self.query_blocks)
        splits = max(1, min(wanted_splits, num_tiles))
        self.tiles_per_split = triton.cdiv(num_tiles, splits)
        self.splits = triton.cdiv(num_tiles, self.tiles_per_split)

    @property
    def grid(self) -> tuple[int, int, int]:
        # Query blocks vary fastest, so the programs that read the same bank split run side by
        # side and share its tiles through L2.
        return (self.query_blocks, self.splits, self.config.grad_parts)


def device_programs(device: torch.device) -> int:
    """How many programs run at once: the SM count on a GPU. The interpreter runs programs one
    after another, so a few splits suffice there to exercise the combine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_arch(device: torch.device) -> int:
    """The device's SM version (90 for sm_90), which picks the 16-bit gradient tiles; 0 for the
    interpreter's CPU tensors."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def device_guard(device: torch.device):
    """Launch on the tensors' device (cuda:1 as well), not on the current one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def precision(features: Tensor) -> str:
    """The kernel's PRECISION for these features (kernel.py)."""
    if features.dtype == torch.float64:
        return "ieee"
    if features.dtype in (torch.bfloat16, torch.float16):
        # The features' dtype decides, as under autocast: one 16-bit MMA a product.
        return "16bit"
    # One tf32 product only where PyTorch itself is allowed TF32 matmuls; otherwise split
    # operands on tf32 tensor cores, at least as accurate as an fp32 matmul.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "split"


def order_keys(values: Tensor) -> Tensor:
    """The kernel's _order_key in torch: integers ordered as torch.topk orders the scores."""
    if values.dtype == torch.float64:
        int_dtype, flip, nan_key = torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF8000000000000
    else:
        int_dtype, flip, nan_key = torch.int32, 0x7FFFFFFF, 0x7FC00000
    values = torch.where(values == 0, torch.zeros_like(values), values)
    bits = values.view(int_dtype)
    keys = torch.where(bits < 0, bits ^ flip, bits)
    return torch.where(torch.isnan(values), torch.full_like(keys, nan_key), keys)


def launch(features, labels, own_rows, bank, bank_labels, temperature, with_lse, with_grad, k, cursor=None):
    """One streaming pass: per-split partials. ``cursor`` (keys, rows) restricts the top-k to the
    candidates ranked after it (a later round of a large k)."""
    batch, dim = features.shape
    bank_rows = bank.shape[0]
    width = topk_width(k)
    config = kernel_config(
        dim,
        DTYPE_NAMES[features.dtype],
        DTYPE_NAMES[bank.dtype],
        with_lse,
        with_grad,
        width,
        precision(features),
        device_arch(features.device),
    )
    plan = Plan(config, batch, bank_rows, features.device)
    acc_dtype = _autograd.accumulation_dtype(features.dtype)
    splits = plan.splits
    state_shape = (splits, batch) if with_lse else (0,)
    max_same = features.new_empty(state_shape, dtype=acc_dtype)
    sum_same = features.new_empty(state_shape, dtype=acc_dtype)
    max_other = features.new_empty(state_shape, dtype=acc_dtype)
    sum_other = features.new_empty(state_shape, dtype=acc_dtype)
    acc_shape = (splits, batch, dim) if with_grad else (0,)
    acc_same = features.new_empty(acc_shape, dtype=acc_dtype)
    acc_other = features.new_empty(acc_shape, dtype=acc_dtype)
    top_shape = (splits, batch, width) if k > 0 else (0,)
    top_values = features.new_empty(top_shape, dtype=acc_dtype)
    top_rows = features.new_empty(top_shape, dtype=torch.int32)
    if cursor is None:
        # The largest key: every candidate ranks after it.
        key_max = torch.iinfo(torch.int64 if features.dtype == torch.float64 else torch.int32).max
        cursor = (own_rows.new_full((batch,), key_max), own_rows.new_full((batch,), -1))
    cursor_keys = cursor[0].to(torch.int64 if features.dtype == torch.float64 else torch.int32)
    with device_guard(features.device):
        wrap_triton(_snca_partials_kernel)[plan.grid](
            features,
            features.stride(0),
            features.stride(1),
            labels,
            own_rows,
            bank,
            bank.stride(0),
            bank.stride(1),
            bank_labels,
            cursor_keys.contiguous(),
            cursor[1].to(torch.int32).contiguous(),
            max_same,
            sum_same,
            max_other,
            sum_other,
            acc_same,
            acc_other,
            top_values,
            top_rows,
            batch,
            bank_rows,
            dim,
            features.new_full((1,), 1.0 / temperature, dtype=acc_dtype),
            plan.tiles_per_split,
            **config.constexprs(),
            **config.launch_options(),
        )
    return (max_same, sum_same, max_other, sum_other, acc_same, acc_other, top_values, top_rows)


def combine_groups(max_same, sum_same, max_other, sum_other, acc_same, acc_other, with_grad):
    """(lse_same, lse_other, wmean_same, wmean_other) from the per-split partials, both groups in
    one exact combine (snca_ext/combine.py)."""
    part_acc = torch.stack([acc_same, acc_other], dim=1) if with_grad else None
    reduce_max, reduce_sum = combine.local_reduce(0)
    lse, wmean = combine.combine_lse(
        torch.stack([max_same, max_other], dim=1),
        torch.stack([sum_same, sum_other], dim=1),
        part_acc,
        reduce_max=reduce_max,
        reduce_sum=reduce_sum,
    )
    # Separate tensors: a custom op's outputs may not alias one another.
    if wmean is None:
        return lse[0].clone(), lse[1].clone(), None, None
    # The gradient of a NaN or +inf log-sum-exp is NaN (the contract of snca_ext/reference.py).
    wmean = torch.where((torch.isnan(lse) | torch.isposinf(lse))[..., None], torch.nan, wmean)
    return lse[0].clone(), lse[1].clone(), wmean[0].clone(), wmean[1].clone()


def merge_split_topk(top_values: Tensor, top_rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of every split's candidates; the kernel's empty slots (rows < 0) become -1."""
    batch = top_values.shape[1]
    values = top_values.permute(1, 0, 2).reshape(batch, -1)
    rows = top_rows.permute(1, 0, 2).reshape(batch, -1).long()
    rows = torch.where(rows < 0, torch.full_like(rows, -1), rows)
    return combine.merge_topk(values, rows, k)


def topk_rounds(queries, exclude, bank, k):
    """The k best rows of every query, in rounds of at most the widest top-k width: each round is
    one streaming pass that takes the next candidates after the previous round's last (value,
    row). Every round launches the same compiled kernel (the same tile shape and products), so a
    pair's score is bit-identical in every round, which the cursor comparison relies on."""
    width = configs.TOPK_WIDTHS[-1]
    launch_k = min(k, width)
    values, rows = [], []
    cursor = None
    found = 0
    while found < k:
        take = min(width, k - found)
        *_, part_values, part_rows = launch(
            queries, exclude, exclude, bank, exclude, 1.0, False, False, launch_k, cursor
        )
        round_values, round_rows = merge_split_topk(part_values, part_rows, take)
        values.append(round_values)
        rows.append(round_rows)
        found += take
        # The last kept (value, row) is where the next round starts; a padded round (row -1) has
        # run out of candidates, and the EMPTY cursor key lets nothing through afterwards.
        last_keys = order_keys(round_values[:, -1])
        empty = torch.iinfo(last_keys.dtype).min
        last_keys = torch.where(round_rows[:, -1] < 0, torch.full_like(last_keys, empty), last_keys)
        cursor = (last_keys, round_rows[:, -1])
    return torch.cat(values, dim=1), torch.cat(rows, dim=1)
