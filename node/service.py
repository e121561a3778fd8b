"""The running node: SCP, completion tracker and timers wired together.

`NodeService` is what `migraine-node serve` runs, and what tests start
in-process on a free port.
"""

from __future__ import annotations

import logging
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Settings
from node.dimse_tuning import disable_pydicom_validation, shorten_acceptor_reactor_sleep
from node.recovery import recover
from node.scp import ActiveAssociations, Ingest, build_ae, event_handlers
from node.tracker import SeriesTracker
from storage.db import make_engine
from storage.spool import Spool
from storage.store import JobStore

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0


class NodeService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        disable_pydicom_validation()
        shorten_acceptor_reactor_sleep()
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine = make_engine(settings.storage.resolved_database_url)
        self.store = JobStore(self.engine)
        self.spool = Spool(settings.storage.spool_dir)
        self.active = ActiveAssociations()
        self.ingest = Ingest(self.spool, self.store, settings.storage.min_free_disk_mb)
        self.tracker = SeriesTracker(self.store, settings.series, self.active.senders_active)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.ae = build_ae(settings)
        self._server = None
        self.port: int | None = None

    def start(self) -> None:
        recover(self.spool, self.store)
        self.scheduler.add_job(
            self._tick, "interval", seconds=TICK_SECONDS, id="series-completion", max_instances=1, coalesce=True
        )
        self.scheduler.start()
        node = self.settings.node
        handlers = event_handlers(self.settings, self.ingest, self.active, self.tracker.association_ended)
        self._server = self.ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info(
            "migraine-node listening on %s:%d as %s (data_dir=%s)",
            node.host,
            self.port,
            node.ae_title,
            self.settings.storage.data_dir,
        )

    def _tick(self) -> None:
        try:
            self.tracker.tick()
        except Exception:
            log.exception("completion tick failed; retrying on the next tick")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.engine.dispose()
        log.info("migraine-node stopped")

    def serve_forever(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
