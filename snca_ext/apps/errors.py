"""The errors a user can fix: a bad argument, data folder or file. Every command prints them after
its usage line and exits with status 2 (``EXIT_USAGE``); anything else is a bug and keeps its
traceback."""

from __future__ import annotations

EXIT_USAGE = 2


class AppError(Exception):
    """Base of the errors that end a command with a message and exit status 2."""


class UsageError(AppError, ValueError):
    """A bad command-line argument or combination of arguments."""


class DataError(AppError, ValueError):
    """A data folder that is missing or does not have the expected layout."""


class CheckpointError(AppError, RuntimeError):
    """A checkpoint that cannot be read, or does not fit the run."""


class ExportError(AppError, ValueError):
    """A bad export/neighbours argument or an unreadable feature file."""


def error_text(error: BaseException, limit: int = 600) -> str:
    """A torch error's message on one line, cut at ``limit`` characters: its first line alone
    says only "Error(s) in loading state_dict for MemoryBank:", the reasons follow on the next."""
    return " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())[:limit]
