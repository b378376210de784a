"""Novel-class evaluation: N-way K-shot episodes on any feature matrix, and
``python -m snca_ext.train --holdout-classes`` with the SNCA loss and the softmax baseline."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from snca_ext import few_shot_accuracy, sample_episodes
from snca_ext.apps import fewshot
from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.export import run as export
from snca_ext.apps.feature_files import load_features
from snca_ext.apps.train.cli import EXIT_OK, EXIT_USAGE
from snca_ext.apps.train.cli import run as train

FAST = ["--threads", "1", "--no-progress"]


# ----------------------------------------------------------------------------- episodes


def _clusters(classes: int, per_class: int, dim: int = 16, noise: float = 0.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def test_episodes_sample_distinct_classes_and_disjoint_rows():
    labels = torch.arange(7).repeat_interleave(25)[
        torch.randperm(175, generator=torch.Generator().manual_seed(1))
    ]
    rows = sample_episodes(labels, ways=5, shots=3, queries=4, episodes=50, seed=3)
    assert rows.shape == (50, 5, 7)
    for episode in rows:
        classes = labels[episode]
        assert (classes == classes[:, :1]).all()  # each way is one class
        assert len(set(classes[:, 0].tolist())) == 5  # distinct classes
        assert len(set(episode.flatten().tolist())) == 35  # no row twice
    assert torch.equal(rows, sample_episodes(labels, ways=5, shots=3, queries=4, episodes=50, seed=3))
    assert not torch.equal(rows, sample_episodes(labels, ways=5, shots=3, queries=4, episodes=50, seed=4))
    # Every class gets chosen, not only the first ones.
    assert set(labels[rows[:, :, 0]].flatten().tolist()) == set(range(7))


def test_separated_classes_score_100_and_random_features_score_chance():
    features, labels = _clusters(6, 30, noise=0.01)
    perfect = few_shot_accuracy(features, labels, ways=5, shots=1, episodes=100)
    assert perfect.mean == 100.0 and perfect.ci95 == 0.0
    noise = torch.randn(600, 32, generator=torch.Generator().manual_seed(0))
    chance = few_shot_accuracy(noise, torch.arange(10).repeat(60), ways=5, shots=5, episodes=2000)
    assert abs(chance.mean - 20.0) < 4 * chance.ci95 / 1.96 + 0.5
    assert 0 < chance.ci95 < 2


def test_one_shot_is_nearest_neighbour_and_the_interval_is_1_96_standard_errors():
    features, labels = _clusters(8, 20, noise=1.2, seed=2)
    result = few_shot_accuracy(features, labels, ways=5, shots=1, queries=6, episodes=300, seed=7)
    rows = sample_episodes(labels, ways=5, shots=1, queries=6, episodes=300, seed=7)
    unit = F.normalize(features.double(), dim=1)
    per_episode = []
    for episode in rows:
        support, query = unit[episode[:, 0]], unit[episode[:, 1:]]
        nearest = (query @ support.T).argmax(dim=-1)  # [ways, queries]: 1-NN among the supports
        per_episode.append(float((nearest == torch.arange(5)[:, None]).double().mean()) * 100)
    accuracy = torch.tensor(per_episode, dtype=torch.float64)
    assert result.mean == pytest.approx(float(accuracy.mean()))
    assert result.ci95 == pytest.approx(1.959964 * float(accuracy.std()) / math.sqrt(300))
    assert 30 < result.mean < 100  # the noise makes it a real test of the rule


def test_more_shots_help_on_noisy_clusters():
    features, labels = _clusters(10, 40, noise=1.0, seed=5)
    one = few_shot_accuracy(features, labels, ways=5, shots=1, episodes=400)
    five = few_shot_accuracy(features, labels, ways=5, shots=5, episodes=400)
    assert five.mean > one.mean + 5


def test_bad_episode_requests_are_refused():
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 5)
    with pytest.raises(ValueError, match="only 2 of the 3 classes have that many"):
        sample_episodes(labels, ways=3, shots=5, queries=15, episodes=1)
    with pytest.raises(ValueError, match="ways must be an int >= 2"):
        sample_episodes(labels, ways=1, shots=1, queries=1, episodes=1)
    with pytest.raises(ValueError, match="features must be"):
        few_shot_accuracy(torch.randn(10, 4), labels, ways=2)
    features = torch.randn(len(labels), 4)
    with pytest.raises(ValueError, match="labels must have an integer dtype"):
        few_shot_accuracy(features, labels.float(), ways=2)
    with pytest.raises(ValueError, match=r"D >= 1, got shape \(65, 0\)"):
        few_shot_accuracy(features[:, :0], labels, ways=2)
    features[7, 2] = float("nan")
    with pytest.raises(ValueError, match="features must be finite, row 7 is not"):
        few_shot_accuracy(features, labels, ways=2)


# ----------------------------------------------------------------------------- holdout training


@pytest.fixture
def runs(holdout_runs) -> dict[str, Path]:
    """The session's holdout runs (tests/apps/conftest.py), one per loss."""
    return holdout_runs


@pytest.mark.parametrize("loss", ["snca", "softmax"])
def test_holdout_trains_on_the_other_classes_and_reports_the_novel_ones(runs, untrained_holdout, loss):
    summary = json.loads((runs[loss] / "summary.json").read_text())
    untrained = untrained_holdout[loss]
    # It learns. kNN cannot tell here: random features of the untrained network already give about
    # 98% on five digit classes. The loss falls to well under half its first epoch's mean (with
    # no optimizer step it stays within a few %), the memory bank votes far above chance (20%;
    # a bank never updated votes at chance), and softmax's head beats the untrained head (chance).
    with open(runs[loss] / "metrics.csv") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    assert losses[-1] < 0.3 * losses[0], losses
    assert summary["knn_memory_bank"]["top1"] > 60
    if loss == "softmax":
        assert summary["classifier_head"]["top1"] > untrained["head_top1"] + 30, untrained
    state = load_checkpoint(runs[loss] / "checkpoint.pt")
    assert state["args"]["holdout_classes"] == "5,6,7,8,9" and state["args"]["loss"] == loss
    labels = state["memory"]["labels"]
    assert len(labels) == 675 and set(labels.tolist()) == {0, 1, 2, 3, 4}  # no held-out image trained on
    has_head = "classifier.weight" in state["model"]
    assert has_head == (loss == "softmax")
    if has_head:
        assert state["model"]["classifier.weight"].shape == (5, 128)
    assert summary["loss"] == loss and summary["test_examples"] == 226 and summary["top1"] > 85
    novel = summary["novel_classes"]
    assert novel["classes"] == [5, 6, 7, 8, 9] and novel["bank_size"] == 672 and novel["test_examples"] == 224
    assert novel["knn_top1"] > 45  # chance is 20%: the features order unseen digits
    one, five = novel["fewshot"]
    assert (one["ways"], one["shots"], one["episodes"], five["shots"]) == (5, 1, 200, 5)
    assert 25 < one["mean"] <= 100 and five["mean"] > one["mean"] and 0 < one["ci95"] < 5


def test_evaluate_repeats_the_novel_class_numbers_from_the_checkpoint(runs, capsys):
    summary = json.loads((runs["snca"] / "summary.json").read_text())["novel_classes"]
    capsys.readouterr()
    argv = ["-e", "--resume", str(runs["snca"] / "checkpoint.pt"), "--fewshot-episodes", "200", *FAST]
    assert train(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert f"top-1 {summary['knn_top1']:.2f}%" in out
    assert f"5-way 5-shot (200 episodes, nearest class mean): {summary['fewshot'][1]['mean']:.2f}%" in out


def test_fewshot_command_on_exported_features(runs, tmp_path, capsys):
    features = tmp_path / "novel.safetensors"
    checkpoint = str(runs["snca"] / "checkpoint.pt")
    assert (
        export(["--checkpoint", checkpoint, "--classes", "novel", "--out", str(features), "--no-progress"])
        == 0
    )
    capsys.readouterr()
    assert fewshot.run([str(features), "--episodes", "100", "--shots", "1"]) == 0
    line = capsys.readouterr().out.strip()
    exported = load_features(features)
    expected = few_shot_accuracy(exported["features"], exported["labels"], ways=5, shots=1, episodes=100)
    assert line == str(expected) and line.startswith("5-way 1-shot (15 queries/class, 100 episodes): ")
    assert fewshot.run([str(features), "--ways", "6"]) == 2  # only 5 novel classes
    broken = tmp_path / "broken.safetensors"
    header = b'{"features": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}}'
    broken.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    capsys.readouterr()
    assert fewshot.run([str(broken)]) == 2
    assert "malformed safetensors header: tensor 'features'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10", "must name at least 2 of the 10 class ids"),
        ("1,2,3,4,5,6,7,8,9", "leave at least 2 to train on"),
        ("3", "must name at least 2"),
    ],
)
def test_bad_holdout_exits_2(tmp_path, capsys, value, message):
    assert train(["--out", str(tmp_path), "--holdout-classes", value, *FAST]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_holdout_classes_must_be_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(["--out", str(tmp_path), "--holdout-classes", "5,six", *FAST])
    assert exit_info.value.code == 2 and "comma-separated class ids" in capsys.readouterr().err
