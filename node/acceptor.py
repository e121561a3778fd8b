"""Extra acceptor processes: several processes accept associations on one port (SO_REUSEPORT).

One Python process receives at most about one core's worth of C-STOREs (pynetdicom and pydicom
hold the GIL), however many senders connect. With `[node] acceptors = N`, `serve` binds its port
with SO_REUSEPORT and starts N-1 of these; the kernel spreads new connections over all N. Each is
a NodeService in the internal role "acceptor": the SCP and series completion, sharing the spool
and the database with `serve` (which alone does recovery, selection, retention, workers, export).
Like a worker, an acceptor ends when `serve` ends, even when `serve` is SIGKILLed, and `serve`
restarts one that died.
"""

from __future__ import annotations

import signal
import threading

from node.config import load_settings
from node.logs import setup_logging
from node.signals import stop_on_signals


def acceptor_main(config_path: str | None, overrides: dict, counts=None) -> None:  # noqa: ANN001
    """Entry point of an acceptor process (multiprocessing, spawn). `counts`: serve's shared-memory
    array for this acceptor's counters (node/metrics.py SharedCounts), shown in serve's /metrics."""
    from node.metrics import SharedCounts
    from node.service import NodeService
    from node.worker import _die_with_parent

    stop = threading.Event()
    stop_on_signals(stop, [signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if not _die_with_parent(stop):
        return
    settings = load_settings(config_path, overrides)
    setup_logging(settings.node.log_level)
    service = NodeService(settings, config_path, overrides, role="acceptor")
    if counts is not None:
        service.metrics.shared = SharedCounts(counts)
    service.serve_forever(stop)
