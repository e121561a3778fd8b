"""Signals that stop a process, without taking a lock inside the handler.

A Python signal handler runs on the main thread between two bytecodes, which
may be inside `Event.set()` or `Event.wait()` while they hold the event's lock.
A handler that calls `stop.set()` itself then waits for a lock its own thread
holds: a worker that got two SIGTERMs in a row (serve's death signal and the
stop that followed) hung there for ever, orphaned. Here the handler only
writes a byte to a pipe; a daemon thread reads it and sets the event.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable


def stop_on_signals(stop: threading.Event, signals: Iterable[int]) -> Callable[[], None]:
    """Set `stop` when one of `signals` arrives; returns a function that restores the previous handlers.

    Call from the main thread (Python installs handlers only there).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(_signum: int, _frame: object) -> None:
        try:
            os.write(write_fd, b"\0")
        except OSError:  # pipe full (a stop is already pending) or closed by restore()
            pass

    def relay() -> None:
        try:
            while os.read(read_fd, 64):
                stop.set()
        finally:
            os.close(read_fd)

    threading.Thread(target=relay, name="signal-relay", daemon=True).start()
    previous = {sig: signal.signal(sig, handler) for sig in signals}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(write_fd)  # the relay thread reads end-of-file and ends

    return restore
