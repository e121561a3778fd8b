"""Job transitions after a series is complete, each one transaction (deliveries: storage/deliveries.py,
whose DeliveryQueue JobQueue inherits; lease owners: storage/leases.py).

    complete --select--> queued --claim--> classifying --finish--> classified --all sent--> delivered
        \\--> skipped(reason)          \\--fail--> queued (retry later) | failed(reason)

The series row mirrors the state of its current version's job, so `jobs`
shows one line per series. `replay` adds a new version; `resend` makes the
latest result's deliveries pending again. A newer version supersedes an
older one's unfinished job: it is never classified or exported after that.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from sqlalchemy import Engine, and_, func, insert, select, text, update

from storage.deliveries import DeliveryQueue, DueDelivery, Predecessor, ResultFile
from storage.leases import DEFAULT_LEASE_SECONDS, claimed_by, gone_from_this_host, now_or, process_identity
from storage.models import Delivery, DeliveryState, Instance, Job, ResultObject, Series, SeriesState
from storage.store import DICOM_UID_ROOT, SUPERSEDE_OLDER, iso

__all__ = ["ClaimedJob", "DueDelivery", "JobQueue", "JobStoreError", "Predecessor", "ResultFile", "claimed_by",
           "process_identity"]


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


class JobQueue(DeliveryQueue):
    """Job and delivery transitions; safe with any number of processes on any number of machines
    sharing one database (claims lock rows with FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite's
    BEGIN IMMEDIATE serialises writers).

    `owner` ("host:pid", process_identity) is recorded on what this process claims; a claim is a
    lease of `lease_seconds`, renewed by `heartbeat` and taken back by `expire_leases` when its
    holder is gone.
    """

    def __init__(self, engine: Engine, owner: str | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.engine = engine
        self.owner = owner or process_identity()
        self.lease_seconds = lease_seconds

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
        """Spool paths of the series' image instances; vendor-private objects are never selection's input."""
        with self.engine.connect() as conn:
            return list(conn.execute(
                select(Instance.path).where(Instance.series_instance_uid == series_instance_uid,
                                            Instance.sop_class_uid.like(DICOM_UID_ROOT + "%"))
                .order_by(Instance.path)
            ).scalars())

    def selected(self, job_id: int, accepted: bool, reason: str, now: float | None = None) -> None:
        """Queue or skip; the completion reason is kept after the selection reason."""
        with self.engine.begin() as conn:
            # Locked: ingest nodes sharing a database select the same completed jobs; one decides.
            completion, current = conn.execute(
                select(Job.reason, Job.state).where(Job.id == job_id).with_for_update()).one()
            if current != SeriesState.COMPLETE:
                return  # superseded meanwhile, or selected by another node
            state = SeriesState.QUEUED if accepted else SeriesState.SKIPPED
            full = f"{reason}; complete: {completion}" if completion else reason
            now = now_or(now)
            self._set_state(conn, job_id, state, now, reason=full, **({"queued_at": now} if accepted else {}))

    # ---- worker -------------------------------------------------------------
    def claim(self, now: float | None = None, worker_pid: int | None = None) -> ClaimedJob | None:
        """Take the oldest queued job that is due, exactly once across every process and machine.

        The row is locked with FOR UPDATE SKIP LOCKED (PostgreSQL: concurrent claimers skip it
        instead of queueing behind it) and updated only while still `queued`. The claim is a
        lease held by this queue's owner (or by the worker process `worker_pid` on this host), so
        `serve` can release the job of a worker that died (`requeue_jobs_of`) and any node can
        take back one whose holder stopped renewing it (`expire_leases`).
        """
        now = now_or(now)
        owner = self.owner if worker_pid is None else process_identity(worker_pid)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(Job.id)
                .where(Job.state == SeriesState.QUEUED, (Job.not_before.is_(None)) | (Job.not_before <= now))
                .order_by(Job.created_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            claimed = conn.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == SeriesState.QUEUED)
                .values(state=SeriesState.CLASSIFYING, attempts=Job.attempts + 1, updated_at=now,
                        reason=claimed_by(owner), lease_owner=owner, lease_expires_at=now + self.lease_seconds,
                        claimed_at=now)
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
            paths = conn.execute(  # image instances only: private vendor objects never reach assembly
                select(Instance.path).where(Instance.series_instance_uid == claimed.series_instance_uid,
                                            Instance.sop_class_uid.like(DICOM_UID_ROOT + "%"))
            ).scalars()
            return ClaimedJob(claimed.id, claimed.series_instance_uid, study, claimed.version, claimed.attempts,
                              tuple(sorted(paths)))

    def heartbeat(self, job_id: int, now: float | None = None) -> bool:
        """Renew this owner's lease on a job it classifies; False when the lease was lost (it expired
        and the job went back to the queue, or the job was superseded)."""
        now = now_or(now)
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(Job).where(Job.id == job_id, Job.state == SeriesState.CLASSIFYING, Job.lease_owner == self.owner)
                .values(lease_expires_at=now + self.lease_seconds)
            ).rowcount
        return bool(renewed)

    def expire_leases(self, max_attempts: int, retry_seconds: float, now: float | None = None) -> list[tuple[int, str, str]]:
        """Jobs whose holder stopped renewing its lease (process or machine gone), as a failed
        attempt (`_retry_or_fail`). Returns (job id, former owner, new state) triples."""
        now = now_or(now)
        out = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Job.id, Job.attempts, Job.version, Job.lease_owner, Series.version.label("current"))
                .join(Series, Series.series_instance_uid == Job.series_instance_uid)
                .where(Job.state == SeriesState.CLASSIFYING, Job.lease_expires_at < now)
                .with_for_update(skip_locked=True, of=Job)
            ).all()
            for row in rows:
                cause = f"the lease of {row.lease_owner} expired (its worker or machine stopped)"
                out.append((row.id, row.lease_owner, self._retry_or_fail(
                    conn, row.id, row.attempts, row.version, row.current, cause, max_attempts, retry_seconds, now)))
        return out

    def _held_elsewhere(self, conn, job_id: int) -> str | None:  # noqa: ANN001
        """Who else holds the job now, when this owner's lease on it was lost (None when it is ours)."""
        owner, state = conn.execute(select(Job.lease_owner, Job.state).where(Job.id == job_id)).one()
        if state == SeriesState.CLASSIFYING and owner is not None and owner != self.owner:
            return owner
        return None

    def finish(self, job_id: int, result: dict, destinations: list[str], now: float | None = None) -> bool:
        """Record the prediction and its objects; one pending delivery per destination.

        Returns False when a newer version of the series superseded the job while
        it was classified: the result is kept for the record, never exported.
        """
        now = now_or(now)
        with self.engine.begin() as conn:
            current_job = conn.execute(select(Job.id).where(Job.id == job_id).with_for_update()).scalar_one()
            if self._held_elsewhere(conn, current_job) is not None:
                return False  # our lease expired and another worker has the job now: its result counts
            for obj in result.get("objects", ()):
                conn.execute(insert(ResultObject).values(
                    job_id=job_id, kind=obj.kind, sop_class_uid=obj.sop_class_uid,
                    series_instance_uid=obj.series_instance_uid, sop_instance_uid=obj.sop_instance_uid,
                    path=obj.path, content_key=obj.content_key,
                    predecessor_sop_instance_uid=obj.predecessor_sop_instance_uid, created_at=now))
            job = conn.execute(select(Job.state, Job.version, Job.series_instance_uid).where(Job.id == job_id)).one()
            current = conn.execute(select(Series.version).where(
                Series.series_instance_uid == job.series_instance_uid).with_for_update()).scalar_one()
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
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if job.state != SeriesState.CLASSIFYING or job.version != current:
                self._supersede(conn, job_id, now, f"superseded by version {current} while classifying; not exported",
                                **values)
                return False
            if destinations:
                reason = f"{result['label']} (p={result['probability']:.3f}); SR pending for {', '.join(destinations)}"
                self._set_state(conn, job_id, SeriesState.CLASSIFIED, now, reason=reason, **values)
                for name in destinations:
                    conn.execute(insert(Delivery).values(job_id=job_id, destination=name, state=DeliveryState.PENDING,
                                                         attempts=0, next_attempt_at=now, updated_at=now))
            else:
                reason = f"{result['label']} (p={result['probability']:.3f}); SR written to the outbox"
                self._set_state(conn, job_id, SeriesState.DELIVERED, now, reason=reason, **values)
            return True

    def fail(self, job_id: int, reason: str, max_attempts: int, retry_seconds: float, now: float | None = None) -> str:
        """Back to the queue for a later attempt, or `failed` when the budget is spent."""
        now = now_or(now)
        with self.engine.begin() as conn:
            attempts, state, version, current = conn.execute(
                select(Job.attempts, Job.state, Job.version, Series.version)
                .join(Series, Series.series_instance_uid == Job.series_instance_uid).where(Job.id == job_id)).one()
            if state != SeriesState.CLASSIFYING:
                return state  # superseded meanwhile: nothing to retry
            if self._held_elsewhere(conn, job_id) is not None:
                return state  # our lease expired and another worker has the job now
            return self._retry_or_fail(conn, job_id, attempts, version, current, reason, max_attempts,
                                       retry_seconds, now)

    def _supersede(self, conn, job_id: int, now: float, reason: str, **values) -> None:  # noqa: ANN001, ANN003
        """Only the job: its series has moved on to a newer version (so `_set_state` must not touch it)."""
        values = {"lease_owner": None, "lease_expires_at": None, **values}
        conn.execute(update(Job).where(Job.id == job_id).values(
            state=SeriesState.SUPERSEDED, updated_at=now, reason=reason, **values))

    def _retry_or_fail(self, conn, job_id: int, attempts: int, version: int, current: int, cause: str,  # noqa: ANN001
                       max_attempts: int, retry_seconds: float, now: float) -> str:
        """A classifying job that ended without a result (error, or its worker died).

        Superseded when a newer version of the series exists; otherwise queued
        again after the retry delay, or `failed` once `max_attempts` are spent
        (the attempt was counted at claim).
        """
        if version != current:
            self._supersede(conn, job_id, now, f"superseded by version {current} while classifying ({cause})")
            return SeriesState.SUPERSEDED
        if attempts < max_attempts:
            self._set_state(conn, job_id, SeriesState.QUEUED, now, reason=f"attempt {attempts} failed: {cause}",
                            not_before=now + retry_seconds * attempts, lease_owner=None, lease_expires_at=None)
            return SeriesState.QUEUED
        self._set_state(conn, job_id, SeriesState.FAILED, now, reason=f"failed after {attempts} attempt(s): {cause}",
                        lease_owner=None, lease_expires_at=None)
        return SeriesState.FAILED

    def requeue_interrupted(self, now: float | None = None) -> int:
        """At start-up: jobs left `classifying` by this machine's worker processes that are gone
        (a crash or kill of the previous `serve`) go back to `queued`, or are superseded.

        Never another machine's jobs, nor a live process's: those return through their lease
        (`expire_leases`). A job with no owner was claimed by a release without leases.
        """
        now = now_or(now)
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Job.id, Job.version, Job.lease_owner, Series.version.label("current"))
                .join(Series, Series.series_instance_uid == Job.series_instance_uid)
                .where(Job.state == SeriesState.CLASSIFYING)
                .with_for_update(skip_locked=True, of=Job)
            ).all()
            count = 0
            for row in rows:
                if row.lease_owner is not None and not gone_from_this_host(row.lease_owner, host):
                    continue
                count += 1
                if row.version < row.current:
                    self._supersede(conn, row.id, now,
                                    f"superseded by version {row.current}; interrupted run not resumed")
                else:
                    self._set_state(conn, row.id, SeriesState.QUEUED, now, reason="requeued after an interrupted run",
                                    lease_owner=None, lease_expires_at=None)
            return count

    # ---- replay / resend ----------------------------------------------------
    def replay(self, uid: str, now: float | None = None) -> list[str]:
        """New job version for a series (or every series of a study), from the spool."""
        now = now_or(now)
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
                superseded = {"series": series_uid, "version": version + 1, "now": now,
                              "reason": f"superseded by version {version + 1} (replay)"}
                for sql in SUPERSEDE_OLDER:
                    conn.execute(text(sql), superseded)
            return [r[0] for r in rows]

    def resend(self, series_instance_uid: str, destinations: list[str], now: float | None = None) -> int:
        """Make the latest SR's deliveries pending again (creating missing ones)."""
        now = now_or(now)
        with self.engine.begin() as conn:
            current, purged_at = conn.execute(select(Series.version, Series.purged_at).where(
                Series.series_instance_uid == series_instance_uid).with_for_update()).first() or (None, None)
            if purged_at is not None:
                raise JobStoreError(
                    f"series {series_instance_uid} was purged by retention on {iso(purged_at)} ([storage] "
                    "retention_days): its images and its SR are no longer on this node, and PACS holds the SR "
                    "that was delivered. To make a new one, send the series again or use `replay --from-pacs`")
            job = conn.execute(
                select(Job.id, Job.sr_path).where(Job.series_instance_uid == series_instance_uid,
                                                  Job.version == current, Job.sr_path.is_not(None))
            ).first()
            if job is None:
                if current is None:
                    raise JobStoreError(f"no series with UID {series_instance_uid} in this node")
                raise JobStoreError(f"series {series_instance_uid} version {current} has no result yet; "
                                    "an older version's result is not resent (it would replace a newer one)")
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

    # ---- supervision --------------------------------------------------------
    def requeue_jobs_of(self, worker_pid: int, max_attempts: int, retry_seconds: float, cause: str,
                        now: float | None = None) -> list[tuple[int, str]]:
        """Jobs a dead worker process left `classifying`, treated as a failed attempt
        (`_retry_or_fail`). Returns (job id, new state) pairs."""
        now = now_or(now)
        out: list[tuple[int, str]] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Job.id, Job.attempts, Job.version, Series.version.label("current"))
                .join(Series, Series.series_instance_uid == Job.series_instance_uid)
                .where(Job.state == SeriesState.CLASSIFYING, Job.lease_owner == process_identity(worker_pid))
            ).all()
            for row in rows:
                out.append((row.id, self._retry_or_fail(conn, row.id, row.attempts, row.version, row.current, cause,
                                                        max_attempts, retry_seconds, now)))
        return out
