"""What every command line of the applications shares: argument types with errors that say what
was expected, one parser for comma-separated lists of ids, one device resolver, and the way a
command reports a user's error (usage line, message, exit status 2)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import EXIT_USAGE, AppError, UsageError


def program_name(module: str) -> str:
    """The command as the user typed it: ``python -m snca_ext.train`` or ``snca-train``."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if invoked and not invoked.endswith(".py") and invoked not in ("-c", "__main__.py"):
        return invoked
    return f"python -m {module}"


def number(kind, minimum=None, maximum=None, *, min_open=False, max_open=False, what=""):
    """An argparse type: ``kind`` within bounds, with an error that says what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what} (finite), got {text!r}")
        low_ok = minimum is None or (value > minimum if min_open else value >= minimum)
        high_ok = maximum is None or (value < maximum if max_open else value <= maximum)
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1, what="an integer >= 1")
NON_NEGATIVE_INT = number(int, 0, what="an integer >= 0")
POSITIVE_FLOAT = number(float, 0.0, min_open=True, what="a number > 0")
NON_NEGATIVE_FLOAT = number(float, 0.0, what="a number >= 0")
FRACTION = number(float, 0.0, 1.0, max_open=True, what="a number in [0, 1)")


class _ConsoleHandler(logging.Handler):
    """Messages as they are, info to stdout and warnings/errors to stderr, each looked up at every
    message (so that a redirected or captured stream gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(main_process: bool = True) -> None:
    """The commands' console output: ``snca_ext``'s loggers at INFO on the main process, at
    WARNING on the other ranks of a distributed run (one log per job, every rank's problems).
    The library itself configures nothing; an application that sets up logging gets the records
    through its own handlers (``logging.getLogger("snca_ext")``)."""
    logger = logging.getLogger("snca_ext")
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.propagate = False  # printed once, not again by a root handler
    logger.setLevel(logging.INFO if main_process else logging.WARNING)


def arch_type(text: str) -> str:
    """argparse type of --arch: one of the package's networks or timm:<name>."""
    from .models import check_arch

    try:
        return check_arch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_int_list(
    text: str, *, minimum: int = 0, what: str = "ids", example: str = "5,6,7"
) -> tuple[int, ...]:
    """``"5, 6,7"`` -> ``(5, 6, 7)`` in the given order; ``""`` -> ``()``. Every value must be an
    integer >= ``minimum``; the error names ``what`` and shows ``example``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated {what} like '{example}', got {text!r}") from None
    if any(value < minimum for value in values):
        raise ValueError(f"{what} must be >= {minimum}, got {text!r}")
    return values


def parse_classes(text: str) -> tuple[int, ...]:
    """Class ids ``"7,5,5"`` -> ``(5, 7)`` (sorted, no duplicates); ``""`` -> ``()``."""
    return tuple(sorted(set(parse_int_list(text, what="class ids", example="5,6,7,8,9"))))


def int_list_type(*, minimum: int, what: str, example: str, non_empty: bool = True) -> Callable:
    """An argparse type of ``parse_int_list``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = parse_int_list(text, minimum=minimum, what=what, example=example)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if non_empty and not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got {text!r}")
        return values

    return parse


def class_list_type(text: str) -> str:
    """An argparse type: class ids in the canonical form ``"5,6,7"`` (sorted, unique)."""
    try:
        return ",".join(map(str, parse_classes(text)))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_backend(backend: str, device: torch.device, flag: str = "--backend") -> None:
    """Refuses a fused-op ``backend`` that cannot run on ``device`` here (``cuda`` without a GPU,
    ``triton`` without triton or on CPU tensors outside ``TRITON_INTERPRET=1``) before any work,
    rather than with a traceback at the first call."""
    from snca_ext.backends import BACKENDS, available_backends

    if backend not in BACKENDS:
        raise UsageError(f"{flag} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return
    usable = available_backends(device)
    if backend not in usable:
        hint = " (triton runs on CPU tensors only under TRITON_INTERPRET=1)" if backend == "triton" else ""
        raise UsageError(
            f"{flag} {backend} cannot run on {device} on this machine{hint}: usable here: "
            f"{', '.join(['auto', *usable])}"
        )


def resolve_device(text: str) -> torch.device:
    """``--device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available in this torch install / machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return device


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads (None: torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def writable_folder(folder: Path, flag: str) -> Path:
    """Creates ``folder`` if needed and checks that a file can be written in it, so a command
    fails up front, naming its ``flag``, rather than after its work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{flag}: {folder} cannot be written ({error})") from error
    return folder


def report(parser: argparse.ArgumentParser, error: AppError) -> int:
    """Prints the usage line and ``error`` as argparse does and returns the exit status 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return EXIT_USAGE
