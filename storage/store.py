"""Every state change of the node, each one transaction.

Callers never touch the tables directly: the SCP records instances here, the
tracker completes series here, the CLI reads views from here.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import asdict, dataclass, field
from dataclasses import replace as _replace
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Engine, and_, func, insert, select, text, update
from sqlalchemy.exc import OperationalError

from storage.models import Delivery, Instance, Job, ResultObject, Series, SeriesState, Transmission


# Standard SOP classes live under the DICOM root. Any other class is vendor-private (the SCP accepts
# only those listed in [node] private_sop_classes): kept with its series but never counted as a
# slice, never a reason to reopen a series, never given to selection or the model.
DICOM_UID_ROOT = "1.2.840.10008."


def is_private_sop_class(sop_class_uid: str | None) -> bool:
    return not (sop_class_uid or "").startswith(DICOM_UID_ROOT)


class StoreError(Exception):
    """A state change was refused (for example a UID conflict)."""


class RecordOutcome(StrEnum):
    NEW = "new"
    """First time this SOP Instance UID was seen."""
    DUPLICATE = "duplicate"
    """Same UID and same bytes as before: nothing changed."""
    REPLACED = "replaced"
    """Same UID with different bytes: file overwritten, counted once."""


@dataclass(frozen=True)
class InstanceRecord:
    """What ingest learned about one stored instance (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int = 1
    expected_instances: int | None = None
    calling_ae_title: str | None = None


@dataclass(frozen=True)
class SeriesSnapshot:
    """The facts the completion rules look at."""

    series_instance_uid: str
    instances: int
    expected_instances: int | None
    first_received_at: float
    last_received_at: float


@dataclass(frozen=True)
class SeriesView:
    """A series as admins see it (`jobs`, `show`). Keys are a stable contract."""

    series_instance_uid: str
    study_instance_uid: str
    series_description: str | None
    modality: str | None
    instances: int
    expected_instances: int | None
    state: str
    reason: str | None
    version: int
    calling_ae_title: str | None
    first_received_at: str
    last_received_at: str
    completed_at: str | None
    updated_at: str
    probability: float | None = None
    label: str | None = None
    model_id: str | None = None
    synthetic: bool | None = None
    sr_sop_instance_uid: str | None = None
    timings: dict | None = None
    deliveries: list[dict] = field(default_factory=list)
    sr_path: str | None = None
    image_sop_instance_uid: str | None = None
    image_path: str | None = None
    jobs: list[dict] = field(default_factory=list)
    sent_objects: list[dict] = field(default_factory=list)
    purged_at: str | None = None
    """When retention removed the series' spool files (rows and results stay)."""

    def to_json(self, detail: bool = False) -> dict:
        data = asdict(self)
        if not detail:
            data.pop("jobs")
            data.pop("sent_objects")
        return data


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Hot-path SQL (one C-STORE = one transaction of these). Plain, portable SQL
# with :named parameters: run on the pooled DBAPI connection for SQLite (the
# SQLAlchemy execution layer cost 3x the database work here), through text()
# on other databases. Race-free under concurrent ingest on PostgreSQL's READ
# COMMITTED (several nodes receiving the same study): rows are created with
# INSERT ... ON CONFLICT DO NOTHING, never select-then-insert, and the series
# row is locked (FOR UPDATE) before its count changes. SQLite's BEGIN IMMEDIATE
# serialises writers anyway.
_SELECT_INSTANCE_SERIES = "SELECT series_instance_uid FROM instance WHERE sop_instance_uid = :sop"
_UPSERT_SERIES = (
    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_description, series_number, "
    "calling_ae_title, expected_instances, instances, state, version, first_received_at, last_received_at, "
    "updated_at) VALUES (:series_instance_uid, :study_instance_uid, :modality, :series_description, "
    ":series_number, :calling_ae_title, :expected_instances, 0, :state, 1, :now, :now, :now) "
    "ON CONFLICT (series_instance_uid) DO NOTHING"
)
_SELECT_SERIES = "SELECT study_instance_uid, state, version FROM series WHERE series_instance_uid = :series"
_INSERT_INSTANCE = (
    "INSERT INTO instance (sop_instance_uid, series_instance_uid, sop_class_uid, transfer_syntax_uid, "
    "number_of_frames, instance_number, size_bytes, path, received_at) VALUES (:sop_instance_uid, "
    ":series_instance_uid, :sop_class_uid, :transfer_syntax_uid, :number_of_frames, :instance_number, "
    ":size_bytes, :path, :received_at) ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid"
)
_REPLACE_INSTANCE = (
    "UPDATE instance SET sop_class_uid = :sop_class_uid, transfer_syntax_uid = :transfer_syntax_uid, "
    "number_of_frames = :number_of_frames, instance_number = :instance_number, size_bytes = :size_bytes, "
    "path = :path, received_at = :received_at WHERE sop_instance_uid = :sop_instance_uid"
)
_COUNT_INSTANCE = (
    "UPDATE series SET instances = instances + :added, last_received_at = :now, updated_at = :now, "
    "expected_instances = COALESCE(:expected, expected_instances) WHERE series_instance_uid = :series"
)
# A new or changed instance after completion reopens the series as a new version.
# A purged series (storage/retention.py) has no instance rows left: it counts from zero again.
_REOPEN_SERIES = (
    "UPDATE series SET instances = CASE WHEN purged_at IS NULL THEN instances ELSE 0 END + :added, "
    "last_received_at = :now, updated_at = :now, "
    "first_received_at = :now, expected_instances = COALESCE(:expected, expected_instances), "
    "state = 'receiving', version = version + 1, reason = :reason, completed_at = NULL, purged_at = NULL "
    "WHERE series_instance_uid = :series"
)
# A new version of a series supersedes the unfinished work of its older versions: their
# queued jobs are never classified and their pending results never exported. A job a
# worker holds (`classifying`) is superseded when the worker finishes (JobQueue.finish).
SUPERSEDE_OLDER = (
    "UPDATE delivery SET state = 'superseded', last_error = :reason, updated_at = :now "
    "WHERE state = 'pending' AND job_id IN "
    "(SELECT id FROM job WHERE series_instance_uid = :series AND version < :version)",
    "UPDATE job SET state = 'superseded', reason = :reason, updated_at = :now "
    "WHERE series_instance_uid = :series AND version < :version AND state IN ('complete', 'queued', 'classified')",
)
_SELECT_INSTANCE_CLASS = "SELECT sop_class_uid FROM instance WHERE sop_instance_uid = :sop"
_FORGET_INSTANCE = "DELETE FROM instance WHERE sop_instance_uid = :sop"
_UNCOUNT_INSTANCE = "UPDATE series SET instances = instances - 1 WHERE series_instance_uid = :series"


class JobStore:
    """State transitions over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Row locks exist on server databases; SQLite's BEGIN IMMEDIATE already holds the whole database.
        self._for_update = " FOR UPDATE" if engine.dialect.name != "sqlite" else ""

    # ---- ingest -------------------------------------------------------------
    @contextlib.contextmanager
    def _sql(self) -> Iterator[Callable[[str, dict], Any]]:
        """One transaction; yields run(sql, params) -> result with fetchone()."""
        if self.engine.dialect.name == "sqlite":
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur.execute
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OperationalError("sqlite", None, exc) from exc
            finally:
                raw.close()
        else:
            with self.engine.begin() as conn:
                yield lambda sql, params: conn.execute(text(sql), params)

    def record_instance(self, rec: InstanceRecord, replaced_content: bool, now: float | None = None) -> RecordOutcome:
        """Record a spooled instance; reopens a completed series if anything is new.

        `replaced_content` says the spool already held this SOP Instance UID
        with different bytes (the caller compared them before overwriting).
        """
        now = time.time() if now is None else now
        row = {
            "sop_instance_uid": rec.sop_instance_uid,
            "series_instance_uid": rec.series_instance_uid,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "number_of_frames": rec.number_of_frames,
            "instance_number": rec.instance_number,
            "size_bytes": rec.size_bytes,
            "path": rec.path,
            "received_at": now,
        }
        with self._sql() as run:
            known = run(_SELECT_INSTANCE_SERIES, {"sop": rec.sop_instance_uid}).fetchone()
            if known is not None and known[0] != rec.series_instance_uid:
                raise StoreError("SOP Instance UID already recorded in another series")
            if known is not None and not replaced_content:
                return RecordOutcome.DUPLICATE
            private = is_private_sop_class(rec.sop_class_uid)
            expected = None if private else rec.expected_instances
            run(_UPSERT_SERIES, {
                "series_instance_uid": rec.series_instance_uid,
                "study_instance_uid": rec.study_instance_uid,
                "modality": rec.modality,
                "series_description": rec.series_description,
                "series_number": rec.series_number,
                "calling_ae_title": rec.calling_ae_title,
                "expected_instances": expected,
                "state": SeriesState.RECEIVING.value,
                "now": now,
            })
            study, state, version = run(_SELECT_SERIES + self._for_update, {"series": rec.series_instance_uid}).fetchone()
            if study != rec.study_instance_uid:
                raise StoreError("Series Instance UID already recorded in another study")
            if known is None:
                if run(_INSERT_INSTANCE, row).fetchone() is None:
                    # Recorded meanwhile by a concurrent ingest (another association or node).
                    known = run(_SELECT_INSTANCE_SERIES, {"sop": rec.sop_instance_uid}).fetchone()
                    if known[0] != rec.series_instance_uid:
                        raise StoreError("SOP Instance UID already recorded in another series")
                    if not replaced_content:
                        return RecordOutcome.DUPLICATE
                    run(_REPLACE_INSTANCE, row)
                    outcome = RecordOutcome.REPLACED
                else:
                    outcome = RecordOutcome.NEW
            else:
                run(_REPLACE_INSTANCE, row)
                outcome = RecordOutcome.REPLACED
            added = 1 if outcome is RecordOutcome.NEW and not private else 0
            counted = {"series": rec.series_instance_uid, "added": added, "now": now, "expected": expected}
            if state == SeriesState.RECEIVING:
                run(_COUNT_INSTANCE, counted)
            elif private:
                pass  # a vendor object after completion changes no image: the series stays as it is
            else:
                run(_REOPEN_SERIES, {**counted, "reason": f"reopened: new or changed instance after {state}"})
                superseded = {"series": rec.series_instance_uid, "version": version + 1, "now": now,
                              "reason": f"superseded by version {version + 1} (new or changed instance)"}
                for sql in SUPERSEDE_OLDER:
                    run(sql, superseded)
            return outcome

    def forget_instance(self, series_instance_uid: str, sop_instance_uid: str) -> None:
        """Undo a NEW record whose spool file could not be made durable."""
        with self._sql() as run:
            row = run(_SELECT_INSTANCE_CLASS, {"sop": sop_instance_uid}).fetchone()
            run(_FORGET_INSTANCE, {"sop": sop_instance_uid})
            if row is None or not is_private_sop_class(row[0]):
                run(_UNCOUNT_INSTANCE, {"series": series_instance_uid})

    def instance_paths(self, received_before: float | None = None) -> dict[str, tuple[str, str]]:
        """Spool path -> (series UID, SOP Instance UID) of every recorded instance (received before
        `received_before`, when given)."""
        query = select(Instance.path, Instance.series_instance_uid, Instance.sop_instance_uid)
        if received_before is not None:
            query = query.where(Instance.received_at < received_before)
        with self.engine.connect() as conn:
            rows = conn.execute(query)
            return {path: (series, sop) for path, series, sop in rows}

    # ---- completion ---------------------------------------------------------
    def receiving_series(self) -> list[SeriesSnapshot]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Series.series_instance_uid,
                    Series.instances,
                    Series.expected_instances,
                    Series.first_received_at,
                    Series.last_received_at,
                ).where(Series.state == SeriesState.RECEIVING)
            ).all()
        return [SeriesSnapshot(*row) for row in rows]

    def mark_complete(
        self,
        snapshot: SeriesSnapshot,
        reason: str,
        now: float | None = None,
        state: SeriesState = SeriesState.COMPLETE,
    ) -> bool:
        """Close the series as `state` (complete, or incomplete) unless an instance arrived since `snapshot`.

        Creates the Job for this version of the series, in the same state: an
        incomplete job is never selected (selection takes `complete` jobs only)
        and stays in the history when a late instance reopens the series.
        Returns False when the series changed meanwhile (the next tick looks again).
        """
        if state not in (SeriesState.COMPLETE, SeriesState.INCOMPLETE):
            raise ValueError(f"a receiving series closes as complete or incomplete, not {state}")
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(Series)
                .where(
                    Series.series_instance_uid == snapshot.series_instance_uid,
                    Series.state == SeriesState.RECEIVING,
                    Series.last_received_at == snapshot.last_received_at,
                )
                .values(state=state, reason=reason, completed_at=now, updated_at=now)
                .returning(Series.version, Series.instances)
            ).first()
            if changed is None:
                return False
            conn.execute(
                insert(Job).values(
                    series_instance_uid=snapshot.series_instance_uid,
                    version=changed.version,
                    state=state,
                    reason=reason,
                    instances=changed.instances,
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            return True

    # ---- views --------------------------------------------------------------
    def _views(self, conn, where) -> list[SeriesView]:  # noqa: ANN001
        query = (
            select(Series, Job.id.label("job_id"), Job.probability, Job.label, Job.model_id, Job.synthetic,
                   Job.sr_sop_instance_uid, Job.timings, Job.sr_path)
            .outerjoin(Job, and_(Job.series_instance_uid == Series.series_instance_uid, Job.version == Series.version))
            .order_by(Series.updated_at.desc())
        )
        if where is not None:
            query = query.where(where)
        rows = conn.execute(query).all()
        job_ids = [r.job_id for r in rows if r.job_id is not None]
        deliveries = self._deliveries(conn, job_ids)
        images = {job_id: (uid, path) for job_id, uid, path in conn.execute(
            select(ResultObject.job_id, ResultObject.sop_instance_uid, ResultObject.path).where(
                ResultObject.job_id.in_(job_ids), ResultObject.kind == "image"))} if job_ids else {}
        views = []
        for r in rows:
            view = self._view(r, deliveries.get(r.job_id, []))
            if r.job_id in images:
                uid, path = images[r.job_id]
                view = _replace(view, image_sop_instance_uid=uid, image_path=path)
            views.append(view)
        return views

    def list_series(self, state: str | None = None) -> list[SeriesView]:
        with self.engine.connect() as conn:
            return self._views(conn, None if state is None else Series.state == state)

    def get_series(self, series_instance_uid: str) -> SeriesView | None:
        with self.engine.connect() as conn:
            views = self._views(conn, Series.series_instance_uid == series_instance_uid)
            if not views:
                return None
            jobs = conn.execute(
                select(Job).where(Job.series_instance_uid == series_instance_uid).order_by(Job.version)
            ).all()
            history = self._deliveries(conn, [j.id for j in jobs])
            objects: dict[int, list[dict]] = {}
            for o in conn.execute(select(ResultObject).where(ResultObject.job_id.in_([j.id for j in jobs]))
                                  .order_by(ResultObject.id)):
                objects.setdefault(o.job_id, []).append({
                    "kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                    "series_instance_uid": o.series_instance_uid, "path": o.path,
                    "predecessor_sop_instance_uid": o.predecessor_sop_instance_uid})
            versions = {j.id: j.version for j in jobs}
            sent = conn.execute(select(Transmission).where(Transmission.series_instance_uid == series_instance_uid)
                                .order_by(Transmission.sent_at, Transmission.id)).all()
        view = views[0]
        view.sent_objects.extend(
            {"kind": t.kind, "sop_instance_uid": t.sop_instance_uid, "series_instance_uid": t.result_series_instance_uid,
             "destination": t.destination, "sent_at": iso(t.sent_at), "status": t.status, "job_id": t.job_id,
             "version": versions.get(t.job_id)}
            for t in sent
        )
        view.jobs.extend(
            {
                "job_id": j.id,
                "version": j.version,
                "state": j.state,
                "reason": j.reason,
                "instances": j.instances,
                "attempts": j.attempts,
                "probability": j.probability,
                "label": j.label,
                "model_id": j.model_id,
                "sr_sop_instance_uid": j.sr_sop_instance_uid,
                "timings": json.loads(j.timings) if j.timings else None,
                "deliveries": history.get(j.id, []),
                "objects": objects.get(j.id, []),
                "created_at": iso(j.created_at),
                "updated_at": iso(j.updated_at),
                "queued_at": iso(j.queued_at),
                "claimed_at": iso(j.claimed_at),
                "lease_owner": j.lease_owner,
                "lease_expires_at": iso(j.lease_expires_at),
            }
            for j in jobs
        )
        return view

    @staticmethod
    def _deliveries(conn, job_ids: list[int]) -> dict[int, list[dict]]:  # noqa: ANN001
        out: dict[int, list[dict]] = {}
        if job_ids:
            for d in conn.execute(select(Delivery).where(Delivery.job_id.in_(job_ids)).order_by(Delivery.id)):
                out.setdefault(d.job_id, []).append(
                    {"destination": d.destination, "state": d.state, "attempts": d.attempts, "last_error": d.last_error,
                     "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None}
                )
        return out

    def count_instances(self, series_instance_uid: str | None = None, private: bool = True) -> int:
        """Recorded instances; `private=False` counts image (standard SOP class) instances only."""
        query = select(func.count()).select_from(Instance)
        if not private:
            query = query.where(Instance.sop_class_uid.like(DICOM_UID_ROOT + "%"))
        if series_instance_uid is not None:
            query = query.where(Instance.series_instance_uid == series_instance_uid)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    @staticmethod
    def _view(row, deliveries: list[dict]) -> SeriesView:  # noqa: ANN001
        return SeriesView(
            series_instance_uid=row.series_instance_uid,
            study_instance_uid=row.study_instance_uid,
            series_description=row.series_description,
            modality=row.modality,
            instances=row.instances,
            expected_instances=row.expected_instances,
            state=row.state,
            reason=row.reason,
            version=row.version,
            calling_ae_title=row.calling_ae_title,
            first_received_at=iso(row.first_received_at),
            last_received_at=iso(row.last_received_at),
            completed_at=iso(row.completed_at),
            updated_at=iso(row.updated_at),
            probability=row.probability,
            label=row.label,
            model_id=row.model_id,
            synthetic=row.synthetic,
            sr_sop_instance_uid=row.sr_sop_instance_uid,
            timings=json.loads(row.timings) if row.timings else None,
            deliveries=deliveries,
            sr_path=row.sr_path,
            purged_at=iso(row.purged_at),
        )
