"""Deliveries of a job's results to each destination, each transition one transaction.

    pending --claim_deliveries--> leased to one exporter --sent--> sent
                                                         --retry--> pending (next attempt later)
                                                         --failed--> failed

`DeliveryQueue` is the delivery half of storage/jobs.py's JobQueue (which inherits it): the job
half records results and makes deliveries pending; this half hands them to exporters, records what
each destination acknowledged (the history `show` prints, and the predecessor a new SR names), and
moves the series to `delivered` once every destination has its result.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from storage.leases import gone_from_this_host, now_or
from storage.models import Delivery, DeliveryState, Job, ResultObject, SeriesState, Transmission


@dataclass(frozen=True)
class ResultFile:
    """One object a job produced, as export and `show` need it."""

    kind: str  # "sr" | "image"
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: str
    content_key: str = ""
    predecessor_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    job_id: int
    destination: str
    attempts: int
    objects: tuple[ResultFile, ...]
    series_instance_uid: str

    @property
    def sr_sop_instance_uid(self) -> str | None:
        return next((o.sop_instance_uid for o in self.objects if o.kind == "sr"), None)


@dataclass(frozen=True)
class Predecessor:
    """The last result of a kind that a destination acknowledged for a series."""

    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def _due_conditions(now: float) -> tuple:
    """A delivery is due: pending, its next attempt reached, its job not superseded (joined with Job)."""
    return (Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now,
            Job.state != SeriesState.SUPERSEDED)



class DeliveryQueue:
    """Delivery transitions over `self.engine`, claimed as `self.owner`; JobQueue sets both and
    provides `_set_state`, which moves the job and its series on when their deliveries end."""

    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DueDelivery]:
        now = now_or(now)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.attempts, Job.sr_path,
                       Job.sr_sop_instance_uid, Job.series_instance_uid)
                .join(Job, Job.id == Delivery.job_id)
                .where(*_due_conditions(now))
                .order_by(Delivery.next_attempt_at)
                .limit(limit)
            ).all()
            return self._due(conn, rows)

    def claim_deliveries(self, now: float | None = None, limit: int = 100,
                         lease_seconds: float = 120.0) -> list[DueDelivery]:
        """The due deliveries, taken by this exporter: locked (SKIP LOCKED) and pushed `lease_seconds`
        into the future with this owner recorded, so an exporter on another node does not send them
        too. The outcome (`delivery_sent/retry/failed`) ends the lease; an exporter that dies
        mid-send leaves them due again when the lease runs out."""
        now = now_or(now)
        with self.engine.begin() as conn:
            ids = list(conn.execute(
                select(Delivery.id).join(Job, Job.id == Delivery.job_id)
                .where(*_due_conditions(now))
                .order_by(Delivery.next_attempt_at).limit(limit)
                .with_for_update(skip_locked=True, of=Delivery)
            ).scalars())
            if not ids:
                return []
            conn.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
                next_attempt_at=now + lease_seconds, lease_owner=self.owner))
            rows = conn.execute(
                select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.attempts, Job.sr_path,
                       Job.sr_sop_instance_uid, Job.series_instance_uid)
                .join(Job, Job.id == Delivery.job_id).where(Delivery.id.in_(ids)).order_by(Delivery.id)
            ).all()
            return self._due(conn, rows)

    def release_interrupted_deliveries(self, now: float | None = None) -> int:
        """At start-up: deliveries this machine's exporters were sending when they died are due now,
        not when their lease would have run out. Another machine's, or a live process's, stay leased."""
        now = now_or(now)
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Delivery.id, Delivery.lease_owner)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.lease_owner.is_not(None))
                .with_for_update(skip_locked=True)
            ).all()
            released = [row.id for row in rows if gone_from_this_host(row.lease_owner, host)]
            if released:
                conn.execute(update(Delivery).where(Delivery.id.in_(released)).values(
                    next_attempt_at=now, lease_owner=None, updated_at=now))
        return len(released)

    def _due(self, conn, rows) -> list[DueDelivery]:  # noqa: ANN001
        objects = self._objects(conn, [r.job_id for r in rows])
        return [DueDelivery(r.id, r.job_id, r.destination, r.attempts,
                            objects.get(r.job_id) or self._legacy_sr(r), r.series_instance_uid) for r in rows]

    @staticmethod
    def _legacy_sr(row) -> tuple[ResultFile, ...]:  # noqa: ANN001
        """A job recorded before result_object existed: its SR is all it has."""
        if not row.sr_path:
            return ()
        return (ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "", row.sr_sop_instance_uid, row.sr_path),)

    @staticmethod
    def _objects(conn, job_ids: list[int]) -> dict[int, tuple[ResultFile, ...]]:  # noqa: ANN001
        out: dict[int, list[ResultFile]] = {}
        if job_ids:
            for o in conn.execute(select(ResultObject).where(ResultObject.job_id.in_(job_ids))
                                  .order_by(ResultObject.id)):
                out.setdefault(o.job_id, []).append(ResultFile(
                    o.kind, o.sop_class_uid, o.series_instance_uid, o.sop_instance_uid, o.path, o.content_key,
                    o.predecessor_sop_instance_uid))
        return {k: tuple(v) for k, v in out.items()}

    def result_objects(self, job_id: int) -> tuple[ResultFile, ...]:
        with self.engine.connect() as conn:
            return self._objects(conn, [job_id]).get(job_id, ())

    def last_acknowledged(self, series_instance_uid: str, kind: str, unlike: str) -> Predecessor | None:
        """The newest `kind` result of this series that any destination stored, other than `unlike`.

        It is what PACS shows today, so it is what a new result replaces
        (Predecessor Documents Sequence).
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Transmission.sop_class_uid, Transmission.result_series_instance_uid,
                       Transmission.sop_instance_uid)
                .join(Job, Job.id == Transmission.job_id)
                .where(Transmission.series_instance_uid == series_instance_uid, Transmission.kind == kind,
                       Transmission.sop_instance_uid != unlike, Transmission.result_series_instance_uid != "")
                .order_by(Job.version.desc(), Transmission.sent_at.desc(), Transmission.id.desc()).limit(1)
            ).first()
        return None if row is None else Predecessor(*row)

    def record_sent(self, delivery_id: int, sent: tuple[tuple[ResultFile, int], ...], now: float | None = None) -> None:
        """History of objects a destination acknowledged: (object, status) pairs."""
        now = now_or(now)
        with self.engine.begin() as conn:
            row = conn.execute(select(Delivery.job_id, Delivery.destination, Job.series_instance_uid)
                               .join(Job, Job.id == Delivery.job_id).where(Delivery.id == delivery_id)).one()
            for obj, status in sent:
                conn.execute(insert(Transmission).values(
                    delivery_id=delivery_id, job_id=row.job_id, series_instance_uid=row.series_instance_uid,
                    destination=row.destination, kind=obj.kind, sop_class_uid=obj.sop_class_uid,
                    result_series_instance_uid=obj.series_instance_uid, sop_instance_uid=obj.sop_instance_uid,
                    status=status, sent_at=now))

    def delivery_sent(self, delivery_id: int, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.SENT, None, None, now_or(now))

    def delivery_retry(self, delivery_id: int, error: str, next_attempt_at: float, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.PENDING, error, next_attempt_at, now_or(now))

    def delivery_failed(self, delivery_id: int, error: str, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.FAILED, error, None, now_or(now))

    def _delivery(self, delivery_id: int, state: str, error: str | None, next_at: float | None, now: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Delivery).where(Delivery.id == delivery_id,
                                                Delivery.state != DeliveryState.SUPERSEDED).values(
                state=state, attempts=Delivery.attempts + 1, last_error=error, next_attempt_at=next_at, updated_at=now,
                lease_owner=None))
            job_id, job_state = conn.execute(select(Job.id, Job.state).join(Delivery, Delivery.job_id == Job.id)
                                             .where(Delivery.id == delivery_id)).one()
            if job_state == SeriesState.SUPERSEDED:
                return  # sent while a newer version arrived: history only
            states = list(conn.execute(select(Delivery.state).where(Delivery.job_id == job_id)).scalars())
            if all(s == DeliveryState.SENT for s in states):
                self._set_state(conn, job_id, SeriesState.DELIVERED, now, reason=f"SR delivered to {len(states)} destination(s)")
            elif state == DeliveryState.FAILED:
                self._set_state(conn, job_id, SeriesState.CLASSIFIED, now, reason=f"delivery failed: {error}")
