"""One atomic file write for every file the applications produce (checkpoints, exports, metrics,
summaries): the content goes to a temporary file in the target's folder, is flushed and fsynced,
renamed over the target, and the folder is fsynced, so a crash, a kill or a full disk at any
moment leaves either the previous file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as file: file.write(...)``: ``path`` is replaced only when the
    block completes; on any error the temporary file is removed and the old ``path`` is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; the files are the user's results, made as open() makes
        # them: 0666 less the umask (0644 under the usual 022), like the pages written directly.
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically (``atomic_write``)."""
    with atomic_write(path) as file:
        file.write(text.encode())


def _fsync_folder(folder: Path) -> None:
    """Makes the rename durable; some platforms and file systems cannot open a folder for it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
