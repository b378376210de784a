"""Distributed SNCA on gloo with 2 CPU processes: the replicated and the sharded bank against the
single-process op, banks across ranks, a rank that dies, and a 2-rank digits run via torchrun.

The ranks are real processes (this file run as a script with torchrun's environment variables);
they save what they computed and the assertions run here, against the single-process op. Every
wait is bounded, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import snca_ext
from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.train.cli import EXIT_OK, EXIT_USAGE, run
from snca_ext.apps.train.signals import exit_after_peer_failure
from snca_ext.memory import MemoryBank

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
# Per rank: unequal batch sizes (the all-gathers pad), an odd bank (unequal blocks 19 / 18).
BATCH = (6, 5)
N, D, CLASSES, T = 37, 7, 4, 0.1
TOPK = (5, 25)  # 25 > a block's 18-19 rows: the padded merge
STEPS = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(rank: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": str(ROOT),
    }


def _launch(scenario: str, out: Path, timeout: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Runs this file as ``WORLD`` ranks of ``scenario``; kills them all past ``timeout``. Each
    result's ``seconds`` is how long that rank ran."""
    port, started = _free_port(), time.monotonic()
    logs = [(out / f"rank{rank}.out", out / f"rank{rank}.err") for rank in range(WORLD)]
    processes = []
    for rank, (stdout, stderr) in enumerate(logs):
        with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
            processes.append(
                subprocess.Popen(
                    [sys.executable, __file__, scenario, str(out)],
                    env=_env(rank, port),
                    stdout=out_file,
                    stderr=err_file,
                )
            )
    seconds: list[float | None] = [None] * WORLD
    try:
        while None in seconds and time.monotonic() - started < timeout:
            for rank, process in enumerate(processes):
                if seconds[rank] is None and process.poll() is not None:
                    seconds[rank] = time.monotonic() - started
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    results = []
    for process, (stdout, stderr), took in zip(processes, logs, seconds, strict=True):
        result = subprocess.CompletedProcess(
            process.args, process.returncode, stdout.read_text(), stderr.read_text()
        )
        result.seconds = took  # None: killed at the timeout
        results.append(result)
    return results


# ----------------------------------------------------------------------------- shared data


def _problem(dtype: torch.dtype):
    """The global batch and bank, identical on every rank and in the test process."""
    generator = torch.Generator().manual_seed(7)
    bank = F.normalize(torch.randn(N, D, generator=generator, dtype=torch.float64), dim=1)
    bank[30] = bank[3]  # a tie across the two blocks: the lower row must win
    bank_labels = torch.randint(0, CLASSES - 1, (N,), generator=generator)
    bank_labels[36] = CLASSES - 1  # class 3: one row, on rank 1 only
    total = sum(BATCH)
    features = F.normalize(torch.randn(total, D, generator=generator, dtype=torch.float64), dim=1)
    features[0] = bank[3]
    indices = torch.randperm(N, generator=generator)[:total]
    indices[1] = 36  # its class has no other row: no positive, lse_same = -inf
    indices[2] = -1  # no bank row
    indices[7] = 3  # same-class rows only... on both blocks; excluded row on rank 0
    labels = bank_labels[indices.clamp(min=0)]
    labels[2] = CLASSES - 1  # no own row; its single positive (row 36) lives on rank 1
    return features.to(dtype), indices, bank.to(dtype), bank_labels, labels


def _rank_slice(rank: int) -> slice:
    return slice(sum(BATCH[:rank]), sum(BATCH[: rank + 1]))


def _steps():
    """Features and rows of STEPS global batches (distinct rows within a batch)."""
    generator = torch.Generator().manual_seed(11)
    total = sum(BATCH)
    return [
        (
            F.normalize(torch.randn(total, D, generator=generator), dim=1),
            torch.randperm(N, generator=generator)[:total],
        )
        for _ in range(STEPS)
    ]


# ----------------------------------------------------------------------------- rank side


def _rank_ops(out: Path) -> None:
    from snca_ext import distributed as sd

    env = sd.init_from_env("cpu", timeout_s=60)
    rank, mine = env.rank, _rank_slice(env.rank)
    saved = {}
    for dtype in (torch.float64, torch.float32):
        features, indices, bank, bank_labels, labels = _problem(dtype)
        start, end = sd.shard_range(N, rank, WORLD)
        name = str(dtype).removeprefix("torch.")
        for mode in ("replicated", "sharded"):
            local = features[mine].clone().requires_grad_(True)
            if mode == "replicated":
                lse_same, lse_other, _, _ = snca_ext.snca_stats(
                    local, indices[mine], bank, bank_labels, T, labels=labels[mine]
                )
                loss = snca_ext.loss_from_lse(lse_same, lse_other)
            else:
                lse_same, lse_other = sd.sharded_snca_stats(
                    local, indices[mine], bank[start:end], bank_labels[start:end], T,
                    labels=labels[mine], start=start,
                )  # fmt: skip
                loss = snca_ext.loss_from_lse(lse_same, lse_other)
            loss.backward()
            saved[f"{name}/{mode}"] = {
                "lse_same": lse_same.detach(),
                "lse_other": lse_other.detach(),
                "loss": loss.detach(),
                "grad": local.grad,
            }
        # A second derivative through the sharded combine is refused, never silently wrong.
        local = features[mine].clone().requires_grad_(True)
        lse_same, lse_other = sd.sharded_snca_stats(
            local, indices[mine], bank[start:end], bank_labels[start:end], T, labels=labels[mine], start=start
        )
        (first,) = torch.autograd.grad(snca_ext.loss_from_lse(lse_same, lse_other), local, create_graph=True)
        try:
            first.square().sum().backward()
            saved[f"{name}/second_order"] = "no error"
        except RuntimeError as error:
            saved[f"{name}/second_order"] = str(error)
        for k in TOPK:
            exclude = indices[mine]
            values, rows = sd.sharded_topk(features[mine], bank[start:end], k, start=start, exclude=exclude)
            saved[f"{name}/topk{k}"] = {"values": values, "rows": rows}
    torch.save(saved, out / f"ops{rank}.pt")
    sd.shutdown()


def _rank_banks(out: Path) -> None:
    from snca_ext import distributed as sd

    env = sd.init_from_env("cpu", timeout_s=60)
    labels = _problem(torch.float32)[3]
    banks = {
        mode: sd.memory_bank_class(env, mode == "sharded")(
            labels, D, temperature=T, momentum=0.5, generator=torch.Generator().manual_seed(3)
        )
        for mode in ("replicated", "sharded")
    }
    mine = _rank_slice(env.rank)
    for features, indices in _steps():
        for bank in banks.values():
            local = features[mine].clone().requires_grad_(True)
            bank.loss(local, indices[mine]).backward()
            bank.update(local.detach(), indices[mine])
    # Other rows searched in each bank's place (the evaluation's recomputed bank): the same answer
    # from both banks, one code path (.topk).
    features, _, other, _, _ = _problem(torch.float32)
    block = slice(banks["sharded"].start, banks["sharded"].end)
    saved = {
        "replicated": banks["replicated"].bank.clone(),
        "block": banks["sharded"].bank.clone(),
        "gathered": banks["sharded"].state_dict()["bank"],
        "topk_other": {
            "replicated": tuple(banks["replicated"].topk(features[mine], 5, bank=other)),
            "sharded": tuple(banks["sharded"].topk(features[mine], 5, bank=other[block])),
        },
    }
    torch.save(saved, out / f"banks{env.rank}.pt")
    sd.shutdown()


def _rank_dies(out: Path) -> None:
    """Rank 1 dies (or hangs) after joining; rank 0's next collective must fail, not wait."""
    from snca_ext import distributed as sd

    hang = out.name == "hang"
    env = sd.init_from_env("cpu", timeout_s=5)
    gave_up = out / "rank0-gave-up"
    if env.rank == 1:
        if hang:  # alive but silent until rank 0 has given up (at its 5 s timeout), then a second
            deadline = time.monotonic() + 60
            while not gave_up.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        os._exit(17)
    features, indices, _, bank_labels, _ = _problem(torch.float32)
    memory = sd.ShardedMemoryBank(bank_labels, D, temperature=T) if not hang else None
    try:
        if memory is None:
            sd.all_reduce(torch.ones(1))
        else:
            for _ in range(50):  # the peer's exit is noticed at the latest at the timeout
                memory.loss(features[:3], indices[:3])
    except sd.PeerFailure as error:
        gave_up.touch()
        exit_after_peer_failure(error, 3)


SCENARIOS = {"ops": _rank_ops, "banks": _rank_banks, "dies": _rank_dies}


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ops_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ops")
    for result in _launch("ops", out):
        assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"ops{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_loss_and_gradient_equal_the_single_process_op(ops_results, mode, dtype, tol):
    features, indices, bank, bank_labels, labels = _problem(dtype)
    features.requires_grad_(True)
    lse_same, lse_other, _, _ = snca_ext.snca_stats(features, indices, bank, bank_labels, T, labels=labels)
    loss = snca_ext.loss_from_lse(lse_same, lse_other)
    loss.backward()
    assert torch.isneginf(lse_same[1]) and lse_same[2].isfinite()  # the edge cases are in the batch
    name = str(dtype).removeprefix("torch.")
    close = {"rtol": tol, "atol": tol}
    # Each rank's loss is the mean over its own queries; weighted by the rank's share of the global
    # batch (DDP's average when the batches are equal) they make the global mean, and so do the
    # scaled gradients of each rank's rows.
    shares = [size / sum(BATCH) for size in BATCH]
    total = sum(
        share * saved[f"{name}/{mode}"]["loss"] for share, saved in zip(shares, ops_results, strict=True)
    )
    torch.testing.assert_close(total, loss.detach(), **close)
    for rank, saved in enumerate(ops_results):
        got, mine = saved[f"{name}/{mode}"], _rank_slice(rank)
        assert got["grad"].dtype == dtype
        torch.testing.assert_close(got["lse_same"], lse_same[mine].detach(), **close)
        torch.testing.assert_close(got["lse_other"], lse_other[mine].detach(), **close)
        torch.testing.assert_close(got["grad"] * shares[rank], features.grad[mine], **close)


def test_sharded_second_derivatives_are_refused(ops_results):
    for saved in ops_results:
        for name in ("float64", "float32"):
            assert "once differentiable" in saved[f"{name}/second_order"]


@pytest.mark.parametrize("k", TOPK)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sharded_topk_equals_the_single_process_search(ops_results, k, dtype):
    features, indices, bank, _, _ = _problem(dtype)
    values, rows = snca_ext.bank_topk(features, bank, k, exclude=indices)
    name = str(dtype).removeprefix("torch.")
    for rank, saved in enumerate(ops_results):
        got, mine = saved[f"{name}/topk{k}"], _rank_slice(rank)
        assert torch.equal(got["rows"], rows[mine])  # including the tie: row 3 before row 30
        # The same inner products up to the summation order of a differently blocked GEMM.
        torch.testing.assert_close(
            got["values"], values[mine], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6
        )
    assert rows[0, 0] == 3 and rows[0, 1] == 30  # the tie is really exercised


def test_banks_identical_across_ranks_and_to_one_process(tmp_path):
    for result in _launch("banks", tmp_path):
        assert result.returncode == 0, result.stderr[-3000:]
    saved = [torch.load(tmp_path / f"banks{rank}.pt") for rank in range(WORLD)]
    labels = _problem(torch.float32)[3]
    reference = MemoryBank(labels, D, temperature=T, momentum=0.5, generator=torch.Generator().manual_seed(3))
    initial = reference.bank.clone()
    for features, indices in _steps():
        reference.update(features, indices)
    assert not torch.equal(reference.bank, initial)
    assert torch.equal(saved[0]["replicated"], saved[1]["replicated"])
    torch.testing.assert_close(saved[0]["replicated"], reference.bank, rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.cat([s["block"] for s in saved]), reference.bank, rtol=0, atol=1e-7)
    assert [s["block"].shape[0] for s in saved] == [19, 18]
    for s in saved:
        assert torch.equal(s["gathered"], torch.cat([t["block"] for t in saved]))
    features, _, other, _, _ = _problem(torch.float32)
    for rank, s in enumerate(saved):
        values, rows = snca_ext.bank_topk(features[_rank_slice(rank)], other, 5)
        for mode in ("replicated", "sharded"):
            torch.testing.assert_close(s["topk_other"][mode][0], values, rtol=0, atol=1e-6)
            assert torch.equal(s["topk_other"][mode][1], rows), mode


@pytest.mark.parametrize("how", ["dies", "hang"])
def test_a_dead_rank_makes_the_others_fail_clearly(tmp_path, how):
    out = tmp_path / how
    out.mkdir()
    rank0, rank1 = _launch("dies", out, timeout=90)
    report = "\n".join(f"rank {r} ({p.seconds} s): {p.stderr[-3000:]}" for r, p in enumerate((rank0, rank1)))
    assert rank0.returncode == 3, report
    assert (
        "error: rank 0 of 2: all_reduce failed" in rank0.stderr
        and "Another rank has probably died" in rank0.stderr
    )
    if how == "dies":
        assert rank1.returncode == 17
    else:  # rank 0 gave up at its timeout while rank 1 was still silent
        assert rank0.seconds is not None and rank1.seconds is not None, report
        assert rank0.seconds < rank1.seconds and "Timed out" in rank0.stderr, report


def _torchrun(out: Path, *flags: str, timeout: float = 150.0) -> subprocess.CompletedProcess:
    """A 2-rank digits run through torchrun, its rendezvous on 127.0.0.1 at a free port."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD)),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"),
        *("-m", "snca_ext.train", "--out", str(out), "--no-progress", *flags),
    ]
    env = {**_env(0, 0), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_process_digits(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one-process")
    assert run(["--out", str(out), "--epochs", "2", "--threads", "1", "--no-progress"]) == EXIT_OK
    return {**_summary(out), "losses": _losses(out), "out": out}


def _losses(out: Path) -> list[float]:
    """The mean training loss of each epoch (metrics.csv)."""
    with open(out / "metrics.csv") as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


def test_two_rank_digits_run_reaches_the_one_process_accuracy(one_process_digits, tmp_path):
    result = _torchrun(tmp_path, "--epochs", "2")
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert result.stdout.count("epoch 2/2") == 1  # one log: rank 0's
    ours = _summary(tmp_path)
    # Same global batches; only batch-norm statistics (per rank) and rounding differ.
    assert ours["test_examples"] == 450 and ours["top1"] > 90.0
    assert abs(ours["top1"] - one_process_digits["top1"]) <= 4.0
    # kNN on digits cannot tell a network that learns nothing (random features get about 94%):
    # the loss curve can. Same global batches, so each epoch's loss is the one process's to about
    # 10% (measured 1.470 / 0.369 against 1.494 / 0.335: batch-norm statistics are per rank), and
    # it falls by more than half, which a run whose steps change nothing does not (2.25 / 2.21).
    ours_losses, one_losses = _losses(tmp_path), one_process_digits["losses"]
    assert ours_losses == pytest.approx(one_losses, rel=0.15), (ours_losses, one_losses)
    assert one_losses[1] < 0.5 * one_losses[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sharded_run_stops_and_resumes_on_one_process(one_process_digits, tmp_path):
    """A 2-rank sharded run stopped mid-epoch, resumed by a single process: the checkpoint
    holds the whole bank and replays the same global batches."""
    result = _torchrun(tmp_path, "--epochs", "2", "--bank-sharding", "--stop-after-steps", "30")
    assert "stopped in epoch 2 after step 9" in result.stdout, result.stderr[-3000:]
    # Both ranks stopped and left together, and torchrun did not report a crash (it does for any
    # non-zero exit of a worker, and stops the other ranks while they finish).
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert "exit status 0: under torchrun a stop" in result.stdout
    assert "FAILED" not in result.stderr and "SIGTERM" not in result.stderr, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 9)
    assert state["memory"]["bank"].shape == (1347, 128)
    assert run(["--resume", str(tmp_path), "--threads", "1", "--no-progress"]) == EXIT_OK
    ours = _summary(tmp_path)
    assert ours["epochs"] == 2 and ours["top1"] > 90.0
    assert abs(ours["top1"] - one_process_digits["top1"]) <= 4.0


def test_a_one_process_checkpoint_resumes_into_a_sharded_run(one_process_digits, tmp_path):
    """The checkpoint holds the whole bank: two ranks each take their block of it and continue the
    same curve (its first two epochs kept as they were)."""
    checkpoint = tmp_path / "one-process.pt"
    checkpoint.write_bytes((one_process_digits["out"] / "checkpoint.pt").read_bytes())
    out = tmp_path / "sharded"
    result = _torchrun(out, "--resume", str(checkpoint), "--epochs", "3", "--bank-sharding")
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    losses = _losses(out)
    assert losses[:2] == one_process_digits["losses"] and len(losses) == 3
    assert losses[2] < losses[1]  # the third epoch, sharded, goes on down the curve
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 3 and state["memory"]["bank"].shape == (1347, 128)
    assert _summary(out)["top1"] > 90.0


def test_bank_sharding_needs_torchrun(tmp_path, capsys):
    assert run(["--out", str(tmp_path), "--bank-sharding", "--no-progress"]) == EXIT_USAGE
    assert "--bank-sharding needs a distributed run" in capsys.readouterr().err


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
