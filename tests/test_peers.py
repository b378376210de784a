"""The FlexAttention formulation of SNCA (benchmarks/peers.py), eager on the CPU, against the float64
reference: the GPU table times its compiled twin, so the formulation is known right before a GPU
ever runs it. Eager flex_attention evaluates the mask_mods densely; the compiled kernel skips the
blocks the block masks leave out, so the block masks are checked against the dense masks too."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from benchmarks.peers import flex_bank, flex_snca_loss
from snca_ext import reference

# (B, N, D, T, classes, chunks, sort_by_class, block_size): sizes off the power-of-two grid, one and
# several chunks (the split-KV combine and the padded last chunk), bank order and sorted by class.
CASES = [
    (5, 97, 16, 0.05, 4, 1, False, 128),
    (17, 301, 33, 0.01, 6, 3, True, 16),
    (11, 250, 33, 0.05, 9, 2, False, 32),
    (8, 130, 16, 0.01, 5, 1, True, 16),
]


def _problem(batch: int, n: int, dim: int, classes: int, seed: int):
    """Unit features close to their own bank rows (so excluding the own row matters), query 0's own
    row alone in its class (no positive: loss 0, gradient 0), and the last query without a bank row
    (indices -1, label given)."""
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(0, classes, (n,), generator=g)
    indices = torch.randperm(n, generator=g)[:batch]
    bank_labels[indices[0]] = classes
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 0.3 / math.sqrt(dim)
    features = F.normalize(bank[indices] + noise, dim=1)
    labels = bank_labels[indices]
    indices[-1] = -1
    return features, indices, labels, bank, bank_labels


def _reference(features, indices, labels, bank, bank_labels, temperature):
    leaf = features.clone().requires_grad_()
    loss = reference.snca_loss_reference(leaf, indices, bank, bank_labels, temperature, labels=labels)
    loss.backward()
    return loss.detach(), leaf.grad


def _flex(features, prepared, temperature):
    leaf = features.float().requires_grad_()
    with warnings.catch_warnings():  # eager flex_attention warns that it is not compiled: on purpose
        warnings.simplefilter("ignore", UserWarning)
        loss = flex_snca_loss(leaf, prepared, temperature)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize(("batch", "n", "dim", "temperature", "classes", "chunks", "sort", "block"), CASES)
def test_flex_formulation_matches_the_float64_reference(
    batch, n, dim, temperature, classes, chunks, sort, block
):
    features, indices, labels, bank, bank_labels = _problem(batch, n, dim, classes, seed=batch * n)
    expected_loss, expected_grad = _reference(features, indices, labels, bank, bank_labels, temperature)
    prepared = flex_bank(
        indices, bank.float(), bank_labels, labels=labels, sort_by_class=sort, chunks=chunks, block_size=block
    )
    loss, grad = _flex(features, prepared, temperature)

    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])), "the row without a positive must get no gradient"


def _dense_masks(indices, labels, bank_labels, sort: bool, chunks: int, rows: int):
    """The two masks by their definition, laid out as flex_bank lays out the bank."""
    n = bank_labels.shape[0]
    order = torch.argsort(bank_labels, stable=True) if sort else torch.arange(n)
    row_of = torch.full((chunks * rows,), -1)
    row_of[:n] = order  # position in the layout -> original bank row (-1: padding)
    row_labels = torch.where(row_of >= 0, bank_labels[row_of.clamp(min=0)], -1)
    allowed = (row_of[None, :] >= 0) & (row_of[None, :] != indices[:, None])
    same = allowed & (row_labels[None, :] == labels[:, None])
    return allowed.view(-1, chunks, rows).transpose(0, 1), same.view(-1, chunks, rows).transpose(0, 1)


def _blocks(mask, block: int):
    """[chunks, B, rows] -> [chunks, query blocks, row blocks]: which blocks hold an allowed pair."""
    chunks, batch, rows = mask.shape
    padded = F.pad(mask, (0, 0, 0, -batch % block))
    return padded.view(chunks, -1, block, rows // block, block).any(dim=4).any(dim=2)


def test_block_masks_list_exactly_the_blocks_the_dense_masks_need():
    """The compiled kernel visits only the blocks a block mask lists: a listed block without an
    allowed pair costs time, a missing one drops terms. Sorted by class, the same-class mask of
    queries from a few classes is sparse; in bank order it lists nearly every block."""
    batch, n, dim, block, chunks = 6, 600, 8, 16, 2
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(n, dim, generator=g)
    bank_labels = torch.randint(0, 40, (n,), generator=g)
    indices = torch.randperm(n, generator=g)[:batch]
    labels = bank_labels[indices]
    same_fraction = {}
    for sort in (False, True):
        prepared = flex_bank(indices, bank, bank_labels, sort_by_class=sort, chunks=chunks, block_size=block)
        rows = prepared.keys.shape[2]
        dense_all, dense_same = _dense_masks(indices, labels, bank_labels, sort, chunks, rows)
        for block_mask, dense in ((prepared.mask_all, dense_all), (prepared.mask_same, dense_same)):
            listed = block_mask.to_dense()[:, 0].bool()
            assert torch.equal(listed, _blocks(dense, block)), f"sort_by_class={sort}"
        same_fraction[sort] = prepared.mask_same.to_dense().float().mean().item()
    assert same_fraction[True] < 0.5 * same_fraction[False], same_fraction


def test_flex_peer_input_errors():
    bank, bank_labels = torch.randn(50, 8), torch.randint(0, 3, (50,))
    indices = torch.tensor([0, -1])
    with pytest.raises(ValueError, match="labels must be given"):
        flex_bank(indices, bank, bank_labels)
    with pytest.raises(ValueError, match="chunks must be >= 1, got 0"):
        flex_bank(indices, bank, bank_labels, labels=torch.tensor([0, 1]), chunks=0)
    prepared = flex_bank(indices, bank, bank_labels, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features must be \[B=2, D=8\], got \(3, 8\)"):
        flex_snca_loss(torch.randn(3, 8), prepared, 0.05)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0\.0"):
        flex_snca_loss(torch.randn(2, 8), prepared, 0.0)
