"""What fraction of an SNCA training step the fused op takes at ImageNet size, with a ResNet18.

    python -m benchmarks.bench_train_step                   N = 1,281,167, D = 128, ResNet18 224 x 224
    python -m benchmarks.bench_train_step --batch 256 --device cuda

One step is what ``python -m snca_ext.train`` does per batch: ResNet18 forward on random
224 x 224 images, the SNCA loss against an N-row bank (``snca_ext.snca_loss``), backward, an SGD
step and the momentum update of the batch's bank rows. The op alone is timed on the same features
(loss forward + backward). Both are linear in the batch size, so the fraction barely depends on it;
the CPU default batch is smaller only to keep the run short. Prints a table and, with ``--json``,
writes the numbers. Not a training run: weights, images and bank are random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

import snca_ext
from snca_ext.apps.models import build_model
from snca_ext.memory import MemoryBank

IMAGENET_TRAIN_SIZE = 1_281_167


def _timed(step: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    synchronise()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        synchronise()
        times.append(time.perf_counter() - started)
    return times


def measure(
    batch: int,
    bank_rows: int = IMAGENET_TRAIN_SIZE,
    *,
    arch: str = "resnet18",
    dim: int = 128,
    image_size: int = 224,
    classes: int = 1000,
    temperature: float = 0.05,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Median seconds of a full training step and of the fused op (forward + backward) in it."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(arch, dim).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    labels = torch.randint(0, classes, (bank_rows,), generator=generator)
    memory = MemoryBank(labels, dim, temperature=temperature, device=device, generator=generator)
    memory.fill(F.normalize(memory.bank.float(), dim=1))  # trained banks hold unit rows
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    indices = torch.randperm(bank_rows, generator=generator)[:batch].to(device)

    def train_step() -> None:
        features = model(images)
        loss = memory.loss(features, indices, backend=backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        memory.update(features.detach(), indices)

    with torch.no_grad():
        fixed_features = model(images).detach()

    def op_step() -> None:
        features = fixed_features.clone().requires_grad_(True)
        memory.loss(features, indices, backend=backend).backward()

    step_times = _timed(train_step, device, repeats, warmup)
    op_times = _timed(op_step, device, repeats, warmup)
    step_seconds, op_seconds = statistics.median(step_times), statistics.median(op_times)
    return {
        "device": str(device),
        "backend": snca_ext.available_backends(device)[0] if backend == "auto" else backend,
        "threads": torch.get_num_threads(),
        "arch": arch,
        "batch": batch,
        "bank_rows": bank_rows,
        "dim": dim,
        "step_seconds": step_seconds,
        "op_seconds": op_seconds,
        "op_fraction": op_seconds / step_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch", type=int, help="batch size (default: 256 on CUDA, 32 on CPU)")
    parser.add_argument("--bank-rows", type=int, default=IMAGENET_TRAIN_SIZE, help="N (ImageNet train)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    result = measure(
        batch,
        args.bank_rows,
        arch=args.arch,
        device=device,
        backend=args.backend,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(
        f"{result['arch']} step, B={batch}, N={result['bank_rows']:,}, D={result['dim']}, "
        f"{result['device']} ({result['threads']} threads), op backend {result['backend']}:\n"
        f"  full training step  {result['step_seconds']:8.3f} s (median of {args.repeats})\n"
        f"  fused op fwd+bwd    {result['op_seconds']:8.3f} s\n"
        f"  op fraction         {100 * result['op_fraction']:8.1f} %"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
