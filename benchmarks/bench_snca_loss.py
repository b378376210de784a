"""SNCA loss, forward and forward + backward: our fused backends against plain PyTorch and peers.

Every implementation gets the same batch and bank; its loss (and, with backward, its gradient) is
checked once against our op before it is timed, so a wrongly set-up peer fails instead of being
timed. pytorch-metric-learning's NCALoss cannot leave out a query's own bank row (it only does so
when the queries *are* the references), so it is checked against our op with no row excluded
(``indices = -1``); leaving out one of N rows costs nothing measurable either way. On a GPU, the
peers a GPU user would write instead (benchmarks/peers.py): SNCA as two compiled FlexAttention
calls, the bank sorted by class in one chunk per SM, and as one sequence in bank order (torch
2.14's compiled FlexAttention on the CPU does not return the log-sum-exp; eager, it materialises
the B x N scores: no peer there).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import snca_ext
from benchmarks import harness
from snca_ext.reference import snca_loss_original, snca_loss_reference

MODES = ("forward", "forward+backward")
# id -> (label in the report, kind); the fused backends are added per device below.
PLAIN_IMPLS = {
    "original": ("plain PyTorch (original code, linear-space exp)", "baseline"),
    "reference": ("plain PyTorch, log-space (snca_ext.reference)", "reference"),
    "compile": ("torch.compile(original code)", "peer"),
    "pml-nca": ("pytorch-metric-learning NCALoss", "peer"),
}
# Peers with a kernel on the GPU only.
GPU_PEERS = {
    "flex": ("two FlexAttention calls, bank sorted by class, one chunk per SM (compiled)", "peer"),
    "flex-one-sequence": ("two FlexAttention calls, bank as one sequence (compiled)", "peer"),
}
COMPILED = ("compile", *GPU_PEERS)
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-3, 1e-3  # gradient atol is this times the largest |gradient|


def _impls(device: str) -> dict[str, tuple[str, str]]:
    fused = {
        f"snca_ext-{backend}": (f"snca_ext.snca_loss (fused, {backend})", "ours")
        for backend in harness.fused_backends(device)
    }
    return {**fused, **PLAIN_IMPLS, **(GPU_PEERS if device == "cuda" else {})}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = [(device, impl) for device in harness.devices() for impl in _impls(device)]
    metafunc.parametrize(("device", "impl"), cases, ids=[f"{device}-{impl}" for device, impl in cases])


def _expected(inputs: harness.BankInputs, own_row_excluded: bool) -> tuple[Tensor, Tensor]:
    """Our op's loss and gradient for these inputs, computed once per size (the fused op is
    checked against the float64 reference by the test suite)."""
    key = ("snca_loss", own_row_excluded)
    if key not in inputs.memo:
        features = inputs.features.clone().requires_grad_()
        if own_row_excluded:
            indices, labels = inputs.indices, None
        else:
            indices, labels = torch.full_like(inputs.indices, -1), inputs.labels
        loss = snca_ext.snca_loss(
            features, indices, inputs.bank, inputs.bank_labels, inputs.temperature, labels=labels
        )
        loss.backward()
        inputs.memo[key] = (loss.detach(), features.grad)
    return inputs.memo[key]


def _loss_fn(impl: str, inputs: harness.BankInputs) -> tuple[Callable[[Tensor], Tensor], bool]:
    """(features -> loss, whether the query's own bank row is excluded)."""
    bank, bank_labels, indices, temperature = (
        inputs.bank,
        inputs.bank_labels,
        inputs.indices,
        inputs.temperature,
    )
    if impl.startswith("snca_ext-"):
        backend = impl.removeprefix("snca_ext-")
        return lambda x: snca_ext.snca_loss(x, indices, bank, bank_labels, temperature, backend=backend), True
    if impl == "original":
        return lambda x: snca_loss_original(x, indices, bank, bank_labels, temperature), True
    if impl == "reference":
        return lambda x: snca_loss_reference(x, indices, bank, bank_labels, temperature), True
    if impl == "compile":
        compiled = torch.compile(snca_loss_original)
        return lambda x: compiled(x, indices, bank, bank_labels, temperature), True
    if impl in GPU_PEERS:
        from benchmarks import peers

        key = ("flex_bank", impl)
        if key not in inputs.memo:  # one layout and one compiled graph per size, for both modes
            sort = impl == "flex"
            chunks = torch.cuda.get_device_properties(inputs.device).multi_processor_count if sort else 1
            inputs.memo[key] = peers.flex_bank(indices, bank, bank_labels, sort_by_class=sort, chunks=chunks)
        prepared = inputs.memo[key]
        return lambda x: peers.flex_snca_loss(x, prepared, temperature, compiled=True), True
    if impl == "pml-nca":
        losses = harness.import_peer("pytorch_metric_learning.losses", "pytorch-metric-learning")
        # Its default distance is the squared L2 distance of the L2-normalised embeddings:
        # -s * |f - m|^2 = 2s <f, m> - 2s for unit vectors, so s = 1 / (2T) gives logits <f, m> / T
        # up to a constant, which the softmax ignores.
        nca = losses.NCALoss(softmax_scale=1.0 / (2.0 * temperature))
        labels = inputs.labels
        return lambda x: nca(x, labels, ref_emb=bank, ref_labels=bank_labels), False
    raise ValueError(f"unknown loss implementation {impl!r}")


def _step(loss_fn: Callable[[Tensor], Tensor], features: Tensor, mode: str) -> Callable[[], Tensor]:
    if mode == "forward":

        def forward() -> Tensor:
            with torch.no_grad():
                return loss_fn(features)

        return forward

    def forward_backward() -> Tensor:
        features.grad = None
        loss = loss_fn(features)
        loss.backward()
        return loss.detach()

    return forward_backward


@pytest.mark.parametrize("mode", MODES)
def test_snca_loss(benchmark, profile, inputs, size, device, impl, mode):
    label, kind = _impls(device)[impl]
    loss_fn, own_row_excluded = _loss_fn(impl, inputs)
    expected_loss, expected_grad = _expected(inputs, own_row_excluded)
    features = inputs.features.clone().requires_grad_(mode != "forward")
    step = _step(loss_fn, features, mode)

    if impl in COMPILED:
        try:  # the first call compiles: a missing or broken toolchain is a setup problem, not ours
            loss = step()
        except Exception as error:
            pytest.skip(f"torch.compile failed here: {type(error).__name__}: {str(error)[:300]}")
    else:
        loss = step()
    torch.testing.assert_close(
        loss,
        expected_loss,
        rtol=LOSS_RTOL,
        atol=LOSS_ATOL,
        msg=lambda m: f"{label} does not compute the same loss as snca_ext.snca_loss: {m}",
    )
    if mode != "forward":
        grad = expected_grad
        if impl == "pml-nca":
            # NCALoss normalises the embeddings itself: its gradient is ours projected onto the
            # tangent space of the unit sphere at each (unit) feature.
            unit = features.detach()
            grad = grad - (grad * unit).sum(dim=1, keepdim=True) * unit
        torch.testing.assert_close(
            features.grad,
            grad,
            rtol=GRAD_RTOL,
            atol=GRAD_ATOL_SCALE * float(grad.abs().max()),
            msg=lambda m: f"{label} does not compute the same gradient as snca_ext.snca_loss: {m}",
        )

    harness.run_case(
        benchmark,
        step,
        profile=profile,
        device=inputs.device,
        group=f"snca_loss {mode} | {device} | B={size.batch} D={size.dim} N={size.bank_rows}",
        info={
            "op": "snca_loss",
            "mode": mode,
            "impl": impl,
            "label": label,
            "kind": kind,
            **size.info(),
            "temperature": inputs.temperature,
            "check": "loss matches snca_ext.snca_loss"
            + ("" if mode == "forward" else ", and so does the gradient"),
        },
    )
