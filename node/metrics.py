"""What the administrator sees: Prometheus metrics, /healthz, and the hooks that feed them and the audit trail.

`serve` with `[metrics] port` set (0 = off) answers on `[metrics] host` (loopback by default):

- GET /metrics: the Prometheus text format (OpenMetrics when the scraper asks for it);
- GET /healthz: 200 "ok" when the database answers within DATABASE_TIMEOUT_SECONDS and, in a
  process that runs classification workers, at least one of them is alive; else 503 with the
  reasons, one per line.

The registry is the node's own (not prometheus_client's global one). Two kinds of metric:

- counted here, in this process, as things happen: instances received by outcome, associations
  accepted and refused by reason (node/scp.py), deliveries by destination and result
  (node/export.py). They start at 0 with the process, as Prometheus counters do.
- read from the job database at each scrape (`_DatabaseCollector`): series by state, queue depth,
  deliveries by state, the oldest undelivered result's age, and the stage durations of jobs
  finished since the last scrape (the `timings` each worker process records on its job), so they
  cover every process and machine sharing the database: with several `serve --role` processes,
  take these from any one of them rather than summing them.

Labels never carry patient data, UIDs or addresses: outcomes, reasons and states come from the
fixed sets below, destinations are the configured names.

node/observer.py's `Observer` is the node's hook object: node/scp.py and node/export.py call it, it
counts here and writes the audit trail (storage/audit.py). Its methods never raise into the SCP or the
exporter.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import Engine, func, select, text

from node import __version__
from storage.models import Delivery, DeliveryState, Job, Series, SeriesState

log = logging.getLogger(__name__)

REFUSAL_REASONS = ("network", "calling_ae_title", "called_ae_title", "too_many_associations", "user_identity",
                   "other")
"""Why an association was refused: its address is outside allowed_networks; the calling AE title is not in
allowed_calling_aets; the called AE title is not ours; max_associations are open; user identity; anything else."""
# pynetdicom's A-ASSOCIATE-RJ (result, source, diagnostic) -> reason (acse.py _negotiate_as_acceptor)
_REJECT_REASONS = {(1, 1, 3): "calling_ae_title", (1, 1, 7): "called_ae_title", (2, 2, 1): "user_identity",
                   (2, 3, 2): "too_many_associations"}
INSTANCE_OUTCOMES = ("new", "duplicate", "replaced", "refused", "error")
"""A C-STORE's outcome: stored for the first time, the same again, different content under a known UID,
refused with a failure status (node/errors.py StoreStatus), or an unexpected error (0x0110)."""
DELIVERY_RESULTS = ("sent", "retry", "failed")
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                 3600.0)
QUEUE_WAIT = "queue_wait"
"""The stage name of the wait from selection (queued) to a worker's claim; the others are the worker's
(node/worker.py: load, assemble, preprocess, inference, report, write)."""
DATABASE_TIMEOUT_SECONDS = 5.0
UNFINISHED_JOB_STATES = (SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.CLASSIFYING)
"""Job states from which a job may still record timings."""
DEMO_MODEL_DIR = Path("models") / "demo"
"""Under data_dir: model/demo.py default_demo_dir (not imported: it pulls in scipy)."""


def model_identity(settings) -> dict[str, str]:  # noqa: ANN001
    """The info metric's model labels from the checkpoint's sidecar, without importing torch.

    model_id as on every result (model/checkpoint.py: "<name>@<first 12 hex of sha256>"); without a
    checkpoint, the synthetic demo model's once built.
    """
    directory = settings.model.checkpoint or settings.storage.data_dir / DEMO_MODEL_DIR
    try:
        info = json.loads((Path(directory) / "model.json").read_text())
        model_id = f"{info['name']}@{str(info['sha256'])[:12]}"
        synthetic = "true" if info.get("synthetic") else "false"
    except (OSError, ValueError, KeyError, TypeError):
        model_id, synthetic = ("unreadable checkpoint" if settings.model.checkpoint else "synthetic demo (not built)",
                               "false" if settings.model.checkpoint else "true")
    return {"model_id": model_id, "synthetic": synthetic,
            "checkpoint": "configured" if settings.model.checkpoint else "demo"}


class _DatabaseProbe:
    """`SELECT 1 FROM series` on its own thread, waited for at most `timeout`: a database that hangs
    (a PostgreSQL server gone without a reset) must not hang /healthz. Callers that arrive while a
    probe is under way wait for that one; a probe that hangs is never started twice."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self.engine, self.timeout = engine, timeout
        self._lock = threading.Lock()
        self._flight: dict | None = None

    def _run(self, flight: dict) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1 FROM series LIMIT 1")).all()
        except Exception as exc:  # noqa: BLE001 - reported by /healthz
            flight["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        finally:
            flight["done"].set()

    def check(self) -> str | None:
        """None when the database answered; else why not."""
        with self._lock:
            flight = self._flight
            if flight is None or flight["done"].is_set():
                flight = {"started": time.monotonic(), "done": threading.Event(), "error": None}
                self._flight = flight
                threading.Thread(target=self._run, args=(flight,), name="healthz-database", daemon=True).start()
        remaining = flight["started"] + self.timeout - time.monotonic()
        if not flight["done"].wait(max(0.0, remaining)):
            return f"no answer within {self.timeout:g} s"
        return flight["error"]


class _DatabaseCollector:
    """The metrics read from the job database at scrape time; `migraine_node_database_up` 0 when it fails."""

    def __init__(self, engine: Engine, settings, role: str, workers: Callable[[], tuple[int, int]] | None,  # noqa: ANN001
                 stage_seconds: Histogram) -> None:
        self.engine, self.settings, self.role, self.workers = engine, settings, role, workers
        self.stage_seconds = stage_seconds
        self._lock = threading.Lock()
        # Stage durations: jobs with id >= _low may still finish; _seen holds those among them already observed.
        self._low: int | None = None
        self._seen: set[int] = set()

    def prime(self) -> None:
        """Jobs finished before this process started are history, not news: never observed."""
        try:
            with self._lock, self.engine.connect() as conn:
                self._low = self._next_low(conn, 0)
                self._seen = set(conn.execute(select(Job.id).where(Job.id >= self._low,
                                                                   Job.timings.is_not(None))).scalars())
        except Exception:  # noqa: BLE001 - the first scrape tries again
            log.warning("metrics: cannot read the job database yet", exc_info=True)

    @staticmethod
    def _next_low(conn, low: int) -> int:  # noqa: ANN001
        """The smallest job id (>= low) that may still record timings; past the last job when none may.

        (With PostgreSQL, a job inserted by a transaction that commits after a later one's can land
        below it; a job that finishes in that window is not observed. The gauges are unaffected.)
        """
        unfinished = conn.execute(select(func.min(Job.id)).where(
            Job.id >= low, Job.state.in_(UNFINISHED_JOB_STATES), Job.timings.is_(None))).scalar()
        if unfinished is not None:
            return unfinished
        last = conn.execute(select(func.max(Job.id))).scalar()
        return max(low, (last or 0) + 1)

    def _observe_finished(self, conn) -> None:  # noqa: ANN001
        if self._low is None:
            self._low = self._next_low(conn, 0)
            self._seen = set(conn.execute(select(Job.id).where(Job.id >= self._low,
                                                               Job.timings.is_not(None))).scalars())
            return
        rows = conn.execute(select(Job.id, Job.timings, Job.queued_at, Job.claimed_at)
                            .where(Job.id >= self._low, Job.timings.is_not(None))).all()
        for row in rows:
            if row.id in self._seen:
                continue
            self._seen.add(row.id)
            try:
                timings = json.loads(row.timings)
            except ValueError:
                timings = {}
            for stage, ms in (timings.items() if isinstance(timings, dict) else ()):
                if isinstance(stage, str) and stage.isidentifier() and len(stage) <= 32 and isinstance(ms, int | float):
                    self.stage_seconds.labels(stage).observe(max(0.0, ms / 1000.0))
            if row.queued_at is not None and row.claimed_at is not None:
                self.stage_seconds.labels(QUEUE_WAIT).observe(max(0.0, row.claimed_at - row.queued_at))
        self._low = self._next_low(conn, self._low)
        self._seen = {job for job in self._seen if job >= self._low}

    def collect(self):  # noqa: ANN201
        info = InfoMetricFamily("migraine_node", "The node: release, role and the model it classifies with.")
        info.add_metric([], {"version": __version__, "role": self.role, **model_identity(self.settings)})
        yield info
        if self.workers is not None:
            alive, configured = self.workers()
            yield GaugeMetricFamily("migraine_node_worker_processes_alive",
                                    "Classification worker processes of this process that are alive.", value=alive)
            yield GaugeMetricFamily("migraine_node_worker_processes_configured",
                                    "[worker] processes.", value=configured)
        now = time.time()
        try:
            with self._lock, self.engine.connect() as conn:
                series = dict(conn.execute(select(Series.state, func.count()).group_by(Series.state)).all())
                queued = conn.execute(select(func.count()).select_from(Job)
                                      .where(Job.state == SeriesState.QUEUED)).scalar()
                deliveries = dict(conn.execute(select(Delivery.state, func.count())
                                               .group_by(Delivery.state)).all())
                # When a result became undelivered: its job turned `classified` (the result was made, or a
                # resend asked for it again); a delivery's own updated_at moves with every retry.
                oldest = conn.execute(
                    select(func.min(Job.updated_at)).join(Delivery, Delivery.job_id == Job.id)
                    .where(Delivery.state == DeliveryState.PENDING, Job.state == SeriesState.CLASSIFIED)).scalar()
                self._observe_finished(conn)
        except Exception as exc:  # noqa: BLE001 - a scrape says the database is down; /healthz says why
            log.warning("metrics: cannot read the job database: %s", type(exc).__name__)
            yield GaugeMetricFamily("migraine_node_database_up", "1 when the job database answered this scrape.",
                                    value=0)
            return
        yield GaugeMetricFamily("migraine_node_database_up", "1 when the job database answered this scrape.", value=1)
        family = GaugeMetricFamily("migraine_node_series", "Series by state (all versions' current state).",
                                   labels=["state"])
        for state in [s.value for s in SeriesState if s is not SeriesState.SUPERSEDED]:
            family.add_metric([state], series.get(state, 0))
        yield family
        yield GaugeMetricFamily("migraine_node_queue_depth", "Jobs queued for a classification worker.",
                                value=queued or 0)
        family = GaugeMetricFamily("migraine_node_deliveries", "Result deliveries by state.", labels=["state"])
        for state in DeliveryState:
            family.add_metric([state.value], deliveries.get(state.value, 0))
        yield family
        yield GaugeMetricFamily(
            "migraine_node_oldest_undelivered_result_age_seconds",
            "Age of the oldest result still pending delivery (since it was made or its resend was asked for); "
            "0 when none is pending.", value=0.0 if oldest is None else max(0.0, now - oldest))


# The counters an extra acceptor process (node/acceptor.py) keeps, in a fixed order: one slot each in
# a shared-memory array serve gives it (SharedCounts), folded into serve's own counters at each scrape.
ACCEPTOR_COUNTER_SLOTS = (
    *(("instances", (outcome,)) for outcome in INSTANCE_OUTCOMES),
    ("accepted", ()),
    *(("refused", (reason,)) for reason in REFUSAL_REASONS),
    ("audit_errors", ()),
)


class SharedCounts:
    """An acceptor's counters in shared memory (multiprocessing.RawArray of doubles, one per
    ACCEPTOR_COUNTER_SLOTS entry), written only by that acceptor and read by serve.

    The acceptor publishes its totals on top of what the array held when it started, so the counts
    of an acceptor that died and was restarted on the same array carry on, never go back.
    """

    _SLOTS = {entry: slot for slot, entry in enumerate(ACCEPTOR_COUNTER_SLOTS)}

    def __init__(self, array) -> None:  # noqa: ANN001
        self.array = array
        self._base = list(array)
        self._lock = threading.Lock()

    def publish(self, counter: str, labels: tuple[str, ...], child) -> None:  # noqa: ANN001
        """The new total of one counter (`child`: the prometheus_client counter or its labelled child)."""
        slot = self._SLOTS.get((counter, labels))
        if slot is not None:
            with self._lock:
                self.array[slot] = self._base[slot] + child._value.get()  # noqa: SLF001


class _AcceptorFold:
    """Registered before the counters: each scrape first adds what the extra acceptors counted since the
    last one to serve's own counters, so /metrics covers every process that accepts on the port."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        self.arrays: list = []
        self._seen: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def collect(self):  # noqa: ANN201
        with self._lock:
            for array in self.arrays:
                seen = self._seen.setdefault(id(array), [0.0] * len(ACCEPTOR_COUNTER_SLOTS))
                for slot, (counter, labels) in enumerate(ACCEPTOR_COUNTER_SLOTS):
                    delta = array[slot] - seen[slot]
                    if delta > 0:
                        self.metrics.count(counter, *labels, amount=delta)
                        seen[slot] = array[slot]
        return iter(())


class NodeMetrics:
    """The node's registry: counters updated in-process, and the database's gauges read at scrape time.

    `workers` (a process running classification workers): () -> (alive, configured).
    """

    def __init__(self, engine: Engine, settings, role: str = "all",  # noqa: ANN001
                 workers: Callable[[], tuple[int, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.workers = workers
        stage_seconds = Histogram("migraine_node_stage_duration_seconds",
                                  "Duration of each pipeline stage of the jobs finished since this process started.",
                                  ["stage"], buckets=STAGE_BUCKETS, registry=None)
        # Registered before the histogram: each scrape first observes the jobs finished since the last one.
        self._database = _DatabaseCollector(engine, settings, role, workers, stage_seconds)
        self.registry.register(self._database)
        self.registry.register(stage_seconds)
        self.stage_seconds = stage_seconds
        self._acceptors = _AcceptorFold(self)
        self.registry.register(self._acceptors)
        self.shared: SharedCounts | None = None  # in an extra acceptor: where its counts go
        self.instances = Counter("migraine_node_instances_received", "C-STORE requests received, by outcome.",
                                 ["outcome"], registry=self.registry)
        self.accepted = Counter("migraine_node_associations_accepted", "Associations accepted.",
                                registry=self.registry)
        self.refused = Counter("migraine_node_associations_refused", "Associations (and connections) refused, by "
                               "reason.", ["reason"], registry=self.registry)
        self.deliveries = Counter("migraine_node_deliveries", "Delivery attempts of results, by destination and "
                                  "result (sent, retry: failed for now, failed: for good).", ["destination", "result"],
                                  registry=self.registry)
        self.audit_errors = Counter("migraine_node_audit_write_errors", "Audit events that could not be written "
                                    "(the log says why).", registry=self.registry)
        for outcome in INSTANCE_OUTCOMES:
            self.instances.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        for destination in settings.destinations:
            for result in DELIVERY_RESULTS:
                self.deliveries.labels(destination.name, result)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._database.prime()
        self._probe = _DatabaseProbe(engine, DATABASE_TIMEOUT_SECONDS)

    def add_acceptor_counts(self, array) -> None:  # noqa: ANN001
        """serve: include an extra acceptor's shared counts (SharedCounts) in this registry's counters."""
        self._acceptors.arrays.append(array)

    def count(self, counter: str, *labels: str, amount: float = 1) -> None:
        metric = getattr(self, counter)
        child = metric.labels(*labels) if labels else metric
        child.inc(amount)
        if self.shared is not None:
            self.shared.publish(counter, labels, child)

    def health(self) -> list[str]:
        """Why this process is not healthy; empty when it is."""
        problems = []
        error = self._probe.check()
        if error is not None:
            problems.append(f"database: {error}")
        if self.workers is not None:
            alive, configured = self.workers()
            if configured and not alive:
                problems.append(f"workers: none of the {configured} classification worker process(es) is alive")
        return problems

    def serve(self, host: str, port: int) -> MetricsServer:
        """Start the HTTP server; OSError when the address cannot be bound."""
        return MetricsServer(host, port, self.registry, self.health).start()


class MetricsServer:
    """/metrics and /healthz over HTTP (threads; stopped by `stop`)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Callable[[], list[str]]) -> None:
        self.host, self.port, self.registry, self.health = host, port, registry, health
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry, health = self.registry, self.health

        class Handler(BaseHTTPRequestHandler):
            server_version = f"migraine-node/{__version__}"

            def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path
                try:
                    if path == "/metrics":
                        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                        self._answer(200, encoder(registry), content_type)
                    elif path == "/healthz":
                        problems = health()
                        self._answer(503 if problems else 200,
                                     ("\n".join(problems) if problems else "ok").encode() + b"\n")
                    elif path == "/":
                        self._answer(200, b"migraine-node: /metrics (Prometheus), /healthz\n")
                    else:
                        self._answer(404, b"not found: /metrics or /healthz\n")
                except Exception:  # noqa: BLE001 - a failed scrape must not end the server
                    log.exception("metrics: error answering %s", path)
                    self._answer(500, b"internal error (see the node's log)\n")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, format: str, *args) -> None:  # noqa: A002, ANN002
                log.debug("metrics: %s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> MetricsServer:
        server_class = type("MetricsHTTPServer", (ThreadingHTTPServer,), {
            "daemon_threads": True, "address_family": socket.AF_INET6 if ":" in self.host else socket.AF_INET})
        self._server = server_class((self.host, self.port), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"metrics-{self.port}", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
