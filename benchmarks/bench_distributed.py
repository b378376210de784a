"""Time per step, bank memory per rank and bytes moved by collectives, for 1 and 2 gloo ranks.

    python -m benchmarks.bench_distributed                      N = 1,281,167, D = 128, B = 64
    python -m benchmarks.bench_distributed --batch 256 --worlds 1 2 4 --json out.json

One step is the bank's share of a training step: the SNCA loss of the global batch of B random
unit features (B / W per rank) against the N-row bank, its backward, and the momentum update of
the batch's rows, for one process (``MemoryBank``), W ranks with a replicated bank
(``ReplicatedMemoryBank``) and W ranks with a sharded one (``ShardedMemoryBank``). The network
and DDP's gradient all-reduce (model-dependent: 4 bytes per parameter) are left out. Ranks are
processes on this machine talking over gloo on 127.0.0.1 with one thread each, so at W = 2 on two
cores the machine is fully used. Bytes are counted at the collective calls on rank 0: for an
all-gather what the rank receives, for an all-reduce the size of the reduced buffer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn import functional as F

IMAGENET_TRAIN_SIZE = 1_281_167
ROOT = Path(__file__).resolve().parents[1]


def predicted_bytes(mode: str, batch: int, dim: int, world: int, feature_bytes: int = 4) -> int:
    """Bytes per step per rank of the bank's collectives (payload, not the transport's overhead).

    replicated: all-gather of the batch's features and rows for the update: B (f D + 8), plus the
    row counts (8 W). sharded: the same all-gather of features,
    rows and labels for the loss (B (f D + 16)), all-reduce MAX of the [2, B] log-sum-exps and SUM
    of the [2, B, D + 1] rescaled sums and accumulators, and the update's all-gather again.
    The training loop adds 12 bytes (the loss for the log, the stop flag) and DDP's gradients.
    """
    if world == 1:
        return 0
    counts = 8 * world
    update = batch * (feature_bytes * dim + 8) + counts
    if mode == "replicated":
        return update
    loss = batch * (feature_bytes * dim + 16) + counts + 2 * batch * feature_bytes * (1 + dim + 1)
    return loss + update


def _count_bytes() -> dict[str, int]:
    """Wraps torch.distributed's all_reduce / all_gather to count the bytes they move here."""
    counted = {"all_reduce": 0, "all_gather": 0}
    all_reduce, all_gather = torch_dist.all_reduce, torch_dist.all_gather

    def counting_all_reduce(tensor, *args, **kwargs):
        counted["all_reduce"] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counting_all_gather(outputs, tensor, *args, **kwargs):
        counted["all_gather"] += sum(t.numel() * t.element_size() for t in outputs)
        return all_gather(outputs, tensor, *args, **kwargs)

    torch_dist.all_reduce, torch_dist.all_gather = counting_all_reduce, counting_all_gather
    return counted


def _rank_main(config: dict) -> None:
    from snca_ext import distributed
    from snca_ext.memory import MemoryBank

    torch.set_num_threads(1)
    mode, world, size, dim, batch = (config[k] for k in ("mode", "world", "size", "dim", "batch"))
    labels = torch.randint(0, 1000, (size,), generator=torch.Generator().manual_seed(0))
    common = {"temperature": 0.05, "momentum": 0.5, "generator": torch.Generator().manual_seed(1)}
    rank = 0
    if mode == "single":
        memory = MemoryBank(labels, dim, **common)
    else:
        env = distributed.init_from_env("cpu", timeout_s=1800)
        rank = env.rank
        memory = distributed.memory_bank_class(env, mode == "sharded")(labels, dim, **common)
    counted = _count_bytes()
    per_rank = batch // world
    generator = torch.Generator().manual_seed(2)
    times = []
    for step in range(config["warmup"] + config["steps"]):
        features = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        indices = torch.randperm(size, generator=generator)[:batch]
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        local = features[mine].clone().requires_grad_(True)
        if step == config["warmup"]:
            counted.update(all_reduce=0, all_gather=0)
        started = time.perf_counter()
        memory.loss(local, indices[mine]).backward()
        memory.update(local.detach(), indices[mine])
        times.append(time.perf_counter() - started)
    moved = {key: value // config["steps"] for key, value in counted.items()}
    if mode != "single":
        times_tensor = torch.tensor(times[config["warmup"] :], dtype=torch.float64)
        # The step takes as long as the slowest rank.
        torch_dist.all_reduce(times_tensor, op=torch_dist.ReduceOp.MAX)
        timed = times_tensor.tolist()
    else:
        timed = times[config["warmup"] :]
    if rank == 0:
        result = {
            **config,
            "step_s_median": statistics.median(timed),
            "step_s_min": min(timed),
            "bank_mb_per_rank": memory.bank.numel() * memory.bank.element_size() / 1e6,
            "labels_mb_per_rank": memory.labels.numel() * memory.labels.element_size() / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "bytes_per_step": moved["all_reduce"] + moved["all_gather"],
            "bytes_predicted": predicted_bytes(mode, batch, dim, world),
        }
        Path(config["result"]).write_text(json.dumps(result))
    if mode != "single":
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(config: dict) -> dict:
    world = 1 if config["mode"] == "single" else config["world"]
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = {**config, "result": str(Path(folder) / "result.json")}
        processes = []
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
            }
            command = [
                sys.executable,
                "-m",
                "benchmarks.bench_distributed",
                "--rank-config",
                json.dumps(config),
            ]
            processes.append(subprocess.Popen(command, env=env, cwd=ROOT))
        codes = [process.wait() for process in processes]
        if any(codes):
            raise RuntimeError(f"{config['mode']} W={world}: ranks exited with {codes}")
        return json.loads(Path(config["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=IMAGENET_TRAIN_SIZE, help="bank rows N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="global batch B")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="rank counts besides 1")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--rank-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_config:
        _rank_main(json.loads(args.rank_config))
        return
    base = {
        "size": args.size,
        "dim": args.dim,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    configs = [{**base, "mode": "single", "world": 1}]
    for world in args.worlds:
        configs += [{**base, "mode": mode, "world": world} for mode in ("replicated", "sharded")]
    print(f"N = {args.size:,}, D = {args.dim}, global batch B = {args.batch}, gloo, 1 thread per rank")
    print("| bank | ranks | time / step (median) | bank MB / rank | peak RSS MB / rank | bytes / step / rank "
          "(measured, predicted) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rows = []
    for config in configs:
        row = _launch(config)
        rows.append(row)
        print(
            f"| {row['mode']} | {row['world']} | {row['step_s_median']:.2f} s "
            f"| {row['bank_mb_per_rank']:.0f} | {row['peak_rss_mb']:.0f} "
            f"| {row['bytes_per_step']:,} ({row['bytes_predicted']:,}) |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
