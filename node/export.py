"""Export: C-STORE each pending result to its destination, retried until delivered.

A result is the SR and, where a destination asks for it (`objects`), the
result image. One association per destination per batch, proposing the SOP
classes of the objects to send; a delivery is sent when every object it
carries was stored. Each acknowledged object is recorded (`show` lists them).
Temporary failures (connection refused, timeout, abort, 0xA7xx out of
resources) are retried with exponential backoff and jitter; permanent ones
(association rejected, 0xA9xx/0xCxxx refusals, SOP class not supported) fail
the delivery at once with the reason. Warning statuses (0xBxxx, 0x0001,
0x0107, 0x0116) mean the object was stored. Any other error while sending is
recorded on the delivery as a temporary failure with backoff, never raised to
the scheduler. A destination that stays down logs its retry warning only when
the reason changes or every RETRY_LOG_INTERVAL seconds; the reason is always on
the delivery row (`show`, `status`). State lives in the database, so a delivery
survives restarts.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.config import Destination, ExportSection
from node.logs import log_context
from storage.jobs import DueDelivery, JobQueue, ResultFile

log = logging.getLogger(__name__)

WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
"""C-STORE warnings outside 0xBxxx (PS3.7 C.4.2.1.4): the object was stored."""

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

    def run_due(self, now: float | None = None) -> int:
        """Send every due delivery; returns how many were attempted."""
        batches: dict[str, list[DueDelivery]] = defaultdict(list)
        for item in self.queue.due_deliveries(now):
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
        ae = AE(ae_title=self.calling_ae_title)
        timeout = self.section.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class_uid in sorted({o.sop_class_uid for objs in wanted.values() for o in objs}):
            ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
        if assoc.is_rejected:
            for item in items:
                self._record(item, Outcome(False, True, f"association rejected by {where}"))
                recorded.add(item.delivery_id)
            return
        if not assoc.is_established:
            for item in items:
                self._record(item, Outcome(False, False, f"cannot connect to {where}"))
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
