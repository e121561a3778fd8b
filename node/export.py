"""Export: send each pending result to its destination, retried until delivered.

A result is the SR and, where a destination asks for it (`objects`), the
result image. A delivery is sent when every object it carries was stored.
Each acknowledged object is recorded with the destination's status (`show`
lists them). State lives in the database, so a delivery survives restarts.

DICOM destinations (ae_title/host/port) get C-STORE: one association per
destination per batch, proposing the SOP classes of the objects to send.
Temporary failures (connection refused, timeout, abort, 0xA7xx out of
resources) are retried with exponential backoff and jitter; permanent ones
(association rejected, 0xA9xx/0xCxxx refusals, SOP class not supported) fail
the delivery at once with the reason. Warning statuses (0xBxxx, 0x0001,
0x0107, 0x0116) mean the object was stored. A destination with `tls` is reached
over DICOM TLS (node/tls.py); a PACS certificate that is not trusted, or a
handshake the PACS refuses (our certificate, TLS version, ciphers), fails the
delivery at once with the reason; unusable key or certificate files too.

DICOMweb destinations (url) get STOW-RS (node/dicomweb.py): one POST of the
delivery's objects to <url>/studies per delivery, over one keep-alive HTTP
connection per batch, with HTTP basic or bearer credentials read from the
environment variable the destination names (never stored or logged). The
HTTP status is what is recorded per object. Connection errors, timeouts, 408,
429 and 5xx are temporary (a delivery after a temporary failure in a batch
waits for the next attempt too); other answers that store nothing (4xx, 409
conflict) fail the delivery at once with the status line and the server's
reason (FailureReason of FailedSOPSequence, or a short quote of the body); a
202 stores only the objects it lists as referenced. A missing credentials
variable fails the delivery at once, naming the variable.

Any other error while sending is recorded on the delivery as a temporary
failure with backoff, never raised to the scheduler. A destination that stays
down logs its retry warning only when the reason changes or every
RETRY_LOG_INTERVAL seconds; the reason is always on the delivery row (`show`,
`status`).
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node import dicomweb
from node.config import Destination, ExportSection
from node.dimse_tuning import node_ae
from node.errors import ConfigError
from node.logs import log_context
from node.tls import failure as tls_failure
from node.tls import tls_args
from storage.jobs import DueDelivery, JobQueue, ResultFile

log = logging.getLogger(__name__)

WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
"""C-STORE warnings outside 0xBxxx (PS3.7 C.4.2.1.4): the object was stored."""

CLAIM_LIMIT = 20
"""Deliveries taken per run. They are leased for timeout x (CLAIM_LIMIT + 2): long enough to send
them all one after another, after which another exporter may take what is left unsent."""

RETRY_LOG_INTERVAL = 600.0
"""Seconds between repeated retry warnings for one destination failing with the same reason."""


@dataclass(frozen=True)
class Outcome:
    sent: bool
    permanent: bool
    message: str


def classify_status(status: int | None) -> Outcome:
    """C-STORE response status -> outcome (PS3.4 B.2.3)."""
    if status is None:
        return Outcome(False, False, "no response (timeout or aborted association)")
    if status == 0x0000:
        return Outcome(True, False, "stored (0x0000)")
    if 0xB000 <= status <= 0xBFFF or status in WARNING_STATUSES:
        return Outcome(True, False, f"stored with warning (0x{status:04X})")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(False, False, f"out of resources at the destination (0x{status:04X})")
    return Outcome(False, True, f"refused with status 0x{status:04X}")


def backoff_seconds(attempts: int, section: ExportSection, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: initial x 2^(attempts-1), capped, times U(0.5, 1)."""
    base = min(section.retry_max_seconds, section.retry_initial_seconds * 2 ** max(0, attempts - 1))
    return base * (rng or random).uniform(0.5, 1.0)


class Exporter:
    def __init__(self, queue: JobQueue, destinations: list[Destination], calling_ae_title: str, section: ExportSection):
        self.queue = queue
        self.destinations = {d.name: d for d in destinations}
        self.calling_ae_title = calling_ae_title
        self.section = section
        self._retry_logged: dict[str, tuple[str, float]] = {}  # destination -> (reason, when) last warned
        self.observer = None  # node/metrics.py Observer (set by serve): counts deliveries, audits objects sent

    def run_due(self, now: float | None = None) -> int:
        """Send every due delivery; returns how many were attempted."""
        batches: dict[str, list[DueDelivery]] = defaultdict(list)
        for item in self.queue.claim_deliveries(now, limit=CLAIM_LIMIT,
                                                lease_seconds=self.section.timeout_seconds * (CLAIM_LIMIT + 2)):
            batches[item.destination].append(item)
        for name, items in batches.items():
            destination = self.destinations.get(name)
            if destination is None:
                for item in items:
                    self.queue.delivery_failed(item.delivery_id, f"destination {name!r} is no longer configured")
                continue
            recorded: set[int] = set()
            try:
                self._send_batch(destination, items, recorded)
            except Exception as exc:  # noqa: BLE001 - never escapes to the scheduler (it would retry at once)
                message = f"error sending to {name}: {type(exc).__name__}: {exc}"
                log.debug("export to %s raised", name, exc_info=True)
                for item in items:
                    if item.delivery_id not in recorded:
                        try:
                            self._record(item, Outcome(False, False, message))
                        except Exception:  # noqa: BLE001 - the database itself failed; next tick retries
                            log.exception("cannot record the failed delivery %d to %s", item.delivery_id, name)
        return sum(len(v) for v in batches.values())

    def _send_batch(self, destination: Destination, items: list[DueDelivery], recorded: set[int]) -> None:
        """Send one destination's due deliveries; `recorded` collects the ids whose outcome is recorded."""
        wanted = {item.delivery_id: [o for o in item.objects if o.kind in destination.objects] for item in items}
        for item in items:
            if not wanted[item.delivery_id]:
                kinds = ", ".join(o.kind for o in item.objects) or "nothing"
                self._record(item, Outcome(False, True, f"the result holds {kinds}; {destination.name} takes "
                                                        f"{', '.join(destination.objects)}"))
                recorded.add(item.delivery_id)
        items = [item for item in items if wanted[item.delivery_id]]
        if not items:
            return
        if destination.is_dicomweb:
            self._send_batch_dicomweb(destination, items, wanted, recorded)
        else:
            self._send_batch_dimse(destination, items, wanted, recorded)

    def _send_batch_dimse(self, destination: Destination, items: list[DueDelivery],
                          wanted: dict[int, list[ResultFile]], recorded: set[int]) -> None:
        """C-STORE over one association: each delivery's objects in turn."""
        ae = node_ae(self.calling_ae_title)
        timeout = self.section.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class_uid in sorted({o.sop_class_uid for objs in wanted.values() for o in objs}):
            ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        where = destination.describe()
        try:
            tls = tls_args(destination)
        except ConfigError as exc:  # the key or certificate files of the destination's tls cannot be used
            for item in items:
                self._record(item, Outcome(False, True, str(exc)))
                recorded.add(item.delivery_id)
            return
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
        if assoc.is_rejected:
            for item in items:
                self._record(item, Outcome(False, True, f"association rejected by {where}"))
                recorded.add(item.delivery_id)
            return
        if not assoc.is_established:
            # A TLS failure says why; an untrusted certificate or refused handshake needs a configuration change.
            failed = tls_failure(tls[0]) if tls else None
            outcome = (Outcome(False, failed[0], f"cannot connect to {where}: {failed[1]}") if failed
                       else Outcome(False, False, f"cannot connect to {where}"))
            for item in items:
                self._record(item, outcome)
                recorded.add(item.delivery_id)
            return
        try:
            for item in items:
                outcome, sent = self._send_objects(assoc, wanted[item.delivery_id])
                self._record(item, outcome, sent)
                recorded.add(item.delivery_id)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_batch_dicomweb(self, destination: Destination, items: list[DueDelivery],
                             wanted: dict[int, list[ResultFile]], recorded: set[int]) -> None:
        """STOW-RS: one POST per delivery over one keep-alive connection.

        After a temporary failure (no answer, 408/429/5xx) the batch stops: the deliveries not
        yet tried get the same outcome (the same message, so the retry warning is not repeated
        for each), and wait for their backoff too.
        """
        where = dicomweb.where(destination)
        try:
            client = dicomweb.DicomWebClient(destination, self.section.timeout_seconds)
        except ConfigError as exc:  # the credentials variable is missing or malformed, the url unusable
            for item in items:
                self._record(item, Outcome(False, True, str(exc)))
                recorded.add(item.delivery_id)
            return
        with client:
            stop: Outcome | None = None
            for item in items:
                if stop is not None:
                    outcome, sent = stop, ()
                else:
                    try:
                        outcome, sent = self._stow(client, where, wanted[item.delivery_id])
                    except Exception as exc:  # noqa: BLE001 - recorded here, redacted: run_due would keep the text
                        log.debug("STOW-RS to %s raised %s", destination.name, type(exc).__name__)
                        message = client.redact(f"error sending to {where}: {type(exc).__name__}: {exc}")
                        outcome, sent = Outcome(False, False, message), ()
                    if not outcome.sent and not outcome.permanent:
                        stop = outcome
                self._record(item, outcome, sent)
                recorded.add(item.delivery_id)

    @staticmethod
    def _stow(client: dicomweb.DicomWebClient, where: str,
              objects: list[ResultFile]) -> tuple[Outcome, tuple[tuple[ResultFile, int], ...]]:
        """POST one delivery's objects; it is sent when the answer says each of them was stored."""
        try:
            parts = [Path(obj.path).read_bytes() for obj in objects]
        except OSError as exc:
            return Outcome(False, True, f"cannot read a result file: {exc}"), ()
        try:
            answer = client.store(parts)
        except dicomweb.TransportError as exc:
            return Outcome(False, False, str(exc)), ()
        labels = {obj.sop_instance_uid: obj.kind for obj in objects}
        result = dicomweb.classify_store_response(answer.status, answer.reason, answer.content_type, answer.body,
                                                  [obj.sop_instance_uid for obj in objects], labels)
        sent = tuple((obj, answer.status) for obj in objects if obj.sop_instance_uid in result.stored)
        if result.all_stored:
            warnings = sorted({code for code in result.stored.values() if code is not None})
            note = f" with warning {', '.join(f'0x{c:04X}' for c in warnings)}" if warnings else ""
            return Outcome(True, False, f"stored (HTTP {answer.status}){note}"), sent
        message = f"STOW-RS to {where}: {result.message}"
        if answer.status in (401, 403) and client.destination.credentials_env:
            message += f" (check the credentials in ${client.destination.credentials_env})"
        elif answer.status in (401, 403):
            message += " (the destination wants credentials: set auth and credentials_env)"
        return Outcome(False, not result.transient, client.redact(message)), sent

    @staticmethod
    def _send_objects(assoc, objects: list[ResultFile]) -> tuple[Outcome, tuple[tuple[ResultFile, int], ...]]:  # noqa: ANN001
        """Send each object in turn; the first that is not stored decides the outcome."""
        sent: list[tuple[ResultFile, int]] = []
        for obj in objects:
            try:
                status = assoc.send_c_store(obj.path)
                code = int(status.Status) if status else None
            except (OSError, ValueError, RuntimeError) as exc:
                return Outcome(False, True, f"cannot send the {obj.kind} file: {exc}"), tuple(sent)
            outcome = classify_status(code)
            if not outcome.sent:
                return Outcome(False, outcome.permanent, f"{obj.kind}: {outcome.message}"), tuple(sent)
            sent.append((obj, code))
        return Outcome(True, False, "stored"), tuple(sent)

    def _record(self, item: DueDelivery, outcome: Outcome, sent: tuple = ()) -> None:  # noqa: ANN001
        with log_context(job=item.job_id, series=item.series_instance_uid):
            if sent:
                self.queue.record_sent(item.delivery_id, sent)
            if outcome.sent:
                self.queue.delivery_sent(item.delivery_id)
                self._retry_logged.pop(item.destination, None)
                log.info("result %s delivered to %s (%s)", item.sr_sop_instance_uid, item.destination,
                         ", ".join(f"{o.kind} {o.sop_instance_uid}" for o, _ in sent))
            elif outcome.permanent or item.attempts + 1 >= self.section.max_attempts:
                self.queue.delivery_failed(item.delivery_id, outcome.message)
                log.error("result delivery to %s failed: %s", item.destination, outcome.message)
            else:
                delay = backoff_seconds(item.attempts + 1, self.section)
                now = time.time()
                self.queue.delivery_retry(item.delivery_id, outcome.message, now + delay)
                last = self._retry_logged.get(item.destination)
                if last is None or last[0] != outcome.message or now - last[1] >= RETRY_LOG_INTERVAL:
                    self._retry_logged[item.destination] = (outcome.message, now)
                    log.warning("result delivery to %s will be retried in %.0f s: %s (repeats of this reason are "
                                "logged at most every %.0f min)", item.destination, delay, outcome.message,
                                RETRY_LOG_INTERVAL / 60)
                else:
                    log.debug("result delivery to %s will be retried in %.0f s: %s", item.destination, delay,
                              outcome.message)
            if self.observer is not None:  # once recorded: the result as decided above
                result = "sent" if outcome.sent else (
                    "failed" if outcome.permanent or item.attempts + 1 >= self.section.max_attempts else "retry")
                self.observer.delivery_recorded(item, result, sent, self.destinations.get(item.destination))
