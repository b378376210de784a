"""The memory bank of SNCA: one L2-normalised feature per training example, updated by momentum.

``MemoryBank`` holds the N x D bank and its labels as buffers (so it travels in a ``state_dict``
and loads with ``weights_only=True``) and runs the loss and the kNN search through the fused op.
``SNCALoss`` (``SNCACriterion``: its old name, with the old call) is the loss as a module with a
pytorch-metric-learning forward, ``(embeddings, labels, indices, ref_emb, ref_labels)``: with its
own bank it is a drop-in replacement for the original project's pair ``LinearAverage`` +
``NCACrossEntropy``, updating the bank during the backward exactly when the original did.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .ops import _check_temperature, bank_topk, snca_loss

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
        self.temperature = _check_temperature(temperature)
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
    ) -> Tensor:
        """SNCA loss of ``features`` (their own rows ``indices`` excluded); ``margin`` in logit
        units, as ``snca_ext.snca_loss``."""
        return snca_loss(
            features,
            indices,
            self.bank,
            self.labels,
            self.temperature,
            margin=margin,
            labels=labels,
            reduction=reduction,
            backend=backend,
        )

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


class SNCALoss(nn.Module):
    """The SNCA loss as a module, with the forward of a pytorch-metric-learning loss.

    ``forward(embeddings, labels=None, indices=None, ref_emb=None, ref_labels=None)`` compares each
    embedding with one of three banks, the first that applies:

    - ``ref_emb`` / ``ref_labels`` (e.g. a cross-batch memory the caller keeps): ``indices``, if
      given, are the embeddings' own rows in ``ref_emb`` (-1 for none), which are left out.
    - the module's own memory bank (built when ``dim`` and ``labels`` are given): ``indices`` are
      the embeddings' dataset indices (their bank rows, left out), and the bank is updated with
      the embeddings once their gradient has been computed (SNCA proper).
    - the batch itself: each embedding against the others of the batch.

    Only the embeddings get a gradient; the bank side is a constant, as in every SNCA bank (so in
    the batch mode the gradient flows through the query side only).

    With its own bank it is a drop-in for the original ``LinearAverage`` + ``NCACrossEntropy``
    pair. Where the original code does::

        lemniscate = LinearAverage(low_dim, ndata, T, momentum)
        criterion = NCACrossEntropy(labels, margin / T)
        loss = criterion(lemniscate(features, indices), indices)

    write ``criterion = SNCALoss(low_dim, labels, T, momentum, margin=margin / T)`` and
    ``loss = criterion(features, indices=indices)``. The bank never leaves the op (no B x N
    matrix), and it is updated when the gradient of ``features`` has been computed, as the
    original's backward did.

    Args:
        dim: D, the feature dimension, for the own memory bank (None: no bank).
        labels: [N] the class of every training example, for the own memory bank (None: no bank).
        temperature: T. momentum: memory momentum in [0, 1).
        margin: in logit units, like the original's criterion argument.
        dtype: the bank's storage dtype. backend: the fused op's backend.

    Shapes: ``forward`` takes embeddings [B, D], labels [B], indices [B], ref_emb [M, D],
    ref_labels [M] and returns a scalar (mean over B; a row without a positive counts 0).
    """

    memory: MemoryBank | None

    def __init__(
        self,
        dim: int | None = None,
        labels: Tensor | None = None,
        temperature: float = 0.05,
        momentum: float = 0.5,
        *,
        margin: float = 0.0,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if (dim is None) != (labels is None):
            raise ValueError(
                "dim and labels must be given together (a memory bank of one row per training "
                "example) or not at all (the batch or ref_emb as the bank)"
            )
        self.memory = (
            None
            if labels is None
            else MemoryBank(labels, dim, temperature=temperature, momentum=momentum, dtype=dtype)
        )
        self._temperature = _check_temperature(temperature)
        self.margin = float(margin)
        self.backend = backend

    @property
    def temperature(self) -> float:
        """T; the memory bank's own when there is one (one value for every mode)."""
        return self.memory.temperature if self.memory is not None else self._temperature

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The mean SNCA loss of ``embeddings`` [B, D] (see the class for the three banks).

        Args:
            embeddings: [B, D] L2-normalised. labels: [B] their classes (optional with the own
                bank, where the bank's labels of ``indices`` are the default).
            indices: [B] the embeddings' rows in the bank (dataset indices for the own bank).
            ref_emb: [M, D] a bank to use instead (gets no gradient). ref_labels: [M] its classes.
        """
        if isinstance(indices, (tuple, list)):
            raise TypeError(
                f"indices must be a [B] tensor of the embeddings' bank rows, got a {type(indices).__name__}: "
                "SNCA uses every pair of the bank, so a miner's indices_tuple has no place here"
            )
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        # Labels and indices often stay on the CPU while the embeddings are on the GPU (PML moves them too).
        labels, indices, ref_labels = (
            None if tensor is None else torch.as_tensor(tensor).to(embeddings.device)
            for tensor in (labels, indices, ref_labels)
        )
        if ref_emb is not None or self.memory is None:
            return self._loss_against_reference(embeddings, labels, indices, ref_emb, ref_labels)
        if indices is None:
            raise ValueError(
                "indices (the embeddings' dataset indices, i.e. their memory bank rows) must be given "
                "to a loss with a memory bank: call loss(embeddings, labels, indices) or "
                "loss(embeddings, indices=indices)"
            )
        if labels is not None:
            self._check_labels_match_bank(labels, indices)
        loss = self.memory.loss(embeddings, indices, margin=self.margin, labels=labels, backend=self.backend)
        if embeddings.requires_grad and torch.is_grad_enabled():
            # Updating now would change a tensor the op saved for its backward; a hook on the
            # features runs once their gradient is complete, which is where the original updated.
            snapshot, rows = embeddings.detach(), indices.detach()
            embeddings.register_hook(lambda _grad: self.memory.update(snapshot, rows))
        return loss

    def _check_labels_match_bank(self, labels: Tensor, indices: Tensor) -> None:
        """With its own bank the loss reads each embedding's class from the bank: given labels that
        contradict it (a shuffled or wrong label tensor) would silently change the loss."""
        if labels.shape != indices.shape:
            raise ValueError(
                f"labels must have one entry per embedding like indices, shape {tuple(indices.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.numel() == 0:
            return
        stored = self.memory.labels[indices.clamp(min=0)]
        message = "labels must equal the memory bank's labels of indices (the classes of those rows)"
        if labels.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(((labels == stored) | (indices < 0)).all(), message)  # no host sync
        elif not bool(((labels == stored) | (indices < 0)).all()):
            row = int(((labels != stored) & (indices >= 0)).nonzero()[0, 0])
            raise ValueError(
                f"{message}: embedding {row} has label {int(labels[row])}, its bank row "
                f"{int(indices[row])} has {int(stored[row])}"
            )

    def _loss_against_reference(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices: Tensor | None,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
    ) -> Tensor:
        if labels is None:
            raise ValueError("labels must be given when the bank is ref_emb or the batch itself")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be [B={embeddings.shape[0]}], one per embedding, "
                f"got shape {tuple(labels.shape)}"
            )
        if ref_emb is not None and (ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]):
            raise ValueError(
                f"ref_labels must be [M={ref_emb.shape[0]}], one per row of ref_emb, got shape "
                f"{tuple(ref_labels.shape)}"
            )
        if ref_emb is None:
            if indices is not None:
                raise ValueError(
                    "indices are bank rows: give them with ref_emb or to a loss built with a memory "
                    "bank (dim and labels); against the batch itself each embedding's own row is known"
                )
            ref_emb, ref_labels = embeddings, labels
            indices = torch.arange(embeddings.shape[0], device=embeddings.device)
        elif indices is None:
            indices = torch.full((embeddings.shape[0],), -1, dtype=torch.long, device=embeddings.device)
        return snca_loss(
            embeddings,
            indices,
            ref_emb.detach(),
            ref_labels,
            self.temperature,
            margin=self.margin,
            labels=labels,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        bank = "own memory bank" if self.memory is not None else "batch or ref_emb as the bank"
        return f"{bank}, temperature={self.temperature}, margin={self.margin}, backend={self.backend!r}"


class SNCACriterion(SNCALoss):
    """``SNCALoss`` under the name of earlier releases, whose forward was ``(features, indices)``.

    That call still works, with a ``FutureWarning`` naming the new form: the second positional
    argument of ``SNCALoss.forward`` is ``labels`` (pytorch-metric-learning's order), so the
    indices go by keyword, ``loss(features, indices=indices)``. Every other call is ``SNCALoss``'s.
    """

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        if self.memory is not None and labels is not None and indices is None and ref_emb is None:
            # The old call: a loss with its own bank needs indices, so the second positional
            # argument can only be them.
            warnings.warn(
                "SNCACriterion(features, indices) is the call of earlier releases: use "
                "SNCALoss(...)(features, indices=indices) (the second positional argument is now labels)",
                FutureWarning,
                stacklevel=2,
            )
            labels, indices = None, labels
        return super().forward(embeddings, labels, indices, ref_emb, ref_labels)
