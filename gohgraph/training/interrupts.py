"""How a training run is told to stop: SIGINT/SIGTERM request a clean stop (finish the step,
save, return); a second SIGINT interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class StopRequest:
    requested: bool = False


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

    def request_stop(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        stop.requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
