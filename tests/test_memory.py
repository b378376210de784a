"""MemoryBank, its momentum schedule, the drop-in criterion against the original algorithm, and the
banks' state inside a parent module's state_dict."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from snca_ext import distributed
from snca_ext.distributed import ShardedMemoryBank
from snca_ext.loss import SNCACriterion, SNCALoss
from snca_ext.memory import MemoryBank, MomentumSchedule, initial_bank, momentum_update
from snca_ext.reference import snca_loss_original, snca_loss_reference


def _features(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def test_initial_bank_is_the_original_uniform_init():
    dim = 48
    bank = initial_bank(5000, dim, generator=torch.Generator().manual_seed(0))
    bound = 1.0 / math.sqrt(dim / 3)
    assert bank.shape == (5000, dim) and bank.dtype == torch.float32
    assert float(bank.abs().max()) <= bound
    assert float(bank.abs().max()) > 0.99 * bound  # spans the whole interval
    # Variance 1/D per coordinate: rows have norm about 1, so they are not renormalised.
    assert abs(float(bank.norm(dim=1).mean()) - 1.0) < 0.02
    again = initial_bank(5000, dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank, again, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_is_momentum_then_renormalise(dtype):
    labels = torch.arange(40) % 4
    memory = MemoryBank(labels, 16, temperature=0.05, momentum=0.5, dtype=dtype)
    before = memory.bank.clone()
    features = _features(3, 16, 1)
    rows = torch.tensor([7, 0, 33])
    memory.update(features, rows, momentum=0.8)
    expected = F.normalize(0.8 * before[rows].float() + 0.2 * features, dim=1)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(memory.bank[rows].float(), expected, rtol=0, atol=tolerance)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(memory.bank[untouched], before[untouched])
    assert memory.bank.dtype == dtype


def test_update_uses_the_bank_momentum_by_default():
    memory = MemoryBank(torch.zeros(10, dtype=torch.long), 8, temperature=0.1, momentum=0.0)
    features = _features(2, 8, 2)
    memory.update(features, torch.tensor([1, 4]))
    torch.testing.assert_close(memory.bank[[1, 4]], features)


def test_momentum_schedule_imagenet_recipe():
    schedule = MomentumSchedule.parse(0.5, "80:0.8,120:0.9")
    assert [schedule(epoch) for epoch in (0, 79, 80, 119, 120, 129)] == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]
    assert MomentumSchedule.parse(0.3, "")(500) == 0.3


@pytest.mark.parametrize("text", ["80", "80:x", "a:0.8", "80:1.5"])
def test_momentum_schedule_rejects_bad_text(text):
    with pytest.raises(ValueError, match="momentum"):
        MomentumSchedule.parse(0.5, text)


def test_loss_matches_the_reference_with_margin():
    labels = torch.arange(97) % 5
    memory = MemoryBank(labels, 24, temperature=0.07, generator=torch.Generator().manual_seed(3))
    memory.update(_features(97, 24, 4), torch.arange(97), momentum=0.0)
    features = _features(13, 24, 5)
    rows = torch.randperm(97, generator=torch.Generator().manual_seed(6))[:13]
    ours = memory.loss(features, rows, margin=0.5)
    expected = snca_loss_reference(
        features.double(), rows, memory.bank.double(), labels, 0.07, margin=0.5
    ).float()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_topk_excludes_the_query_row():
    memory = MemoryBank(torch.arange(20) % 2, 8, temperature=0.1)
    memory.fill(_features(20, 8, 7))
    values, rows = memory.topk(memory.bank[:4].clone(), 3, exclude=torch.arange(4))
    assert not bool((rows == torch.arange(4)[:, None]).any())
    assert bool((values[:, :-1] >= values[:, 1:]).all())


def test_topk_searches_other_rows_in_the_banks_place():
    memory = MemoryBank(torch.arange(20) % 2, 8, temperature=0.1)
    memory.fill(_features(20, 8, 7))
    other, queries = _features(20, 8, 8), _features(5, 8, 9)
    values, rows = memory.topk(queries, 3, bank=other)
    expected_values, expected_rows = (other @ queries.T).T.topk(3, dim=1)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)
    assert torch.equal(rows, expected_rows)
    with pytest.raises(
        ValueError, match=r"bank must be a tensor of the bank's shape \(20, 8\), got \(19, 8\)"
    ):
        memory.topk(queries, 3, bank=other[:19])


def test_memory_bank_argument_errors():
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D tensor"):
        MemoryBank(torch.zeros(0, dtype=torch.long), 8, temperature=0.1)
    with pytest.raises(TypeError, match="dtype must be one of"):
        MemoryBank(torch.zeros(4, dtype=torch.long), 8, temperature=0.1, dtype=torch.float64)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            MemoryBank(torch.zeros(4, dtype=torch.long), 8, temperature=bad)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
            MemoryBank(torch.zeros(4, dtype=torch.long), 8, temperature=0.1, momentum=bad)
    with pytest.raises(ValueError, match="dim must be an int >= 1, got 0"):
        MemoryBank(torch.zeros(4, dtype=torch.long), 0, temperature=0.1)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        MemoryBank(torch.zeros(4), 8, temperature=0.1)
    memory = MemoryBank(torch.zeros(4, dtype=torch.long), 8, temperature=0.1)
    with pytest.raises(ValueError, match=r"bank's shape \(4, 8\), got \(3, 8\)"):
        memory.fill(torch.zeros(3, 8))


def test_state_dict_round_trip_keeps_bank_and_labels():
    source = MemoryBank(torch.arange(30) % 3, 8, temperature=0.1, generator=torch.Generator().manual_seed(1))
    target = MemoryBank(torch.zeros(30, dtype=torch.long), 8, temperature=0.1)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.bank, source.bank) and torch.equal(target.labels, source.labels)


def _original_update(memory: torch.Tensor, features: torch.Tensor, rows: torch.Tensor, momentum: float):
    """The original LinearAverageOp.backward's bank update."""
    mixed = memory[rows] * momentum + features * (1 - momentum)
    memory[rows] = mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5)


def test_criterion_is_a_drop_in_for_the_original_pair():
    """Same loss, same feature gradient, and the bank updated after backward as the original."""
    dim, size, temperature, momentum, margin = 16, 60, 0.1, 0.5, 0.2
    labels = torch.arange(size) % 6
    criterion = SNCACriterion(dim, labels, temperature, momentum, margin=margin / temperature)
    original_memory = criterion.memory.bank.clone()
    rows = torch.tensor([3, 17, 42, 59, 0])
    for step in range(3):  # several steps: the bank must evolve the same way
        base = _features(5, dim, 10 + step)
        ours_features = base.clone().requires_grad_(True)
        theirs_features = base.clone().requires_grad_(True)
        ours = criterion(ours_features, indices=rows)
        bank_before_backward = criterion.memory.bank.clone()
        theirs = snca_loss_original(
            theirs_features, rows, original_memory, labels, temperature, margin=margin / temperature
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert torch.equal(criterion.memory.bank, bank_before_backward), "the bank changed before backward"
        ours.backward()
        theirs.backward()
        _original_update(original_memory, base, rows, momentum)
        torch.testing.assert_close(ours_features.grad, theirs_features.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(criterion.memory.bank, original_memory, rtol=1e-5, atol=1e-6)


def test_criterion_does_not_update_without_gradient():
    criterion = SNCACriterion(8, torch.arange(12) % 3, 0.1, 0.5)
    before = criterion.memory.bank.clone()
    with torch.no_grad():
        criterion(_features(4, 8, 0), indices=torch.arange(4))
    criterion(_features(4, 8, 0), indices=torch.arange(4))  # features without requires_grad
    assert torch.equal(criterion.memory.bank, before)


class _Parent(nn.Module):
    """A model holding a bank, as a LightningModule or a user's own module does."""

    def __init__(self, memory: MemoryBank) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.memory = memory


BANK_KINDS = {"MemoryBank": MemoryBank, "ShardedMemoryBank": ShardedMemoryBank}


def _trained_parent(kind: str) -> _Parent:
    """A parent whose bank differs from its initialisation (labels and rows both matter)."""
    memory = BANK_KINDS[kind](
        torch.arange(30) % 3, 8, temperature=0.1, generator=torch.Generator().manual_seed(1)
    )
    memory.update(_features(6, 8, 2), torch.tensor([0, 5, 11, 17, 23, 29]), momentum=0.0)
    return _Parent(memory)


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("loaded_kind", list(BANK_KINDS))
@pytest.mark.parametrize("saved_kind", list(BANK_KINDS))
def test_a_parent_module_saves_and_loads_its_bank(saved_kind, loaded_kind):
    """The bank's rows and labels travel in the parent's state_dict under the same keys for both
    kinds (one process: the sharded bank's collectives are the identity), so either loads either."""
    source = _trained_parent(saved_kind)
    state = _through_a_file(source.state_dict())
    assert set(state) == {"head.weight", "head.bias", "memory.bank", "memory.labels"}
    target = _Parent(
        BANK_KINDS[loaded_kind](
            torch.zeros(30, dtype=torch.long), 8, temperature=0.1, generator=torch.Generator()
        )
    )
    target.load_state_dict(state)
    assert torch.equal(target.memory.bank, source.memory.bank)
    assert torch.equal(target.memory.labels, source.memory.labels)
    assert torch.equal(target.head.weight, source.head.weight)


def test_a_sharded_rank_loads_its_block_of_the_whole_bank(monkeypatch):
    """Rank 1 of 2 takes rows [15, 30) of a whole saved bank, inside a parent; a bank of another
    size is refused with both shapes named."""
    whole = _trained_parent("MemoryBank").state_dict()
    monkeypatch.setattr(distributed.comm, "rank_world", lambda: (1, 2))
    target = _Parent(ShardedMemoryBank(torch.zeros(30, dtype=torch.long), 8, temperature=0.1))
    assert (target.memory.start, target.memory.end) == (15, 30)
    target.load_state_dict(whole)
    assert torch.equal(target.memory.bank, whole["memory.bank"][15:30])
    assert torch.equal(target.memory.labels, whole["memory.labels"])
    whole["memory.bank"] = whole["memory.bank"][:29]
    with pytest.raises(
        RuntimeError, match=r"memory.bank: .* shape \(29, 8\), expected the whole bank \(30, 8\)"
    ):
        target.load_state_dict(whole)


def test_update_refuses_bad_inputs_naming_the_argument():
    memory = MemoryBank(torch.arange(10) % 3, 8, temperature=0.1)
    before = memory.bank.clone()
    bad_calls = [
        ((torch.randn(2, 7), torch.tensor([0, 1])), ValueError, r"features must be \[b, D=8\]"),
        ((torch.randn(2, 8), torch.tensor([1])), ValueError, r"indices must be \[b=2\]"),
        (
            (torch.randn(2, 8), torch.tensor([0, 10])),
            ValueError,
            r"indices must be bank rows in \[0, N=10\), got 10",
        ),
        (
            (torch.randn(2, 8), torch.tensor([-1, 1])),
            ValueError,
            r"indices must be bank rows in \[0, N=10\), got -1",
        ),
        ((torch.randn(2, 8), torch.tensor([0.0, 1.0])), TypeError, "indices must have an integer dtype"),
    ]
    for args, error, message in bad_calls:
        with pytest.raises(error, match=message):
            memory.update(*args)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1.0"):
        memory.update(torch.randn(2, 8), torch.tensor([0, 1]), momentum=1.0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        momentum_update(memory.bank, torch.tensor([0]), torch.randn(1, 8), 1.5)  # every bank's update
    assert torch.equal(memory.bank, before)


def test_loss_refuses_labels_that_contradict_its_bank():
    """With its own bank the classes come from the bank: wrong labels must not change the loss
    silently (a label no class has, 99, would make every row lose its positives: loss 0)."""
    labels = torch.arange(12) % 3
    criterion = SNCALoss(8, labels, 0.1, 0.5)
    features, rows = _features(4, 8, 1), torch.tensor([0, 4, 8, 11])
    expected = criterion(features, indices=rows)
    assert torch.equal(criterion(features, labels[rows], rows), expected)
    for wrong in (torch.tensor([0, 1, 2, 0]), torch.full((4,), 99)):
        with pytest.raises(ValueError, match="labels must equal the memory bank's labels of indices"):
            criterion(features, wrong, rows)
    with pytest.raises(ValueError, match=r"labels must have one entry per embedding like indices"):
        criterion(features, labels[:3], rows)
    batch_mode = SNCALoss(temperature=0.1)
    with pytest.raises(ValueError, match=r"labels must be \[B=4\], one per embedding, got shape \(3,\)"):
        batch_mode(features, labels[:3])
    with pytest.raises(ValueError, match=r"ref_labels must be \[M=12\]"):
        batch_mode(features, labels[:4], ref_emb=_features(12, 8, 2), ref_labels=labels[:5])


def test_old_criterion_call_still_works_with_a_future_warning():
    labels = torch.arange(12) % 3
    old, new = SNCACriterion(8, labels, 0.1, 0.5), SNCALoss(8, labels, 0.1, 0.5)
    new.memory.bank.copy_(old.memory.bank)
    features, rows = _features(4, 8, 3), torch.tensor([1, 2, 5, 9])
    with pytest.warns(FutureWarning, match=r"SNCALoss\(\.\.\.\)\(features, indices=indices\)"):
        loss = old(features, rows)
    assert torch.equal(loss, new(features, indices=rows))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fresh_rows_put_the_batch_features_in_its_rows_for_the_loss_only(backend):
    """The loss with fresh rows equals the loss against a bank whose batch rows hold the batch's
    features; the stored bank is untouched, and the gradient is that bank's."""
    labels = torch.arange(40) % 4
    memory = MemoryBank(labels, 8, temperature=0.1, momentum=0.9)
    rows = torch.tensor([3, 7, 11, 20, 21, -1])  # same-class batch mates, and a query without a row
    base = _features(6, 8, 5)
    fresh_bank = memory.bank.index_copy(0, rows[:5], base[:5])
    before = memory.bank.clone()
    features = base.clone().requires_grad_()
    loss = memory.loss(features, rows, labels=labels[rows.clamp(min=0)], fresh_rows=True, backend=backend)
    loss.backward()
    assert torch.equal(memory.bank, before), "the stored bank changed"
    expected_features = base.clone().requires_grad_()
    expected = snca_loss_reference(
        expected_features, rows, fresh_bank, labels, 0.1, labels=labels[rows.clamp(min=0)]
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.grad, expected_features.grad, rtol=1e-4, atol=1e-6)
    stale = memory.loss(base, rows, labels=labels[rows.clamp(min=0)], backend=backend)
    assert not torch.allclose(stale, loss), "fresh rows made no difference: the test cannot tell"


def test_fresh_rows_through_the_loss_module_then_the_momentum_update_mixes_the_old_rows():
    labels = torch.arange(24) % 3
    criterion = SNCALoss(8, labels, 0.1, 0.5, fresh_rows=True)
    rows = torch.tensor([0, 3, 6, 1])
    old_rows = criterion.memory.bank[rows].clone()
    features = _features(4, 8, 6).requires_grad_()
    criterion(features, indices=rows).backward()
    expected = F.normalize(0.5 * old_rows + 0.5 * features.detach(), dim=1)
    torch.testing.assert_close(criterion.memory.bank[rows], expected)
