"""What every data set of the applications is made of: examples that yield
``(image, label, index)`` (the index is the example's row in the memory bank), class subsets, and
the ``DataBundle`` that training needs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` to yield ``(image, label, index)``."""

    def __init__(self, dataset: Dataset, targets: Tensor) -> None:
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


class RelabelledDataset(IndexedDataset):
    """The examples of ``parent`` with every label ``y`` replaced by ``label_of[y]`` (e.g. a fine
    class by its coarse class); indices unchanged."""

    def __init__(self, parent: IndexedDataset, label_of: Tensor) -> None:
        super().__init__(parent.dataset, label_of[parent.targets])
        self.parent = parent
        self.label_of = label_of

    def __getitem__(self, index: int):
        image, label, position = self.parent[index]
        return image, int(self.label_of[label]), position


class ClassSubset(IndexedDataset):
    """The examples of ``parent`` at ``rows``, yielding ``(image, label, position in the subset)``
    (so the position is the bank row); ``rows[position]`` is the example's index in ``parent``.
    Labels keep their class ids."""

    def __init__(self, parent: IndexedDataset, rows: Tensor) -> None:
        super().__init__(Subset(parent.dataset, rows.tolist()), parent.targets[rows])
        self.parent = parent
        self.rows = rows


def with_transform(dataset, transform):
    """The same torchvision dataset (images shared, not re-read) with another transform."""
    from torchvision.datasets.vision import StandardTransform

    other = copy.copy(dataset)
    other.transform = transform
    other.transforms = StandardTransform(transform, getattr(dataset, "target_transform", None))
    return other


@dataclass
class DataBundle:
    """What training needs: the augmented training set, the same images with the test transform
    (to recompute the bank), the test set, the bank labels and the class count."""

    train: IndexedDataset
    train_plain: IndexedDataset
    test: IndexedDataset
    num_classes: int
    # Where the classes group into coarser ones (CIFAR-100's 20 superclasses, a grouping of
    # Fashion-MNIST): coarse_of[class] is its coarse class, coarse_classes their names.
    coarse_of: Tensor | None = None
    coarse_classes: list[str] | None = None
    # The class names, where the data set has them (Omniglot's "Alphabet/characterNN").
    classes: list[str] | None = None
    # The classes the data set itself leaves out of training (Omniglot's alphabets of splits not
    # trained on, or held out by name): the run's novel classes, beside --holdout-classes.
    novel_classes: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        """The image channels (1 for grey, 3 for colour), read from the first test image."""
        return int(self.test[0][0].shape[0])

    @property
    def train_labels(self) -> Tensor:
        return self.train.targets

    def select_classes(self, classes: Sequence[int]) -> DataBundle:
        """The same data restricted to the examples of ``classes`` (train, train_plain and test),
        with the class ids, ``num_classes``, class names and coarse classes unchanged; yielded
        indices are positions in the subset (``ClassSubset.rows`` maps them back)."""
        wanted = torch.tensor(sorted(set(classes)), dtype=torch.long)
        bad = [c for c in wanted.tolist() if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(f"class ids must be in [0, {self.num_classes}), got {bad}")

        def subset(dataset: IndexedDataset) -> ClassSubset:
            return ClassSubset(dataset, torch.isin(dataset.targets, wanted).nonzero().flatten())

        return DataBundle(
            train=subset(self.train),
            train_plain=subset(self.train_plain),
            test=subset(self.test),
            num_classes=self.num_classes,
            coarse_of=self.coarse_of,
            coarse_classes=self.coarse_classes,
            classes=self.classes,
        )

    def coarse(self) -> DataBundle:
        """The same examples labelled with their coarse classes (``coarse_of``)."""
        if self.coarse_of is None:
            raise DataError("this data set has no coarse labels (cifar100 and fashion-mnist have)")
        count = int(self.coarse_of.max()) + 1
        return DataBundle(
            train=RelabelledDataset(self.train, self.coarse_of),
            train_plain=RelabelledDataset(self.train_plain, self.coarse_of),
            test=RelabelledDataset(self.test, self.coarse_of),
            num_classes=count,
        )

    def limit(self, train: int | None = None, test: int | None = None) -> DataBundle:
        """The first ``train`` training examples (the same in ``train_plain``) and the first ``test``
        test examples (None: all), for quick runs; yielded indices are positions in the subset."""

        def first(dataset: IndexedDataset, count: int | None) -> IndexedDataset:
            if count is None or count >= len(dataset):
                return dataset
            return ClassSubset(dataset, torch.arange(count))

        return DataBundle(
            train=first(self.train, train),
            train_plain=first(self.train_plain, train),
            test=first(self.test, test),
            num_classes=self.num_classes,
            coarse_of=self.coarse_of,
            coarse_classes=self.coarse_classes,
            classes=self.classes,
            novel_classes=self.novel_classes,
        )

    def split_holdout(self, holdout: Sequence[int]) -> tuple[DataBundle, DataBundle]:
        """``(seen, novel)``: the bundle without the ``holdout`` classes (to train on) and the
        bundle of only those (the novel-class evaluation)."""
        held = set(holdout)
        seen = [c for c in range(self.num_classes) if c not in held]
        return self.select_classes(seen), self.select_classes(sorted(held))
