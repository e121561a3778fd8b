"""The running node: SCP, completion tracker and timers wired together.

`NodeService` is what `migraine-node serve` runs, and what tests start
in-process on a free port.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Settings
from node.dimse_tuning import disable_pydicom_validation, shorten_acceptor_reactor_sleep
from node.dispatch import Dispatcher
from node.export import Exporter
from node.recovery import recover
from node.scp import ActiveAssociations, Ingest, build_ae, event_handlers
from node.tracker import SeriesTracker
from node.worker import worker_main
from storage.db import make_engine
from storage.jobs import JobQueue
from storage.spool import Spool
from storage.store import JobStore

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
# Selection and export are cheap queries when idle; a short tick keeps them off the critical path.
FAST_TICK_SECONDS = 0.25
WORKER_STOP_SECONDS = 60


class NodeService:
    def __init__(self, settings: Settings, config_path: str | None = None, overrides: dict | None = None) -> None:
        self.settings = settings
        # Worker processes rebuild the same settings from the same sources.
        self._config_source = (config_path, overrides or {})
        self._workers: list[multiprocessing.process.BaseProcess] = []
        disable_pydicom_validation()
        shorten_acceptor_reactor_sleep()
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine = make_engine(settings.storage.resolved_database_url)
        self.store = JobStore(self.engine)
        self.spool = Spool(settings.storage.spool_dir)
        self.active = ActiveAssociations()
        self.ingest = Ingest(self.spool, self.store, settings.storage.min_free_disk_mb)
        self.tracker = SeriesTracker(self.store, settings.series, self.active.senders_active)
        self.queue = JobQueue(self.engine)
        self.dispatcher = Dispatcher(self.queue, self.spool)
        self.exporter = Exporter(self.queue, settings.destinations, settings.node.ae_title, settings.export)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.ae = build_ae(settings)
        self._server = None
        self.port: int | None = None

    def start(self) -> None:
        recover(self.spool, self.store)
        requeued = self.queue.requeue_interrupted()
        if requeued:
            log.warning("%d job(s) interrupted by a previous stop were queued again", requeued)
        for job_id, func, seconds in (
            ("series-completion", self.tracker.tick, TICK_SECONDS),
            ("selection", self.dispatcher.run, FAST_TICK_SECONDS),
            ("export", self.exporter.run_due, FAST_TICK_SECONDS),
        ):
            self.scheduler.add_job(
                self._guarded, "interval", args=[job_id, func], seconds=seconds, id=job_id,
                max_instances=1, coalesce=True,
            )
        self.scheduler.start()
        self._start_workers()
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

    @staticmethod
    def _guarded(name: str, func) -> None:  # noqa: ANN001
        try:
            func()
        except Exception:
            log.exception("%s step failed; retrying on the next tick", name)

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self.settings.worker.processes):
            process = context.Process(
                target=worker_main, args=self._config_source, name=f"migraine-node-worker-{index}", daemon=True
            )
            process.start()
            self._workers.append(process)
        if self._workers:
            log.info("started %d classification worker process(es)", len(self._workers))

    def _stop_workers(self) -> None:
        for process in self._workers:
            process.terminate()  # SIGTERM: the worker finishes its current job and exits
        for process in self._workers:
            process.join(WORKER_STOP_SECONDS)
            if process.is_alive():
                log.warning("worker %s did not stop in %d s; killing it (its job is requeued at start-up)",
                            process.name, WORKER_STOP_SECONDS)
                process.kill()
                process.join()
        self._workers.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self._stop_workers()
        self.engine.dispose()
        log.info("migraine-node stopped")

    def serve_forever(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
