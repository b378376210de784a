"""Stopping a run cleanly: the first Ctrl-C or SIGTERM asks to stop after the current step (the
trainer then saves a checkpoint to resume from); a second Ctrl-C aborts at once. And the one
unclean end, the application's policy rather than the library's: after another rank failed,
``exit_after_peer_failure`` ends the process at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn

from snca_ext.distributed import PeerFailure

log = logging.getLogger(__name__)


class StopSignal:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step;
    a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)"
        )

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def exit_after_peer_failure(error: PeerFailure, code: int) -> NoReturn:
    """Reports ``error`` and ends the process with ``code`` at once: after a failed collective the
    process group cannot be torn down (gloo's destructor may abort, NCCL's may wait), so neither
    it nor the interpreter's shutdown runs."""
    print(f"error: {error}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
