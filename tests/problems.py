"""Random SNCA problems shared by the op tests of every backend."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def make_problem(batch, bank_rows, dim, *, classes=4, dtype=torch.float64, device="cpu", seed=0):
    """Unit-norm features and bank; each query is a noisy copy of its own bank row, as in training."""
    gen = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(bank_rows, dim, generator=gen, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(0, classes, (bank_rows,), generator=gen)
    indices = torch.randint(0, bank_rows, (batch,), generator=gen)
    noise = 0.3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    features = F.normalize(bank[indices] + noise, dim=1)
    return (
        features.to(device=device, dtype=dtype),
        indices.to(device),
        bank.to(device=device, dtype=dtype),
        bank_labels.to(device),
    )
