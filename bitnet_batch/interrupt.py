"""Clean stops: SIGINT (Ctrl-C) and SIGTERM (``systemctl stop``, ``timeout``, Kubernetes) ask a running job to
stop after its current engine step instead of killing it mid-write.

While a ``StopSignals`` block is active (in the main thread), the first of those signals only sets
``signum``; the job loops check ``requested`` once per step, stop reading and admitting items, and the job
closes its journal (every finished record is already fsynced there) and raises ``JobInterrupted``. The first
signal also puts the previous handlers back, so a second Ctrl-C (``KeyboardInterrupt``) or SIGTERM (the
default action) ends the process at once; the journal stays consistent, as after ``kill -9``.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager catching the first SIGINT / SIGTERM; a no-op outside the main thread (where Python
    cannot install handlers), as in a Ray actor."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
