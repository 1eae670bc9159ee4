"""How a training run is told to stop, and why a save is never cut short.

While :func:`stop_signals` is active, SIGINT and SIGTERM request a clean stop: the trainer finishes
the step, saves a checkpoint and returns. A second Ctrl-C means "do not wait": it interrupts at
once, except while a checkpoint is being written (:meth:`StopRequest.saving`), where it is
deferred until the save is complete, so no Ctrl-C, however often pressed, leaves a half-written
checkpoint or loses the steps since the previous one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class StopRequest:
    """``requested``: a stop was asked for; ``deferred``: a second Ctrl-C arrived during a save."""

    def __init__(self) -> None:
        self.requested = False
        self.deferred = False
        self._saving = 0

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Hold a second Ctrl-C until the block (a checkpoint write) has finished."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if self.deferred and not self._saving:
            self.deferred = False
            raise KeyboardInterrupt  # the save is complete: now honour the impatient Ctrl-C

    def _on_signal(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            if self._saving:
                self.deferred = True
                return
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.requested = True


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """While active, SIGINT/SIGTERM set ``.requested`` instead of killing the process.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook worker
    thread, a test runner thread) the default behaviour is kept.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
