"""Stop signals: the handler must not take the event's lock (a worker hung there, orphaned)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A signal that lands while the main thread holds the event's lock, as it does inside Event.set() or
# Event.wait() (and inside an earlier handler's stop.set(): how two SIGTERMs hung a worker).
# Event._cond is private; it is that lock. raise_signal runs the handler on this thread, here.
CHILD = """
import signal, threading
from node.signals import stop_on_signals
stop = threading.Event()
{install}
with stop._cond:
    signal.raise_signal(signal.SIGTERM)
print("stopped" if stop.wait(10) else "not stopped", flush=True)
"""
RELAY = "stop_on_signals(stop, [signal.SIGTERM])"
NAIVE = "signal.signal(signal.SIGTERM, lambda *_: stop.set())"


def _run(install: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(install=install)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_a_signal_while_the_event_lock_is_held_stops_the_process():
    result = _run(RELAY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"


def test_a_handler_that_sets_the_event_itself_hangs_there():
    """Guard: the handler every stop used before node/signals.py deadlocks in the same situation."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", CHILD.format(install=NAIVE)], cwd=ROOT, capture_output=True,
                       timeout=5)


def test_restore_puts_the_previous_handlers_back():
    import signal
    import threading

    from node.signals import stop_on_signals

    before = signal.getsignal(signal.SIGUSR1)
    restore = stop_on_signals(threading.Event(), [signal.SIGUSR1])
    assert signal.getsignal(signal.SIGUSR1) is not before
    restore()
    assert signal.getsignal(signal.SIGUSR1) is before
