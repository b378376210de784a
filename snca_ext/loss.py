"""The SNCA loss as a module: ``SNCALoss`` (``SNCACriterion``: its old name, with the old call), with
a pytorch-metric-learning forward, ``(embeddings, labels, indices, ref_emb, ref_labels)``: with its
own bank (a ``MemoryBank``) it is a drop-in replacement for the original project's pair
``LinearAverage`` + ``NCACrossEntropy``, updating the bank during the backward exactly when the
original did.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .checks import check_temperature
from .memory import MemoryBank
from .ops import snca_loss


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
        fresh_rows: with its own bank, the loss sees the batch's own rows holding the batch's current
            features (``MemoryBank.loss``); the stored bank is still updated by momentum.

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
        fresh_rows: bool = False,
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
        self._temperature = check_temperature(temperature)
        self.margin = float(margin)
        self.backend = backend
        self.fresh_rows = bool(fresh_rows)

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
        loss = self.memory.loss(
            embeddings,
            indices,
            margin=self.margin,
            labels=labels,
            backend=self.backend,
            fresh_rows=self.fresh_rows,
        )
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
