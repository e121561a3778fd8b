"""The node's hooks: node/scp.py and node/export.py report associations, instances and deliveries here;
`Observer` counts them (node/metrics.py NodeMetrics) and writes the audit trail (storage/audit.py)."""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit

from sqlalchemy import Engine

from node.metrics import _REJECT_REASONS, INSTANCE_OUTCOMES, NodeMetrics
from storage import audit

log = logging.getLogger(__name__)


class Observer:
    """The node's hooks: node/scp.py and node/export.py call these; they count (NodeMetrics) and write the
    audit trail (storage/audit.py). None of them raises."""

    def __init__(self, engine: Engine, ae_title: str, metrics: NodeMetrics | None = None) -> None:
        self.engine, self.ae_title, self.metrics = engine, ae_title, metrics
        self._lock = threading.Lock()
        # Per open association (id of pynetdicom's Association): who, from where, and what it stored:
        # {study UID: {series UID: instances}}, written as study_received rows when it ends.
        self._associations: dict[int, dict] = {}

    def _audit(self, events: list[audit.Event]) -> None:
        try:
            audit.write(self.engine, events)
        except Exception as exc:  # noqa: BLE001 - never fails the work it describes
            if self.metrics is not None:
                self.metrics.count("audit_errors", amount=len(events))
            log.error("could not write %d audit event(s) (%s): %s: %s", len(events),
                      ", ".join(sorted({e.kind for e in events})), type(exc).__name__, exc)

    def _count(self, counter: str, *labels: str) -> None:
        if self.metrics is not None:
            self.metrics.count(counter, *labels)

    @staticmethod
    def _peer(assoc) -> tuple[str | None, str | None]:  # noqa: ANN001
        requestor = assoc.requestor
        calling = str(requestor.ae_title or "").strip() or None
        if calling is None and requestor.primitive is not None:
            calling = str(requestor.primitive.calling_ae_title).strip() or None
        return calling, str(requestor.address) if requestor.address else None

    # ---- SCP ------------------------------------------------------------------------------------
    def association_accepted(self, event) -> None:  # noqa: ANN001
        """EVT_ACCEPTED."""
        try:
            calling, address = self._peer(event.assoc)
            with self._lock:
                self._associations.setdefault(id(event.assoc), {"studies": {}})
            self._count("accepted")
            self._audit([audit.Event(audit.ASSOCIATION_ACCEPTED, actor=calling, address=address)])
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: association accepted")

    def association_rejected(self, event) -> None:  # noqa: ANN001
        """EVT_REJECTED (pynetdicom refused the association: AE titles, max_associations)."""
        try:
            primitive = event.assoc.acceptor.primitive
            code = (primitive.result, primitive.result_source, primitive.diagnostic) if primitive else None
            reason = _REJECT_REASONS.get(code, "other")
            calling, address = self._peer(event.assoc)
            detail = {"reason": reason}
            if event.assoc.requestor.primitive is not None:
                detail["called_ae_title"] = str(event.assoc.requestor.primitive.called_ae_title).strip()
            self._count("refused", reason)
            self._audit([audit.Event(audit.ASSOCIATION_REFUSED, actor=calling, address=address, detail=detail)])
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: association refused")

    def connection_refused(self, address: str) -> None:
        """A connection from outside allowed_networks, closed before its association request was read."""
        try:
            self._count("refused", "network")
            self._audit([audit.Event(audit.ASSOCIATION_REFUSED, address=str(address), detail={"reason": "network"})])
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: connection refused")

    def instance_received(self, event, record, outcome: str) -> None:  # noqa: ANN001
        """A C-STORE's outcome (INSTANCE_OUTCOMES); `record` (storage/store.py InstanceRecord) when stored."""
        try:
            self._count("instances", outcome if outcome in INSTANCE_OUTCOMES else "error")
            if record is not None:
                with self._lock:
                    studies = self._associations.setdefault(id(event.assoc), {"studies": {}})["studies"]
                    series = studies.setdefault(record.study_instance_uid, {})
                    series[record.series_instance_uid] = series.get(record.series_instance_uid, 0) + 1
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: instance received")

    def association_ended(self, event) -> None:  # noqa: ANN001
        """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: one study_received row per study it stored (once)."""
        try:
            with self._lock:
                state = self._associations.pop(id(event.assoc), None)
            if not state or not state["studies"]:
                return
            calling, address = self._peer(event.assoc)
            ended = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(event.event.name, "connection closed")
            self._audit([
                audit.Event(audit.STUDY_RECEIVED, actor=calling, address=address, study_instance_uid=study,
                            series_instance_uid=next(iter(series)) if len(series) == 1 else None,
                            detail={"series": dict(sorted(series.items())), "instances": sum(series.values()),
                                    "association": ended})
                for study, series in sorted(state["studies"].items())
            ])
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: association ended")

    # ---- export ---------------------------------------------------------------------------------
    def delivery_recorded(self, item, result: str, sent: tuple, destination) -> None:  # noqa: ANN001
        """node/export.py recorded a delivery attempt: `result` (DELIVERY_RESULTS), the objects the destination
        acknowledged ((storage/jobs.py ResultFile, status) pairs), the destination (config) if still configured."""
        try:
            self._count("deliveries", item.destination, result)
            if not sent:
                return
            address = None
            if destination is not None:
                address = (f"{destination.host}:{destination.port}" if destination.url is None
                           else urlsplit(destination.url).hostname)
            study = audit.study_of(self.engine, item.series_instance_uid)
            self._audit([
                audit.Event(audit.OBJECT_SENT, actor=self.ae_title, address=address, study_instance_uid=study,
                            series_instance_uid=item.series_instance_uid, sop_instance_uid=obj.sop_instance_uid,
                            destination=item.destination,
                            detail={"kind": obj.kind, "status": status, "job_id": item.job_id,
                                    "result_series_instance_uid": obj.series_instance_uid,
                                    "protocol": "dimse" if destination is None or destination.url is None
                                    else "stow-rs"})
                for obj, status in sent
            ])
        except Exception:  # noqa: BLE001
            log.exception("metrics/audit: delivery recorded")
