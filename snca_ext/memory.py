"""The memory bank of SNCA: one L2-normalised feature per training example, updated by momentum.

``MemoryBank`` holds the N x D bank and its labels as buffers (so it travels in a ``state_dict``
and loads with ``weights_only=True``) and runs the loss and the kNN search through the fused op.
The loss as a module built on it, ``SNCALoss``, is in ``snca_ext.loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backends import resolve_backend
from .checks import check_temperature
from .ops import bank_topk, snca_loss

BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def initial_bank(
    size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None, generator=None
) -> Tensor:
    """The original initialisation: uniform in [-a, a] with a = 1 / sqrt(D / 3), not normalised.

    That ``a`` gives every coordinate variance 1 / D, so a random row has norm close to 1 and its
    similarities with unit features are on the same scale as those of trained rows.
    """
    bound = 1.0 / math.sqrt(dim / 3)
    bank = torch.rand(size, dim, generator=generator, device=device)
    return bank.mul_(2 * bound).sub_(bound).to(dtype)


def momentum_update(bank: Tensor, rows: Tensor, features: Tensor, momentum: float) -> None:
    """``bank[r] <- normalize(momentum * bank[r] + (1 - momentum) * f)`` for each (row, feature)
    pair, in float32 whatever the bank's storage dtype, in place.

    Args:
        bank: [N, D] the bank (any float dtype). rows: [b] integer rows of ``bank``.
        features: [b, D] the new features (detached). momentum: in [0, 1).
    """
    momentum = _check_momentum(momentum)
    rows = rows.to(bank.device).long()
    mixed = bank[rows].float().mul_(momentum)
    mixed.add_(features.detach().to(mixed.device, torch.float32), alpha=1.0 - momentum)
    bank.index_copy_(0, rows, F.normalize(mixed, dim=1).to(bank.dtype))


def _check_momentum(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1), got {value!r}")
    return float(value)


def check_update(features: Tensor, indices: Tensor, dim: int, size: int) -> None:
    """The inputs of a bank update: features [b, D] and indices [b], each index a row in [0, N)."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != dim:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be [b, D={dim}] like the bank, got {shape}")
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.shape[0] != features.shape[0]:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be [b={features.shape[0]}] bank rows, one per feature, got {shape}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if indices.numel() == 0:
        return
    message = f"indices must be bank rows in [0, N={size})"
    if indices.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(((indices >= 0) & (indices < size)).all(), message)  # no host sync
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= size:
        raise ValueError(f"{message}, got {low if low < 0 else high}")


class MomentumSchedule:
    """Memory momentum by epoch: ``base`` until the first milestone, then each milestone's value.

    ``MomentumSchedule(0.5, {80: 0.8, 120: 0.9})`` is the ImageNet recipe.
    """

    def __init__(self, base: float, milestones: Mapping[int, float] | None = None) -> None:
        values = {"base": base, **{f"milestone {k}": v for k, v in (milestones or {}).items()}}
        for name, value in values.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"memory momentum ({name}) must be in [0, 1), got {value}")
        self.base = float(base)
        self.milestones = dict(sorted((int(k), float(v)) for k, v in (milestones or {}).items()))

    @classmethod
    def parse(cls, base: float, text: str) -> MomentumSchedule:
        """From the command-line form ``"80:0.8,120:0.9"`` (empty for a constant momentum)."""
        milestones = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            epoch, sep, value = item.partition(":")
            try:
                if not sep:
                    raise ValueError
                milestones[int(epoch)] = float(value)
            except ValueError:
                raise ValueError(
                    f"memory momentum schedule must look like '80:0.8,120:0.9' (epoch:momentum), got {text!r}"
                ) from None
        return cls(base, milestones)

    def __call__(self, epoch: int) -> float:
        momentum = self.base
        for start, value in self.milestones.items():
            if epoch >= start:
                momentum = value
        return momentum

    def __repr__(self) -> str:
        return f"MomentumSchedule({self.base}, {self.milestones})"


class MemoryBank(nn.Module):
    """N x D bank of L2-normalised features with per-row labels, the SNCA loss and kNN on it.

    ``update`` must run after the step's loss has been computed (and, when the loss is
    differentiated, after ``backward``): the loss of a step sees the bank of the previous step, as
    in the original, where the update sits in the backward of ``LinearAverage``.

    Args:
        labels: [N] integer class of every training example (its bank row).
        dim: D, the feature dimension.
        temperature: T > 0 of the loss.
        momentum: memory momentum in [0, 1) (the original's 0.5).
        dtype: storage of the bank: float32, bfloat16 or float16 (accumulation is float32).
        device: where the bank lives. generator: for the original's uniform initialisation.

    Shapes: ``bank`` [N, D] and ``labels`` [N] are buffers (saved in ``state_dict``).
    """

    bank: Tensor
    labels: Tensor

    def __init__(
        self,
        labels: Tensor,
        dim: int,
        *,
        temperature: float,
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dtype not in BANK_DTYPES.values():
            raise TypeError(f"dtype must be one of {list(BANK_DTYPES)}, got {dtype}")
        self.temperature = check_temperature(temperature)
        self.momentum = _check_momentum(momentum)
        bank = initial_bank(labels.numel(), dim, dtype=dtype, generator=generator)
        self.register_buffer("bank", bank.to(device))
        self.register_buffer("labels", labels.long().to(device))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def loss(
        self,
        features: Tensor,
        indices: Tensor,
        *,
        margin: float = 0.0,
        labels: Tensor | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        fresh_rows: bool = False,
    ) -> Tensor:
        """SNCA loss of ``features`` (their own rows ``indices`` excluded); ``margin`` in logit
        units, as ``snca_ext.snca_loss``.

        ``fresh_rows``: the loss sees the batch's own bank rows holding the batch's current
        (detached) features instead of what older networks wrote there: each query's same-class
        batch mates become fresh positives and the rest of the batch fresh negatives, while every
        other row stays the slow, momentum-averaged memory. The stored bank is unchanged (the
        rows are swapped in for the op and back out), so ``update`` still mixes the old rows.
        On Omniglot's 20 images per class this is what makes SNCA learn (README).
        """

        def loss_on(bank: Tensor) -> Tensor:
            return snca_loss(
                features,
                indices,
                bank,
                self.labels,
                self.temperature,
                margin=margin,
                labels=labels,
                reduction=reduction,
                backend=backend,
            )

        if not fresh_rows:
            return loss_on(self.bank)
        check_update(features, indices.clamp(min=0), self.dim, self.size)
        rows = indices.to(self.bank.device).long()
        has_row = rows >= 0  # a query without a bank row (-1) has nothing to refresh
        rows, fresh = rows[has_row], features.detach()[has_row].to(self.bank)
        if resolve_backend(backend, features.device) == "reference":
            # The reference differentiates through its matmul, which saves the bank for the
            # backward: give it a copy rather than a bank changed in place afterwards.
            return loss_on(self.bank.index_copy(0, rows, fresh))
        # The fused ops never save the bank for the loss's backward (no top-k here), so the rows
        # can be swapped in place: B rows, not an N x D copy of the bank per step.
        stored = self.bank[rows].clone()
        with torch.no_grad():
            self.bank.index_copy_(0, rows, fresh)
        try:
            return loss_on(self.bank)
        finally:
            with torch.no_grad():
                self.bank.index_copy_(0, rows, stored)

    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor, momentum: float | None = None) -> None:
        """``m_idx <- normalize(momentum * m_idx + (1 - momentum) * f)`` for each row in the batch
        (features [b, D], indices [b]); ``momentum`` overrides the bank's for this call."""
        check_update(features, indices, self.dim, self.size)
        momentum = self.momentum if momentum is None else momentum
        momentum_update(self.bank, indices, features, momentum)

    @torch.no_grad()
    def fill(self, features: Tensor) -> None:
        """Replaces the whole bank (e.g. by features recomputed from the trained network)."""
        if features.shape != self.bank.shape:
            raise ValueError(
                f"features must have the bank's shape {tuple(self.bank.shape)}, got {tuple(features.shape)}"
            )
        self.bank.copy_(features.to(self.bank.device, self.bank.dtype))

    def topk(
        self,
        queries: Tensor,
        k: int,
        *,
        exclude: Tensor | None = None,
        backend: str = "auto",
        bank: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The k most similar bank rows per query, descending (``snca_ext.bank_topk``). ``bank``
        searches other rows in the bank's place (its shape: e.g. the bank recomputed from the
        network)."""
        return bank_topk(queries, self._rows_to_search(bank), k, exclude=exclude, backend=backend)

    def _rows_to_search(self, bank: Tensor | None) -> Tensor:
        """The rows ``topk`` searches: the bank's own, or ``bank`` of the same shape."""
        if bank is None:
            return self.bank
        if not isinstance(bank, Tensor) or bank.shape != self.bank.shape:
            shape = tuple(bank.shape) if isinstance(bank, Tensor) else type(bank).__name__
            raise ValueError(
                f"bank must be a tensor of the bank's shape {tuple(self.bank.shape)}, got {shape}"
            )
        return bank

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.bank.dtype}, "
            f"temperature={self.temperature}, momentum={self.momentum}"
        )
