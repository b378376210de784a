"""The argument checks of the fused ops, shared by the functions and the modules built on them: each
error names the argument (TypeError for a wrong type or dtype, ValueError for a wrong value or
shape)."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

# bfloat16/float16 features reach the fused kernels as they are: the GPU backends compute their
# products on 16-bit tensor cores with float32 accumulation (as a matmul under torch.autocast
# does), the CPU in float32; the reference computes them in float32 (ops._in_accumulation_dtype).
FEATURE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_index_tensor(value, name: str, length: int, length_name: str) -> Tensor:
    value = check_tensor(value, name)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(
            f"{name} must be 1-D with {length_name}={length} entries, got shape {tuple(value.shape)}"
        )
    return value.long()


def check_features_and_bank(features, bank, features_name: str) -> None:
    features = check_tensor(features, features_name)
    bank = check_tensor(bank, "bank")
    if features.dim() != 2:
        raise ValueError(f"{features_name} must be 2-D [B, D], got shape {tuple(features.shape)}")
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(
            f"{features_name} must be float32, float64, bfloat16 or float16, got {features.dtype}"
        )
    if bank.dim() != 2:
        raise ValueError(f"bank must be 2-D [N, D], got shape {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank must have at least one row, got an empty bank")
    if bank.shape[1] != features.shape[1]:
        raise ValueError(
            f"bank must have D={features.shape[1]} columns like {features_name}, got {bank.shape[1]}"
        )
    allowed = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.float64: (torch.float64,)}
    allowed[torch.bfloat16] = allowed[torch.float16] = allowed[torch.float32]
    if bank.dtype not in allowed[features.dtype]:
        raise TypeError(
            f"bank dtype {bank.dtype} does not go with {features_name} dtype {features.dtype}: "
            f"expected one of {[str(d) for d in allowed[features.dtype]]}"
        )
    if bank.requires_grad:
        raise ValueError(
            "bank must not require grad: the bank is updated by momentum, not by gradient "
            "(pass bank.detach() if that is what you mean)"
        )
    if bank.device != features.device:
        raise ValueError(f"bank is on {bank.device} but {features_name} is on {features.device}")


def check_rows_in_bank(rows: Tensor, name: str, bank_rows: int) -> None:
    if rows.numel() == 0:
        return
    if torch.compiler.is_compiling() or rows.device.type != "cpu":
        # On a GPU, reading the result on the host would synchronise every call, and while compiling
        # a data-dependent branch would break the graph: the check stays, on the device.
        torch._assert_async(
            ((rows >= -1) & (rows < bank_rows)).all(), f"{name} must be in [-1, N={bank_rows})"
        )
        return
    low, high = int(rows.min()), int(rows.max())
    if low < -1 or high >= bank_rows:
        bad = low if low < -1 else high
        raise ValueError(f"{name} must be in [-1, N={bank_rows}), got {bad}")


# The kernels scale the scores by 1 / T in float32 (csrc/checks.h): beyond these bounds it is +inf
# or a subnormal down to 0 (0 * -inf = NaN for an ineligible score).
MIN_TEMPERATURE = 2.94e-39  # 1 / FLT_MAX, rounded up
MAX_TEMPERATURE = 8.5e37  # 1 / FLT_MIN, rounded down


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(
            "temperature must be a finite number > 0 whose inverse is a normal float32 "
            f"({MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}), got {temperature}"
        )
    return temperature


def check_k(k, name: str, bank_rows: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 0 or k > bank_rows:
        raise ValueError(f"{name} must be in [0, N={bank_rows}], got {k}")
    return k
