"""The one loop that runs a network over a data set: used by the bank recomputation and the kNN
evaluation of training, the novel-class evaluation, ``export`` and ``neighbors``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def iter_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    logits: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(features [b, D] float32 on device, labels [b])`` of ``dataset``'s examples (which yield
    ``(image, label, index)``) in the dataset's order, ``batch_size`` at a time; with ``logits``
    the classifier head's logits instead of the features. The model runs in eval mode and is put
    back in the mode it was in."""
    from tqdm.auto import tqdm

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        for images, labels, _ in tqdm(loader, desc=desc, leave=False, disable=None if progress else True):
            images = images.to(device, non_blocking=True)
            outputs = model(images, logits=True)[1] if logits else model(images)
            yield outputs.float(), labels
    finally:
        model.train(was_training)


def compute_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
    dim: int | None = None,
    logits: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(features [N, D] on device, labels [N] on device)`` of every example of ``dataset``, row i
    for the dataset's example i. An empty dataset gives [0, dim] (``dim`` must then be given)."""
    features, labels = [], []
    for batch, batch_labels in iter_features(
        model, dataset, device, batch_size=batch_size, workers=workers, progress=progress, logits=logits
    ):
        features.append(batch)
        labels.append(batch_labels.to(device))
    if not features:
        if dim is None:
            raise ValueError("cannot compute features of an empty dataset without knowing their dim")
        return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)
