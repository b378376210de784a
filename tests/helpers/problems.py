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


def loss_errors_allowed(features, indices, bank_low, bank_labels, temperature, ours, ours_grad):
    """The project's accuracy rule for a loss and its gradient computed from float32 features and
    a bank stored as ``bank_low``: (loss error, its allowance, gradient error, its allowance), the
    errors against float64 on exactly the stored (rounded) bank values, the allowances those of
    plain PyTorch in the same dtypes (plus a hair)."""
    from snca_ext import reference

    gt_in = features.clone().requires_grad_()
    gt = reference.snca_loss_reference(gt_in, indices, bank_low.double(), bank_labels, temperature)
    (gt_grad,) = torch.autograd.grad(gt, gt_in)
    plain_in = features.float().requires_grad_()
    plain = reference.snca_loss_reference(plain_in, indices, bank_low, bank_labels, temperature)
    (plain_grad,) = torch.autograd.grad(plain, plain_in)
    return (
        abs(ours.item() - gt.item()),
        abs(plain.item() - gt.item()) + 1e-6 * abs(gt.item()),
        (ours_grad.double() - gt_grad).abs().max().item(),
        2 * (plain_grad.double() - gt_grad).abs().max().item() + 1e-6 * gt_grad.abs().max().item(),
    )
