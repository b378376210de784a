"""``python -m snca_ext.train`` end to end: digits, a tiny CIFAR-10 folder and ImageFolder tree,
resume, kill-and-resume, NaN, failed saves, checkpoint trust and every bad argument.

Runs are short (1-3 epochs) and use one thread, so the file stays fast on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.data_folders import make_cifar_folder, make_image_folder

from snca_ext.apps import checkpoints as checkpoint_module
from snca_ext.apps.checkpoints import load_checkpoint
from snca_ext.apps.data import build_data
from snca_ext.apps.models import build_model
from snca_ext.apps.train.cli import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_SAVE_FAILED,
    EXIT_STOPPED,
    EXIT_USAGE,
    build_parser,
    run,
)
from snca_ext.apps.train.config import RunConfig
from snca_ext.apps.train.trainer import Trainer
from snca_ext.distributed import DistEnv
from snca_ext.memory import MemoryBank

FAST = ["--threads", "1", "--no-progress"]
STEPS_PER_DIGITS_EPOCH = 1347 // 64


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as file:
        return list(csv.DictReader(file))


def _digits(out: Path, *extra: str) -> int:
    return run(["--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch digits run: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _digits(out, "--epochs", "2") == EXIT_OK
    return out


def test_digits_run_writes_every_file(two_epoch_run, untrained_digits):
    out = two_epoch_run
    rows = _rows(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "lr", "memory_momentum", "loss", "knn1_top1"}
    # It learns: with no optimizer step the loss falls only a few % (the bank fills up); here
    # it falls to well under half.
    assert float(rows[1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["knn_k"] == 30 and summary["recomputed_bank"] is True
    # The baseline that tells: the network as initialised already gets about 94% (random
    # features suit kNN on 8x8 digits); the trained one must beat it clearly (97.8 against 94.0).
    assert summary["top1"] >= untrained_digits["top1"] + 2.0, untrained_digits
    # A memory bank that is never updated votes at chance (10%).
    assert summary["knn_memory_bank"]["top1"] > 70
    state = load_checkpoint(out / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 2 and state["step"] == 0 and state["args"]["temperature"] == 0.1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_reproduces_the_final_kNN(two_epoch_run, capsys):
    summary = json.loads((two_epoch_run / "summary.json").read_text())
    capsys.readouterr()
    checkpoint = str(two_epoch_run / "checkpoint.pt")
    assert run(["-e", "--resume", checkpoint, "--recompute-bank", *FAST]) == EXIT_OK
    assert f"top-1 {summary['top1']:.2f}%" in capsys.readouterr().out
    # Without --recompute-bank, -e votes with the checkpoint's memory bank, as the original's -e.
    assert run(["-e", "--resume", checkpoint, *FAST]) == EXIT_OK
    memory_line = "K=30, sigma=0.1, memory bank) after 2 epochs on 450 test examples: top-1 "
    assert memory_line + f"{summary['knn_memory_bank']['top1']:.2f}%" in capsys.readouterr().out
    # The run reported both protocols; they differ (the bank lags the network by momentum).
    assert summary["knn_recomputed_bank"]["top1"] == summary["top1"]
    assert summary["knn_memory_bank"] != summary["knn_recomputed_bank"]
    best = max(_rows(two_epoch_run), key=lambda row: float(row["knn1_top1"]))
    assert summary["best_epoch_selected_on_test"]["epoch"] == int(best["epoch"])


@pytest.mark.parametrize(
    "stop_after",
    [STEPS_PER_DIGITS_EPOCH, STEPS_PER_DIGITS_EPOCH + 9],
    ids=["at-epoch-end", "mid-epoch"],
)
def test_stop_and_resume_continue_the_same_curve(two_epoch_run, tmp_path, stop_after):
    assert _digits(tmp_path, "--epochs", "2", "--stop-after-steps", str(stop_after)) == EXIT_STOPPED
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == divmod(stop_after, STEPS_PER_DIGITS_EPOCH)
    # The resumed run takes its recipe from the checkpoint and its run directory from --resume.
    assert run(["--resume", str(tmp_path / "checkpoint.pt"), *FAST]) == EXIT_OK
    assert (tmp_path / "metrics.csv").read_text() == (two_epoch_run / "metrics.csv").read_text()
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    reference = load_checkpoint(two_epoch_run / "checkpoint.pt")
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert torch.equal(resumed["memory"]["bank"], reference["memory"]["bank"])
    ours = json.loads((tmp_path / "summary.json").read_text())
    theirs = json.loads((two_epoch_run / "summary.json").read_text())
    assert (ours["top1"], ours["top5"]) == (theirs["top1"], theirs["top5"])


def test_resume_with_more_epochs_extends_the_run(two_epoch_run, tmp_path):
    checkpoint = tmp_path / "copy.pt"
    checkpoint.write_bytes((two_epoch_run / "checkpoint.pt").read_bytes())
    out = tmp_path / "extended"
    assert run(["--resume", str(checkpoint), "--epochs", "3", "--out", str(out), *FAST]) == EXIT_OK
    rows, reference = _rows(out), _rows(two_epoch_run)
    assert rows[:2] == reference and rows[2]["epoch"] == "3"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    """SIGINT to the real CLI: exit 130 with a checkpoint; --resume finishes the run."""
    command = [sys.executable, "-m", "snca_ext.train", "--out", str(tmp_path), "--epochs", "40", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.csv").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr
    assert "SIGINT: stopping after this step" in stderr and "--resume" in stdout
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    done = state["epoch"]
    assert 1 <= done < 40
    interrupted_rows = _rows(tmp_path)
    assert len(interrupted_rows) == done
    finish = str(done + 1)
    assert run(["--resume", str(tmp_path), "--epochs", finish, *FAST]) == EXIT_OK
    rows = _rows(tmp_path)
    assert rows[:done] == interrupted_rows and rows[-1]["epoch"] == finish


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"count": 0}
    original_loss = MemoryBank.loss

    def loss_turning_nan(self, *args, **kwargs):
        calls["count"] += 1
        loss = original_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["count"] > STEPS_PER_DIGITS_EPOCH + 3 else loss

    monkeypatch.setattr(MemoryBank, "loss", loss_turning_nan)
    assert _digits(tmp_path, "--epochs", "3") == EXIT_DIVERGED
    error = capsys.readouterr().err
    assert "the loss became nan at epoch 2, step 4" in error and "last good checkpoint is kept" in error
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert len(_rows(tmp_path)) == 1 and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "summary.json").exists()


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MemoryBank, "loss", lambda self, *args, **kwargs: torch.tensor(float("nan")))
    assert _digits(tmp_path, "--epochs", "2") == EXIT_DIVERGED
    error = capsys.readouterr().err
    assert "no checkpoint was written" in error and "kept at" not in error
    assert not (tmp_path / "checkpoint.pt").exists()


def _failing_saves(monkeypatch, failing) -> None:
    """torch.save in the checkpoint writer fails (a full disk: half a file, then ENOSPC) on the
    saves whose 1-based count is in ``failing``."""
    real_save = torch.save
    saves = {"count": 0}

    def save(obj, file, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] in failing:
            file.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)


def test_a_failed_last_save_keeps_the_previous_checkpoint_and_fails_the_run(tmp_path, monkeypatch, capsys):
    _failing_saves(monkeypatch, {2})
    assert _digits(tmp_path, "--epochs", "2") == EXIT_SAVE_FAILED
    error = capsys.readouterr().err
    assert "could not save" in error and "its last checkpoint save failed" in error
    assert "holds the run at the end of epoch 1" in error
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # epoch 2's save failed
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint.pt"]
    assert not (tmp_path / "summary.json").exists()  # no summary claims the full run


def test_two_failed_saves_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    _failing_saves(monkeypatch, {2, 3, 4})
    assert _digits(tmp_path, "--epochs", "5") == EXIT_SAVE_FAILED
    error = capsys.readouterr().err
    assert "two checkpoint saves in a row failed" in error and "end of epoch 1" in error
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert [row["epoch"] for row in _rows(tmp_path)] == ["1"]  # epoch 3 was the last one trained


def test_a_stop_whose_save_fails_does_not_claim_a_checkpoint(tmp_path, monkeypatch, capsys):
    _failing_saves(monkeypatch, {1})
    assert _digits(tmp_path, "--epochs", "2", "--stop-after-steps", "5") == EXIT_SAVE_FAILED
    captured = capsys.readouterr()
    assert "checkpoint saved" not in captured.out
    assert "could not be saved; no checkpoint was saved" in captured.err


def test_out_must_be_writable_and_leftovers_of_a_killed_save_go(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _digits(blocker / "run", "--epochs", "1") == EXIT_USAGE
    assert "cannot be written" in capsys.readouterr().err
    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert _digits(out, "--epochs", "1") == EXIT_OK
    assert not leftover.exists()


def test_a_checkpoint_of_another_architecture_is_refused(two_epoch_run, capsys):
    checkpoint = str(two_epoch_run / "checkpoint.pt")
    assert run(["-e", "--resume", checkpoint, "--low-dim", "64", *FAST]) == EXIT_USAGE
    assert "does not fit this run (--arch digits_cnn, --low-dim 64" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "reason"), [(b"", "is an empty file"), (b"hello", "KeyError")])
def test_an_empty_or_text_checkpoint_says_why(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert run(["--resume", str(path), *FAST]) == EXIT_USAGE
    assert reason in capsys.readouterr().err


def test_cifar10_folder_end_to_end(tmp_path, capsys):
    data = make_cifar_folder(tmp_path / "data", per_batch=8, test_size=6)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data", str(data), "--epochs", "1", "-b", "8", "-j", "0"]
    assert run([*argv, "--out", str(out), *FAST]) == EXIT_OK
    assert len(_rows(out)) == 1 and (out / "curves.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "cifar_resnet18" and summary["test_examples"] == 6
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["args"]["weight_decay"] == 5e-4 and state["args"]["lr_step"] == 50
    assert state["memory"]["bank"].shape == (40, 128)


def test_image_folder_end_to_end_with_a_worker(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 1))
    out = tmp_path / "run"
    argv = ["--dataset", "imagefolder", "--data", str(data), "--epochs", "1", "-b", "4", "-j", "1"]
    assert run([*argv, "--low-dim", "16", "--out", str(out), *FAST]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "resnet18" and summary["test_examples"] == 3
    args = load_checkpoint(out / "checkpoint.pt")["args"]
    assert (args["temperature"], args["batch_size"], args["memory_schedule"]) == (0.05, 4, "80:0.8,120:0.9")


def test_an_image_damaged_past_its_header_stops_the_run_named_and_keeps_the_checkpoint(tmp_path, capsys):
    """The header check before training cannot see damaged pixels: the loader (in a worker process)
    finds them, and the run stops with exit 2, the file named, the last checkpoint kept."""
    from io import BytesIO

    from PIL import Image

    data = make_image_folder(tmp_path / "data", per_class=(4, 1))
    out = tmp_path / "run"
    argv = ["--dataset", "imagefolder", "--data", str(data), "-b", "4", "-j", "1", "--low-dim", "16", *FAST]
    assert run([*argv, "--epochs", "1", "--out", str(out)]) == EXIT_OK
    saved = (out / "checkpoint.pt").read_bytes()
    damaged = data / "train" / "dog" / "2.png"
    encoded = BytesIO()
    Image.open(damaged).save(encoded, format="PNG")
    damaged.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])  # header intact
    capsys.readouterr()
    assert run([*argv, "--epochs", "2", "--resume", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: {damaged} could not be read as an image (image file is truncated" in err, err
    assert "Stopped; " in err and "holds what it held before this run" in err
    assert "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == saved


BAD_ARGUMENTS = [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--temperature", "-0.1"], "argument -t/--temperature/--nce-t: expected a number in (0, 10]"),
    (["--lr", "nan"], "argument --lr: expected a number > 0 (finite), got 'nan'"),
    (["--lr", "fast"], "argument --lr: expected a number > 0, got 'fast'"),
    (["--memory-momentum", "1"], "argument --memory-momentum/--nce-m: expected a number in [0, 1), got '1'"),
    (["--memory-schedule", "80"], "argument --memory-schedule: memory momentum schedule must look like"),
    (["--workers", "-1"], "argument -j/--workers: expected an integer >= 0, got '-1'"),
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--arch", "vgg16"], "argument --arch: must be one of resnet18"),
    (["--bank-dtype", "int8"], "argument --bank-dtype: invalid choice: 'int8'"),
    (["--margin", "2.5"], "--margin is in cosine units and must be < 2"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--evaluate"], "--evaluate needs --resume CHECKPOINT"),
    (["--data", "/somewhere"], "--data is not used by --dataset digits"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data PATH"),
    (["--batch-size", "5000"], "--batch-size x --iter-size must be at most the training set size 1347"),
    (["--resume", "/no/such/checkpoint.pt"], "--resume /no/such/checkpoint.pt: no such checkpoint file"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--device", "cuda"], "--device cuda: CUDA is not available"))


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, argv, message):
    try:
        status = run([*argv, "--out", str(tmp_path / "run"), *FAST])
    except SystemExit as exit_:  # argparse's own checks
        status = exit_.code
    assert status == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_data_folders_give_a_clear_error(tmp_path, capsys):
    assert run(["--dataset", "cifar10", "--data", str(tmp_path), *FAST]) == EXIT_USAGE
    assert (
        "has no cifar-10-batches-py/ folder; expected the CIFAR-10 python version" in capsys.readouterr().err
    )
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert run(["--dataset", "imagefolder", "--data", str(tmp_path), *FAST]) == EXIT_USAGE
    assert "train/ is not a valid image tree" in capsys.readouterr().err


def test_a_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"definitely not a zip file")
    assert run(["--resume", str(path), *FAST]) == EXIT_USAGE
    assert f"--resume {path} could not be read as a torch checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- original format

ORIGINAL_MODULE = """
import torch
from torch import nn


class LinearAverage(nn.Module):
    def __init__(self, input_size, output_size, T=0.05, momentum=0.5):
        super().__init__()
        self.register_buffer("params", torch.tensor([T, momentum]))
        self.register_buffer("memory", torch.nn.functional.normalize(torch.randn(output_size, input_size)))
"""


def _original_checkpoint(tmp_path: Path, monkeypatch, epoch: int = 2) -> tuple[Path, dict]:
    """A checkpoint as the original main.py saves it: DataParallel ``module.`` keys and the whole
    ``LinearAverage`` module pickled, from a ``lib`` package that is then uninstalled."""
    package = tmp_path / "original_code" / "lib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "LinearAverage.py").write_text(ORIGINAL_MODULE)
    monkeypatch.syspath_prepend(str(package.parent))
    from lib.LinearAverage import LinearAverage

    torch.manual_seed(0)
    model = build_model("digits_cnn", 128)
    lemniscate = LinearAverage(128, 1347, 0.1, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():  # one step, so the state holds momentum buffers
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    state = {
        "epoch": epoch,
        "arch": "digits_cnn",
        "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()},
        "lemniscate": lemniscate,
        "best_prec1": 12.5,
        "optimizer": optimizer.state_dict(),
    }
    path = tmp_path / "original.pth.tar"
    torch.save(state, path)
    monkeypatch.delitem(sys.modules, "lib.LinearAverage")
    monkeypatch.delitem(sys.modules, "lib")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(package.parent)])
    return path, {"model": model.state_dict(), "memory": lemniscate.memory.clone()}


def test_original_checkpoint_needs_trust(tmp_path, monkeypatch, capsys):
    path, _ = _original_checkpoint(tmp_path, monkeypatch)
    assert run(["-e", "--resume", str(path), *FAST]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "cannot be loaded with weights_only=True" in error and "--trust-checkpoint" in error


def test_original_checkpoint_loads_with_trust(tmp_path, monkeypatch, capsys):
    path, expected = _original_checkpoint(tmp_path, monkeypatch)
    state = load_checkpoint(path, trust=True)
    parts = checkpoint_module.from_original(state)
    assert set(parts["model"]) == set(expected["model"])  # the module. prefix is gone
    assert torch.equal(parts["bank"], expected["memory"])  # read without the original code installed
    # An original checkpoint records no data set: the command names it before the file is unpickled.
    argv = ["-e", "--resume", str(path), "--trust-checkpoint", *FAST]
    assert run(argv) == EXIT_USAGE
    assert "pass --data PATH (or --dataset" in capsys.readouterr().err
    assert run([*argv, "--dataset", "digits"]) == EXIT_OK
    assert "after 2 epochs on 450 test examples" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_resuming_an_original_checkpoint_at_a_phase_boundary_takes_that_phase_lr(tmp_path, monkeypatch):
    # The digits recipe divides the lr by 10 every 10 epochs; the original saved the optimizer
    # state of epoch 9, whose lr (0.1) must not carry into epoch 10.
    path, _ = _original_checkpoint(tmp_path, monkeypatch, epoch=10)
    config = RunConfig.resolve(build_parser().parse_args(["--resume", str(path), "--trust-checkpoint"]))
    config.out = str(tmp_path / "run")
    trainer = Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu")))
    trainer.load_original(load_checkpoint(path, trust=True))
    assert trainer.epoch == 10
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert trainer.optimizer.state_dict()["state"]  # the original's momentum buffers were loaded
    for _ in range(10):
        trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(_RunsCode.target),))


def test_untrusted_checkpoint_code_never_runs(tmp_path, capsys):
    _RunsCode.target = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    torch.save({"format": "snca_ext.train/1", "payload": _RunsCode()}, path)
    assert run(["--resume", str(path), *FAST]) == EXIT_USAGE
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert not _RunsCode.target.exists()


def test_bf16_autocast_in_channels_last_learns(tmp_path, untrained_digits):
    """--amp bf16 --channels-last: the same recipe learns as in float32 (the loss halves, kNN beats
    the untrained network; measured 97.8% against 94.0%)."""
    assert _digits(tmp_path, "--epochs", "2", "--amp", "bf16", "--channels-last") == EXIT_OK
    rows, summary = _rows(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    assert float(rows[1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert summary["top1"] >= untrained_digits["top1"] + 2.0
    # Not saved with the run: a resume may compute otherwise.
    assert "amp" not in load_checkpoint(tmp_path / "checkpoint.pt")["args"]


def _trainer(tmp_path, *flags: str) -> Trainer:
    config = RunConfig.resolve(build_parser().parse_args(["--out", str(tmp_path), *flags]))
    return Trainer(config, build_data("digits"), DistEnv.single(torch.device("cpu")))


def _one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    indices = torch.arange(64)
    images = torch.stack([trainer.data.train[i][0] for i in range(64)])
    seen, loss_sum = trainer.train_step([(images, indices)], trainer.config.memory_momentum, 0.0)
    assert seen == len(indices) and math.isfinite(loss_sum)
    return before


def test_fp16_autocast_scales_the_gradients_and_steps(tmp_path):
    trainer = _trainer(tmp_path, "--amp", "fp16")
    assert trainer.grad_scaler.is_enabled() and trainer.amp_dtype == torch.float16
    scaled, scale = [], trainer.grad_scaler.scale
    trainer.grad_scaler.scale = lambda loss: scaled.append(loss.detach()) or scale(loss)
    before = _one_step(trainer)
    assert len(scaled) == 1 and scaled[0].dtype == torch.float32  # the loss accumulates in float32
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert moved, "the scaled step left every parameter unchanged"
    assert not _trainer(tmp_path / "plain").grad_scaler.is_enabled()


def test_compile_trains_through_the_compiled_network_and_saves_plain_names(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **kwargs):  # dynamo's tracing without inductor's minutes of codegen
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    trainer = _trainer(tmp_path, "--compile")
    assert compiled == [trainer.model] and trainer.forward is not trainer.model
    before = _one_step(trainer)
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert set(trainer.state_dict()["model"]) == set(trainer.model.state_dict())
    assert not any(name.startswith("_orig_mod") for name in trainer.state_dict()["model"])


def test_tensorboard_gets_every_step_and_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "board"
    assert _digits(tmp_path / "run", "--epochs", "2", "--tensorboard", str(board)) == EXIT_OK
    events = EventAccumulator(str(board))
    events.Reload()
    steps = events.Scalars("train/loss")
    assert [s.step for s in steps] == list(range(1, 2 * STEPS_PER_DIGITS_EPOCH + 1))
    rows = _rows(tmp_path / "run")
    for name in ("loss", "knn1_top1", "lr", "memory_momentum"):
        logged = [(s.step, s.value) for s in events.Scalars(f"epoch/{name}")]
        assert logged == [(int(row["epoch"]), pytest.approx(float(row[name]), rel=1e-6)) for row in rows]
    # The epoch's mean loss is the mean of its steps' losses (equal batches).
    first_epoch = [s.value for s in steps[:STEPS_PER_DIGITS_EPOCH]]
    assert sum(first_epoch) / len(first_epoch) == pytest.approx(float(rows[0]["loss"]), rel=1e-5)
