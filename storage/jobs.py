"""Job and delivery transitions after a series is complete, each one transaction.

    complete --select--> queued --claim--> classifying --finish--> classified --all sent--> delivered
        \\--> skipped(reason)          \\--fail--> queued (retry later) | failed(reason)

The series row mirrors the state of its current version's job, so `jobs`
shows one line per series. `replay` adds a new version; `resend` makes the
latest SR's deliveries pending again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import Engine, and_, func, insert, select, update

from storage.models import Delivery, DeliveryState, Instance, Job, Series, SeriesState


class JobStoreError(Exception):
    """A transition was refused (unknown series, nothing to resend, ...)."""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    series_instance_uid: str
    study_instance_uid: str
    version: int
    attempts: int
    instance_paths: tuple[str, ...]


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    job_id: int
    destination: str
    attempts: int
    sr_path: str
    sr_sop_instance_uid: str
    series_instance_uid: str


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class JobQueue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _set_state(self, conn, job_id: int, state: str, now: float, **values) -> None:  # noqa: ANN001, ANN003
        """Job and (if it is the series' current version) series move together."""
        job = conn.execute(select(Job.series_instance_uid, Job.version).where(Job.id == job_id)).one()
        conn.execute(update(Job).where(Job.id == job_id).values(state=state, updated_at=now, **values))
        series_values = {"state": state, "updated_at": now}
        if "reason" in values:
            series_values["reason"] = values["reason"]
        conn.execute(
            update(Series)
            .where(Series.series_instance_uid == job.series_instance_uid, Series.version == job.version)
            .values(**series_values)
        )

    # ---- selection ----------------------------------------------------------
    def awaiting_selection(self) -> list[tuple[int, str]]:
        """(job id, series UID) of jobs completed but not yet selected or skipped."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(Job.id, Job.series_instance_uid).where(Job.state == SeriesState.COMPLETE).order_by(Job.id)
            )]

    def instance_paths(self, series_instance_uid: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(
                select(Instance.path).where(Instance.series_instance_uid == series_instance_uid).order_by(Instance.path)
            ).scalars())

    def selected(self, job_id: int, accepted: bool, reason: str, now: float | None = None) -> None:
        """Queue or skip; the completion reason is kept after the selection reason."""
        with self.engine.begin() as conn:
            completion = conn.execute(select(Job.reason).where(Job.id == job_id)).scalar_one()
            state = SeriesState.QUEUED if accepted else SeriesState.SKIPPED
            full = f"{reason}; complete: {completion}" if completion else reason
            self._set_state(conn, job_id, state, _now(now), reason=full)

    # ---- worker -------------------------------------------------------------
    def claim(self, now: float | None = None) -> ClaimedJob | None:
        """Take the oldest queued job that is due (atomic; safe with several workers)."""
        now = _now(now)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(Job.id)
                .where(Job.state == SeriesState.QUEUED, (Job.not_before.is_(None)) | (Job.not_before <= now))
                .order_by(Job.created_at, Job.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            claimed = conn.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == SeriesState.QUEUED)
                .values(state=SeriesState.CLASSIFYING, attempts=Job.attempts + 1, updated_at=now)
                .returning(Job.id, Job.series_instance_uid, Job.version, Job.attempts)
            ).first()
            if claimed is None:
                return None
            conn.execute(
                update(Series)
                .where(Series.series_instance_uid == claimed.series_instance_uid, Series.version == claimed.version)
                .values(state=SeriesState.CLASSIFYING, updated_at=now)
            )
            study = conn.execute(
                select(Series.study_instance_uid).where(Series.series_instance_uid == claimed.series_instance_uid)
            ).scalar_one()
            paths = conn.execute(
                select(Instance.path).where(Instance.series_instance_uid == claimed.series_instance_uid)
            ).scalars()
            return ClaimedJob(claimed.id, claimed.series_instance_uid, study, claimed.version, claimed.attempts,
                              tuple(sorted(paths)))

    def finish(self, job_id: int, result: dict, destinations: list[str], now: float | None = None) -> None:
        """Record the prediction and SR; create one pending delivery per destination."""
        now = _now(now)
        with self.engine.begin() as conn:
            values = {
                "probability": result["probability"],
                "label": result["label"],
                "model_id": result["model_id"],
                "device": result["device"],
                "synthetic": result["synthetic"],
                "timings": json.dumps(result["timings"]),
                "sr_sop_instance_uid": result["sr_sop_instance_uid"],
                "sr_path": result["sr_path"],
                "not_before": None,
            }
            if destinations:
                reason = f"{result['label']} (p={result['probability']:.3f}); SR pending for {', '.join(destinations)}"
                self._set_state(conn, job_id, SeriesState.CLASSIFIED, now, reason=reason, **values)
                for name in destinations:
                    conn.execute(insert(Delivery).values(job_id=job_id, destination=name, state=DeliveryState.PENDING,
                                                         attempts=0, next_attempt_at=now, updated_at=now))
            else:
                reason = f"{result['label']} (p={result['probability']:.3f}); SR written to the outbox"
                self._set_state(conn, job_id, SeriesState.DELIVERED, now, reason=reason, **values)

    def fail(self, job_id: int, reason: str, max_attempts: int, retry_seconds: float, now: float | None = None) -> str:
        """Back to the queue for a later attempt, or `failed` when the budget is spent."""
        now = _now(now)
        with self.engine.begin() as conn:
            attempts = conn.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
            if attempts < max_attempts:
                self._set_state(conn, job_id, SeriesState.QUEUED, now, reason=f"attempt {attempts} failed: {reason}",
                                not_before=now + retry_seconds * attempts)
                return SeriesState.QUEUED
            self._set_state(conn, job_id, SeriesState.FAILED, now, reason=f"failed after {attempts} attempt(s): {reason}")
            return SeriesState.FAILED

    def requeue_interrupted(self, now: float | None = None) -> int:
        """Jobs left `classifying` by a crash go back to `queued` (run at start-up)."""
        now = _now(now)
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(Job.id).where(Job.state == SeriesState.CLASSIFYING)).scalars())
            for job_id in ids:
                self._set_state(conn, job_id, SeriesState.QUEUED, now, reason="requeued after an interrupted run")
            return len(ids)

    # ---- replay / resend ----------------------------------------------------
    def replay(self, uid: str, now: float | None = None) -> list[str]:
        """New job version for a series (or every series of a study), from the spool."""
        now = _now(now)
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Series.series_instance_uid, Series.version, Series.instances).where(
                    (Series.series_instance_uid == uid) | (Series.study_instance_uid == uid)
                )
            ).all()
            if not rows:
                raise JobStoreError(f"no series or study with UID {uid} in this node")
            for series_uid, version, instances in rows:
                conn.execute(update(Series).where(Series.series_instance_uid == series_uid).values(
                    version=version + 1, state=SeriesState.COMPLETE, reason="replay requested", completed_at=now,
                    updated_at=now))
                conn.execute(insert(Job).values(series_instance_uid=series_uid, version=version + 1,
                                                state=SeriesState.COMPLETE, reason="replay requested",
                                                instances=instances, attempts=0, created_at=now, updated_at=now))
            return [r[0] for r in rows]

    def resend(self, series_instance_uid: str, destinations: list[str], now: float | None = None) -> int:
        """Make the latest SR's deliveries pending again (creating missing ones)."""
        now = _now(now)
        with self.engine.begin() as conn:
            job = conn.execute(
                select(Job.id, Job.sr_path).where(Job.series_instance_uid == series_instance_uid,
                                                  Job.sr_path.is_not(None)).order_by(Job.version.desc()).limit(1)
            ).first()
            if job is None:
                raise JobStoreError(f"series {series_instance_uid} has no SR to resend")
            if not destinations:
                raise JobStoreError("no [[destinations]] configured: nothing to send to")
            existing = set(conn.execute(select(Delivery.destination).where(Delivery.job_id == job.id)).scalars())
            conn.execute(update(Delivery).where(Delivery.job_id == job.id, Delivery.destination.in_(destinations))
                         .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, last_error=None,
                                 updated_at=now))
            for name in destinations:
                if name not in existing:
                    conn.execute(insert(Delivery).values(job_id=job.id, destination=name, state=DeliveryState.PENDING,
                                                         attempts=0, next_attempt_at=now, updated_at=now))
            self._set_state(conn, job.id, SeriesState.CLASSIFIED, now, reason="resend requested")
            return len(destinations)

    # ---- deliveries ---------------------------------------------------------
    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DueDelivery]:
        now = _now(now)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.attempts, Job.sr_path,
                       Job.sr_sop_instance_uid, Job.series_instance_uid)
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at)
                .limit(limit)
            ).all()
        return [DueDelivery(*r) for r in rows]

    def delivery_sent(self, delivery_id: int, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.SENT, None, None, _now(now))

    def delivery_retry(self, delivery_id: int, error: str, next_attempt_at: float, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.PENDING, error, next_attempt_at, _now(now))

    def delivery_failed(self, delivery_id: int, error: str, now: float | None = None) -> None:
        self._delivery(delivery_id, DeliveryState.FAILED, error, None, _now(now))

    def _delivery(self, delivery_id: int, state: str, error: str | None, next_at: float | None, now: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                state=state, attempts=Delivery.attempts + 1, last_error=error, next_attempt_at=next_at, updated_at=now))
            job_id = conn.execute(select(Delivery.job_id).where(Delivery.id == delivery_id)).scalar_one()
            states = list(conn.execute(select(Delivery.state).where(Delivery.job_id == job_id)).scalars())
            if all(s == DeliveryState.SENT for s in states):
                self._set_state(conn, job_id, SeriesState.DELIVERED, now, reason=f"SR delivered to {len(states)} destination(s)")
            elif state == DeliveryState.FAILED:
                self._set_state(conn, job_id, SeriesState.CLASSIFIED, now, reason=f"delivery failed: {error}")

    def status(self) -> dict:
        with self.engine.connect() as conn:
            series = dict(conn.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            deliveries = dict(conn.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
            last = conn.execute(
                select(Series.series_instance_uid, Series.reason, Series.updated_at)
                .where(Series.state == SeriesState.FAILED).order_by(Series.updated_at.desc()).limit(1)
            ).first()
            last_delivery_error = conn.execute(
                select(Delivery.destination, Delivery.last_error, Delivery.updated_at)
                .where(and_(Delivery.last_error.is_not(None), Delivery.state != DeliveryState.SENT))
                .order_by(Delivery.updated_at.desc()).limit(1)
            ).first()
        return {"series": series, "deliveries": deliveries, "last_failure": last, "last_delivery_error": last_delivery_error}
