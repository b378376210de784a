"""The core's N-way K-shot episodes (snca_ext.episodes): what an episode holds, seeding, episodes
within one group (Omniglot's alphabets), and the input it refuses."""

from __future__ import annotations

import pytest
import torch

from snca_ext import few_shot_accuracy, sample_episodes

# 12 classes of 20 examples, shuffled; class c is in group c // 4 (three groups of four).
_ORDER = torch.randperm(240, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(12).repeat_interleave(20)[_ORDER]
GROUPS = LABELS // 4


def test_an_episode_holds_distinct_classes_and_disjoint_support_and_query_rows():
    rows = sample_episodes(LABELS, ways=5, shots=2, queries=3, episodes=50, seed=1)
    assert rows.shape == (50, 5, 5)
    for episode in rows:
        classes = LABELS[episode]  # [ways, shots + queries]
        assert bool((classes == classes[:, :1]).all())  # each way's rows are of its class
        assert len(set(classes[:, 0].tolist())) == 5  # distinct classes
        assert len(set(episode.flatten().tolist())) == 25  # no row twice: support and query disjoint


def test_episodes_are_seeded():
    first = sample_episodes(LABELS, ways=4, shots=1, queries=5, episodes=20, seed=3, groups=GROUPS)
    again = sample_episodes(LABELS, ways=4, shots=1, queries=5, episodes=20, seed=3, groups=GROUPS)
    other = sample_episodes(LABELS, ways=4, shots=1, queries=5, episodes=20, seed=4, groups=GROUPS)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_grouped_episodes_draw_their_classes_from_one_eligible_group():
    # Group 2 keeps only two classes with 20 examples: too small for 3-way episodes.
    keep = ~torch.isin(LABELS, torch.tensor([10, 11]))
    labels, groups = LABELS[keep], GROUPS[keep]
    rows = sample_episodes(labels, ways=3, shots=1, queries=4, episodes=300, seed=0, groups=groups)
    per_episode = groups[rows[:, :, 0]]  # [episodes, ways]
    assert bool((per_episode == per_episode[:, :1]).all())
    assert set(per_episode[:, 0].tolist()) == {0, 1}  # both eligible groups, never group 2
    ungrouped = sample_episodes(labels, ways=3, shots=1, queries=4, episodes=300, seed=0)
    mixed = groups[ungrouped[:, :, 0]]
    assert bool((mixed != mixed[:, :1]).any())  # without groups, episodes mix them


def test_within_group_accuracy_sees_only_the_distinctions_inside_a_group():
    # A class's feature says its place inside its group (c % 4), not the group: classes of one
    # group are told apart perfectly, classes of different groups at the same place are identical.
    features = torch.eye(4, dtype=torch.float64)[LABELS % 4]
    within = few_shot_accuracy(features, LABELS, ways=4, shots=1, queries=5, episodes=200, groups=GROUPS)
    across = few_shot_accuracy(features, LABELS, ways=4, shots=1, queries=5, episodes=200)
    assert within.mean == 100.0 and within.ci95 == 0.0 and within.within_groups
    assert across.mean < 90.0 and not across.within_groups
    assert "classes of one group" in str(within) and "group" not in str(across)


def test_bad_groups_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"need a group with 5 classes.*the largest has 4"):
        sample_episodes(LABELS, ways=5, shots=1, queries=1, episodes=1, groups=GROUPS)
    split_class = GROUPS.clone()
    split_class[(LABELS == 7).nonzero()[0]] = 0  # one example of class 7 in another group
    with pytest.raises(ValueError, match="class 7 has"):
        sample_episodes(LABELS, ways=2, shots=1, queries=1, episodes=1, groups=split_class)
    with pytest.raises(ValueError, match="one group id per example"):
        sample_episodes(LABELS, ways=2, shots=1, queries=1, episodes=1, groups=GROUPS[:12])
    with pytest.raises(ValueError, match="integer dtype"):
        sample_episodes(LABELS, ways=2, shots=1, queries=1, episodes=1, groups=GROUPS.float())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ways=1), "ways must be an int >= 2"),
        (dict(shots=0), "shots must be an int >= 1"),
        (dict(queries=True), "queries must be an int >= 1"),
        (dict(episodes=0), "episodes must be an int >= 1"),
        (dict(shots=15, queries=6), "needs 5 classes with at least 21 examples"),
    ],
)
def test_bad_counts_are_refused_naming_the_argument(kwargs, message):
    arguments = {**dict(ways=5, shots=1, queries=1, episodes=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_episodes(LABELS, **arguments)
