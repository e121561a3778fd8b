"""The running node: SCP, completion tracker and timers wired together.

`NodeService` is what `migraine-node serve` runs, and what tests start
in-process on a free port. Its role says which parts run here (`serve --role`):

- ingest: the C-STORE SCP, start-up recovery of the spool, series completion and selection;
- worker: the classification worker processes, their supervision, and job leases;
- export: sending results to the destinations;
- all (default): everything, the single-machine node.

Several processes with any roles, on several machines, share one PostgreSQL database and one
spool on shared storage (docs/operations.md): claims of jobs and deliveries are exclusive there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import signal
import threading
import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Settings
from node.dimse_tuning import disable_pydicom_validation, shorten_acceptor_reactor_sleep
from node.dispatch import Dispatcher
from node.errors import ConfigError, NodeError
from node.export import Exporter
from node.metrics import ACCEPTOR_COUNTER_SLOTS, NodeMetrics
from node.observer import Observer
from node.recovery import SHARED_GRACE_SECONDS, recover
from node.scp import ActiveAssociations, Ingest, build_ae, event_handlers, start_acceptor
from node.tls import server_context
from node.tracker import SeriesTracker
from node.worker import worker_main
from storage.db import make_engine
from storage.jobs import JobQueue
from storage.spool import Spool
from storage.store import JobStore

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
# Selection and export also run at once when woken (a series completed, a result is ready); the
# tick is what catches the rest (retries, replays from the command line).
FAST_TICK_SECONDS = 0.25
ROLES = ("all", "ingest", "worker", "export", "acceptor")  # "acceptor": node/acceptor.py, internal
# Retention (storage/retention.py) runs this often, one small batch of series each time.
RETENTION_SECONDS = 600.0
# How long `stop` waits for a worker to finish its current job before killing it.
# deploy/migraine-node.service's TimeoutStopSec must stay above this (tests/node/test_supervision.py).
WORKER_STOP_SECONDS = 60
# Worker supervision: how often `serve` looks at its workers, and how a worker that
# keeps dying soon after its start is restarted (doubling delay, capped).
SUPERVISE_SECONDS = 1.0
QUICK_DEATH_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 30.0


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def check_model(settings: Settings) -> None:
    """Refuse to start with a model the workers could not load, or that should not reach a PACS.

    Runs in `serve` before any worker is spawned, without importing torch: the
    sidecar must be readable and the weights must match its sha256 (the worker
    checks again when it loads them).
    """
    checkpoint = settings.model.checkpoint
    if checkpoint is None:
        if settings.destinations and not settings.model.allow_synthetic_demo_model:
            raise ConfigError(
                "no [model] checkpoint configured and [[destinations]] are set: refusing to send results of the "
                "synthetic demo model to a PACS (set [model] checkpoint, or [model] allow_synthetic_demo_model = true)")
        return
    # Names as in model/checkpoint.py (not imported: it pulls in torch).
    sidecar, weights = Path(checkpoint) / "model.json", Path(checkpoint) / "weights.pt"
    try:
        info = json.loads(sidecar.read_text())
        expected = str(info["sha256"])
    except FileNotFoundError:
        raise ConfigError(f"[model] checkpoint: {sidecar} not found: not a checkpoint directory") from None
    except OSError as exc:
        raise ConfigError(f"[model] checkpoint: cannot read {sidecar}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"[model] checkpoint: {sidecar} is not a valid sidecar ({type(exc).__name__})") from None
    digest = hashlib.sha256()
    try:
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise ConfigError(f"[model] checkpoint: {weights} not found") from None
    except OSError as exc:
        raise ConfigError(f"[model] checkpoint: cannot read {weights}: {exc.strerror}") from None
    if digest.hexdigest() != expected:
        raise ConfigError(f"[model] checkpoint: {weights} is corrupted or was replaced (sha256 does not match "
                          f"{sidecar.name})")


class Stage:
    """One step of the pipeline on its own thread: `func` runs every `seconds`, and at once when
    `signal` (a threading or multiprocessing semaphore) is released.

    Never two runs at a time; wake-ups that arrive during a run bring one more run right after
    it. Exceptions are logged and the next tick retries.
    """

    def __init__(self, name: str, func, seconds: float, signal=None) -> None:  # noqa: ANN001
        self.name, self.func, self.seconds = name, func, seconds
        self.signal = signal if signal is not None else threading.Semaphore(0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self.signal.release()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"stage-{self.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            while self.signal.acquire(False):
                pass  # every wake-up so far is served by this run
            NodeService._guarded(self.name, self.func)
            self.signal.acquire(timeout=self.seconds)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self.signal.release()
            self._thread.join()
            self._thread = None


class NodeService:
    def __init__(self, settings: Settings, config_path: str | None = None, overrides: dict | None = None,
                 role: str = "all") -> None:
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        self.settings = settings
        self.role = role
        # Worker processes rebuild the same settings from the same sources.
        self._config_source = (config_path, overrides or {})
        self._workers: list[multiprocessing.process.BaseProcess] = []
        self._acceptors: list[multiprocessing.process.BaseProcess] = []
        self._acceptors_stop = threading.Event()
        self._acceptor_supervisor: threading.Thread | None = None
        self._worker_started: list[float] = []
        self._quick_deaths: list[int] = []
        self._restart_at: dict[int, float] = {}  # worker index -> when its replacement starts
        self._supervisor_stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        disable_pydicom_validation()
        shorten_acceptor_reactor_sleep()
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine = make_engine(settings.storage.resolved_database_url)
        self.store = JobStore(self.engine)
        self.spool = Spool(settings.storage.spool_dir)
        self.active = ActiveAssociations()
        self.ingest = Ingest(self.spool, self.store, settings.storage.min_free_disk_mb)
        self.tracker = SeriesTracker(self.store, settings.series, self.active.senders_active)
        self.queue = JobQueue(self.engine, lease_seconds=settings.worker.lease_seconds)
        self.dispatcher = Dispatcher(self.queue, self.spool)
        self.exporter = Exporter(self.queue, settings.destinations, settings.node.ae_title, settings.export)
        # What the administrator sees (node/metrics.py): counters, the database's gauges, /healthz, and the
        # audit trail the SCP and the exporter write through the observer.
        self.metrics = NodeMetrics(self.engine, settings, role, workers=(
            (lambda: (len(self.worker_pids()), settings.worker.processes)) if self.runs("worker") else None))
        self.observer = self.exporter.observer = Observer(self.engine, settings.node.ae_title, self.metrics)
        self._metrics_server = None
        # Released by serve once per queued job (a waiting worker takes it at once), and by a worker
        # for each result to export; semaphores survive a worker killed while waiting on them.
        self._work_ready = self._results_ready = None
        if self.runs("worker") and settings.worker.processes:
            spawn = multiprocessing.get_context("spawn")
            self._work_ready, self._results_ready = spawn.Semaphore(0), spawn.Semaphore(0)
        self.selection = Stage("selection", self._select, FAST_TICK_SECONDS)
        self.export = Stage("export", self.exporter.run_due, FAST_TICK_SECONDS, self._results_ready)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.ae = build_ae(settings)
        self._server = None
        self._tls_server = None
        self.port: int | None = None  # the plain DICOM port; None when [node.tls] plain = false
        self.tls_port: int | None = None  # the TLS port, when [node.tls] enabled

    def start(self) -> None:
        """Start everything, or nothing: a failure stops what had started and raises.

        The model is checked and the port bound before any worker process is spawned,
        so a start-up error leaves no process behind.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def runs(self, part: str) -> bool:
        """Whether this process runs `part` (ingest, worker or export) of the node.

        An extra acceptor (node/acceptor.py) runs only the SCP and series completion of ingest.
        """
        if self.role == "acceptor":
            return part == "ingest"
        return self.role in ("all", part)

    @property
    def _main_process(self) -> bool:
        return self.role != "acceptor"

    def _start(self) -> None:
        if self.runs("worker") and self.settings.worker.processes:
            check_model(self.settings)
        shared = self.engine.dialect.name != "sqlite"  # other nodes may be writing now
        if self.runs("ingest") and self._main_process:
            recover(self.spool, self.store, grace_seconds=SHARED_GRACE_SECONDS if shared else 0.0)
        if self.runs("export"):
            released = self.queue.release_interrupted_deliveries()
            if released:
                log.warning("%d delivery(ies) interrupted by a previous stop are due again", released)
        if self.runs("worker"):
            requeued = self.queue.requeue_interrupted()
            if requeued:
                log.warning("%d job(s) interrupted by a previous stop were queued again", requeued)
        node = self.settings.node
        if self.runs("ingest"):
            handlers = event_handlers(self.settings, self.ingest, self.active, self._association_ended, self.observer)
            # TLS stays with the main process; extra acceptors share only the plain port.
            tls_context = server_context(node.tls) if node.tls.enabled and self._main_process else None  # ConfigError before binding
            if tls_context is None or node.tls.plain:
                try:
                    self._server = start_acceptor(self.ae, (node.host, node.port), handlers, node.allowed_networks,
                                                  observer=self.observer, reuse_port=node.acceptors > 1)
                except OSError as exc:
                    raise NodeError(f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc}") from None
                self.port = self._server.server_address[1]
            if tls_context is not None:
                try:
                    self._tls_server = start_acceptor(self.ae, (node.host, node.tls.port), handlers,
                                                      node.allowed_networks, ssl_context=tls_context,
                                                      observer=self.observer)
                except OSError as exc:
                    raise NodeError(f"[node.tls] cannot listen on {node.host}:{node.tls.port}: "
                                    f"{exc.strerror or exc}") from None
                self.tls_port = self._tls_server.server_address[1]
            self.scheduler.add_job(
                self._guarded, "interval", args=["series-completion", self._complete], seconds=TICK_SECONDS,
                id="series-completion", max_instances=1, coalesce=True,
            )
            if self._main_process:
                self.scheduler.add_job(
                    self._guarded, "interval", args=["retention", self._purge], seconds=RETENTION_SECONDS,
                    id="retention", max_instances=1, coalesce=True,
                )
        metrics = self.settings.metrics
        if metrics.port and self._main_process:  # before any worker is spawned, like the DICOM port
            try:
                self._metrics_server = self.metrics.serve(metrics.host, metrics.port)
            except OSError as exc:
                raise NodeError(f"[metrics] cannot listen on {metrics.host}:{metrics.port}: "
                                f"{exc.strerror or exc}") from None
        lease = self.settings.worker.lease_seconds
        self.scheduler.add_job(
            self._guarded, "interval", args=["job-leases", self._expire_leases], seconds=lease / 4,
            id="job-leases", max_instances=1, coalesce=True,
        )
        self.scheduler.start()
        if self.runs("ingest") and self._main_process:
            self.selection.start()
        if self.runs("export"):
            self.export.start()
        if self.runs("worker"):
            self._start_workers()
        if self.runs("ingest") and self._main_process and node.acceptors > 1:
            self._start_acceptors(node.acceptors - 1)
        if self.runs("ingest"):
            ports = ", ".join([*([f"{self.port}"] if self.port else []),
                               *([f"{self.tls_port} (TLS)"] if self.tls_port else [])])
            log.info("migraine-node (role %s) listening on %s port %s as %s (data_dir=%s, database %s)", self.role,
                     node.host, ports, node.ae_title, self.settings.storage.data_dir, self.engine.dialect.name)
        else:
            log.info("migraine-node (role %s) running (data_dir=%s, database %s)", self.role,
                     self.settings.storage.data_dir, self.engine.dialect.name)

    def _purge(self) -> None:
        from storage.retention import purge, purge_audit, result_folders

        storage = self.settings.storage
        purge(self.engine, self.spool, storage.retention_days, storage.skipped_retention_days,
              result_roots=result_folders(storage.data_dir))
        removed = purge_audit(self.engine, storage.audit_retention_days)
        if removed:
            log.info("retention: removed %d audit event(s) older than %g days", removed, storage.audit_retention_days)

    def _expire_leases(self) -> None:
        worker = self.settings.worker
        for job_id, owner, state in self.queue.expire_leases(worker.max_attempts, worker.retry_seconds):
            log.error("job %d: the lease of %s expired (its worker or machine stopped); the job is now %s",
                      job_id, owner, state)

    def _association_ended(self, series_instance_uids) -> None:  # noqa: ANN001
        """A sender released: series that reached their expected count complete, and go to selection now."""
        self.tracker.association_ended(series_instance_uids)
        self.selection.wake()

    def _complete(self) -> None:
        if self.tracker.tick():
            self.selection.wake()

    def _select(self) -> None:
        """Select what completed; a waiting worker takes each queued job at once.

        One permit per job queued (skipped and failed series wake nobody), at most one per worker
        process: a permit no job waits for makes an idle worker query the queue for nothing.
        """
        queued = self.dispatcher.select_all().queued
        if self._work_ready is not None:
            for _ in range(min(queued, self.settings.worker.processes)):
                self._work_ready.release()

    @staticmethod
    def _guarded(name: str, func) -> None:  # noqa: ANN001
        try:
            func()
        except Exception:
            log.exception("%s step failed; retrying on the next tick", name)

    def _spawn_worker(self, index: int) -> multiprocessing.process.BaseProcess:
        process = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(*self._config_source, self._work_ready, self._results_ready),
            name=f"migraine-node-worker-{index}", daemon=True
        )
        process.start()
        return process

    def _start_workers(self) -> None:
        for index in range(self.settings.worker.processes):
            self._workers.append(self._spawn_worker(index))
            self._worker_started.append(time.monotonic())
            self._quick_deaths.append(0)
        if self._workers:
            log.info("started %d classification worker process(es): pid %s", len(self._workers),
                     ", ".join(str(p.pid) for p in self._workers))
            # Replacements are spawned by this long-lived thread: a worker's PR_SET_PDEATHSIG
            # fires when the *thread* that spawned it ends, so never from a pool thread.
            self._supervisor_stop.clear()
            self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        while not self._supervisor_stop.wait(SUPERVISE_SECONDS):
            try:
                self.check_workers()
            except Exception:
                log.exception("worker supervision failed; retrying in %g s", SUPERVISE_SECONDS)

    def check_workers(self) -> None:
        """Restart workers that died; the job a dead worker held counts one attempt."""
        now = time.monotonic()
        worker = self.settings.worker
        for index, process in enumerate(self._workers):
            if self._supervisor_stop.is_set():
                return
            restart_at = self._restart_at.get(index)
            if restart_at is None:
                if process.is_alive():
                    continue
                process.join(0)
                cause = f"worker process {process.pid} died ({_describe_exit(process.exitcode)})"
                released = self.queue.requeue_jobs_of(process.pid, worker.max_attempts, worker.retry_seconds, cause)
                quick = now - self._worker_started[index] < QUICK_DEATH_SECONDS
                self._quick_deaths[index] = self._quick_deaths[index] + 1 if quick else 0
                delay = 0.0 if not quick else min(MAX_RESTART_DELAY_SECONDS, 2.0 ** (self._quick_deaths[index] - 1))
                log.error("%s; %s; restarting it%s", cause,
                          ", ".join(f"its job {job} is now {state}" for job, state in released) or "it held no job",
                          f" in {delay:g} s" if delay else "")
                restart_at = self._restart_at[index] = now + delay
            if now >= restart_at and not self._supervisor_stop.is_set():
                del self._restart_at[index]
                self._workers[index] = self._spawn_worker(index)
                self._worker_started[index] = time.monotonic()
                log.info("worker %d restarted: pid %d", index, self._workers[index].pid)

    def _start_acceptors(self, count: int) -> None:
        """Extra acceptor processes on the plain port (node/acceptor.py), spawned and restarted by one
        long-lived thread (a child's PR_SET_PDEATHSIG fires when the thread that spawned it ends)."""
        if self._server is None:
            log.warning("[node] acceptors = %d ignored: the plain port is closed ([node.tls] plain = false)",
                        count + 1)
            return
        self._acceptors_stop.clear()
        self._acceptor_supervisor = threading.Thread(target=self._supervise_acceptors, args=(count,),
                                                     name="acceptor-supervisor", daemon=True)
        self._acceptor_supervisor.start()

    def _supervise_acceptors(self, count: int) -> None:
        from node.acceptor import acceptor_main

        spawn = multiprocessing.get_context("spawn")
        # Each acceptor's counters, in shared memory serve folds into /metrics; kept across restarts.
        counts = [spawn.RawArray("d", len(ACCEPTOR_COUNTER_SLOTS)) for _ in range(count)]
        for array in counts:
            self.metrics.add_acceptor_counts(array)

        def start(index: int) -> multiprocessing.process.BaseProcess:
            process = spawn.Process(target=acceptor_main, args=(*self._config_source, counts[index]),
                                    name=f"migraine-node-acceptor-{index}", daemon=True)
            process.start()
            return process

        self._acceptors = [start(i) for i in range(count)]
        log.info("started %d extra acceptor process(es) on port %d: pid %s", count, self.port,
                 ", ".join(str(p.pid) for p in self._acceptors))
        while not self._acceptors_stop.wait(SUPERVISE_SECONDS):
            for index, process in enumerate(self._acceptors):
                if not process.is_alive() and not self._acceptors_stop.is_set():
                    process.join(0)
                    log.error("acceptor process %d died (%s); restarting it", process.pid,
                              _describe_exit(process.exitcode))
                    self._acceptors[index] = start(index)
        for process in self._acceptors:
            if process.is_alive():
                process.terminate()  # SIGTERM: it stops accepting, lets its associations end, exits
        for process in self._acceptors:
            process.join(WORKER_STOP_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()

    def acceptor_pids(self) -> list[int]:
        return [p.pid for p in self._acceptors if p.is_alive()]

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers if p.is_alive()]

    def _stop_workers(self) -> None:
        self._supervisor_stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        for process in self._workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes its current job and exits
        for process in self._workers:
            process.join(WORKER_STOP_SECONDS)
            if process.is_alive():
                log.warning("worker %s did not stop in %d s; killing it (its job is requeued at start-up)",
                            process.name, WORKER_STOP_SECONDS)
                process.kill()
                process.join()
        self._workers.clear()
        self._worker_started.clear()
        self._quick_deaths.clear()
        self._restart_at.clear()

    def _stop_acceptors(self) -> None:
        self._acceptors_stop.set()
        if self._acceptor_supervisor is not None:
            self._acceptor_supervisor.join()
            self._acceptor_supervisor = None
        self._acceptors.clear()

    def stop(self) -> None:
        self._stop_acceptors()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.selection.stop()
        self.export.stop()
        self._stop_workers()
        self.engine.dispose()
        log.info("migraine-node stopped")

    def serve_forever(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
