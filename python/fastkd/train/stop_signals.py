"""Stopping a run cleanly: SIGINT and SIGTERM ask it to stop after the current step, which it
checkpoints, rather than killing it in the middle of one.
"""

from __future__ import annotations

import signal


class _StopSignals:
    """SIGINT/SIGTERM ask the run to stop after the current step (with a checkpoint); a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False
