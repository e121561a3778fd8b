"""Retention: remove the spool files of series whose work is done, keep their rows.

A series' source images go `retention_days` after its result was delivered to every destination
(state `delivered`), with the result files (SR, result image) of every version of it that this node
keeps under data_dir/sr and data_dir/images (PACS has the delivered ones; `resend` of a purged series
says so, `replay --from-pacs` makes a new result), and `skipped_retention_days` after it was skipped (not a 3D T1). Never while
its result is not delivered: `classified`, `failed`, `queued` and the rest keep their files for
`resend` and `replay`. The series, job and delivery rows stay, marked purged (`purged_at`), so
`jobs` and `show` keep the history; the instance rows go with their files. PACS is the archive.

One series per transaction, holding its row lock (PostgreSQL: FOR UPDATE; SQLite: the write
lock) while its files are removed, so an instance of that series arriving meanwhile waits for
its few milliseconds and then reopens it from scratch; other series' ingest is not held up.
Files go before rows: a crash in between leaves rows without files, which start-up recovery
drops, and the series is purged again on the next run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy import Engine, delete, func, select, update

from storage.models import AuditEvent, Instance, Job, ResultObject, Series, SeriesState
from storage.spool import Spool

log = logging.getLogger(__name__)

DAY = 86400.0
BATCH_SERIES = 20
"""Series per purge run; the scheduler's next run takes the next batch."""


@dataclass(frozen=True)
class PurgeCandidate:
    series_instance_uid: str
    study_instance_uid: str
    state: str
    done_at: float
    """When the series became delivered or skipped (its row's updated_at)."""
    files: int
    size_bytes: int


@dataclass(frozen=True)
class PurgeReport:
    candidates: tuple[PurgeCandidate, ...]
    purged: int
    files_removed: int
    bytes_removed: int
    dry_run: bool


def _cutoffs(now: float, retention_days: float, skipped_retention_days: float) -> list[tuple[str, float]]:
    """(state, done before) pairs; a retention of 0 days means never."""
    out = []
    if retention_days > 0:
        out.append((SeriesState.DELIVERED.value, now - retention_days * DAY))
    if skipped_retention_days > 0:
        out.append((SeriesState.SKIPPED.value, now - skipped_retention_days * DAY))
    return out


def purge_candidates(engine: Engine, retention_days: float, skipped_retention_days: float,
                     now: float | None = None, limit: int | None = None) -> list[PurgeCandidate]:
    """Series whose spool files are due for removal, oldest first."""
    now = time.time() if now is None else now
    out: list[PurgeCandidate] = []
    with engine.connect() as conn:
        for state, before in _cutoffs(now, retention_days, skipped_retention_days):
            query = (
                select(Series.series_instance_uid, Series.study_instance_uid, Series.state, Series.updated_at,
                       func.count(Instance.sop_instance_uid), func.coalesce(func.sum(Instance.size_bytes), 0))
                .outerjoin(Instance, Instance.series_instance_uid == Series.series_instance_uid)
                .where(Series.state == state, Series.updated_at < before, Series.purged_at.is_(None))
                .group_by(Series.series_instance_uid, Series.study_instance_uid, Series.state, Series.updated_at)
                .order_by(Series.updated_at)
            )
            if limit is not None:
                query = query.limit(limit)
            out.extend(PurgeCandidate(*row) for row in conn.execute(query))
    out.sort(key=lambda c: c.done_at)
    return out[:limit] if limit is not None else out


def _remove_results(conn, candidate: PurgeCandidate, result_roots: tuple[Path, ...]) -> tuple[int, int]:  # noqa: ANN001
    """Remove the result files of every version of a delivered series; (files, bytes) removed.
    Only files under one of `result_roots`: a path in the database is never trusted further."""
    if candidate.state != SeriesState.DELIVERED.value or not result_roots:
        return 0, 0
    roots = [root.resolve() for root in result_roots]
    paths = conn.execute(select(ResultObject.path).join(Job, Job.id == ResultObject.job_id)
                         .where(Job.series_instance_uid == candidate.series_instance_uid)).scalars()
    removed = size = 0
    for path in paths:
        target = Path(path)
        try:
            resolved = target.resolve()
        except (OSError, RuntimeError):
            continue
        if not target.is_absolute() or not any(resolved.is_relative_to(root) for root in roots):
            log.warning("retention: result file %r of series %s is not under the node's result folders; left alone",
                        path, candidate.series_instance_uid)
            continue
        try:
            size += resolved.stat().st_size
            resolved.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed, size


def _purge_one(engine: Engine, spool: Spool, candidate: PurgeCandidate, before: float, now: float,
               result_roots: tuple[Path, ...] = ()) -> tuple[int, int] | None:
    """Remove one series' files and instance rows; None when it changed since it was listed."""
    with engine.begin() as conn:
        row = conn.execute(
            select(Series.state, Series.updated_at, Series.purged_at)
            .where(Series.series_instance_uid == candidate.series_instance_uid).with_for_update()
        ).first()
        if row is None or row.state != candidate.state or row.updated_at >= before or row.purged_at is not None:
            return None  # reopened, replayed or purged by another node meanwhile
        instances = conn.execute(
            select(Instance.path, Instance.size_bytes).where(Instance.series_instance_uid == candidate.series_instance_uid)
        ).all()
        removed = size = 0
        directories = set()
        for path, size_bytes in instances:
            relative = PurePosixPath(path)  # written by ingest from validated UIDs; checked again here
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 3:
                log.error("retention: instance path %r of series %s is not a spool path; left alone", path,
                          candidate.series_instance_uid)
                continue
            target = spool.root / relative
            try:
                target.unlink()
                removed += 1
                size += size_bytes
            except FileNotFoundError:
                pass
            directories.add(target.parent)
        results = _remove_results(conn, candidate, result_roots)
        removed, size = removed + results[0], size + results[1]
        conn.execute(delete(Instance).where(Instance.series_instance_uid == candidate.series_instance_uid))
        conn.execute(update(Series).where(Series.series_instance_uid == candidate.series_instance_uid)
                     .values(purged_at=now))
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        for empty in (directory, directory.parent):
            try:
                os.rmdir(empty)  # only when empty: another series of the study may still be there
            except OSError:
                break
    return removed, size


def result_folders(data_dir: Path) -> tuple[Path, Path]:
    """Where the worker keeps the SRs and result images it made (node/worker.py)."""
    return data_dir / "sr", data_dir / "images"


def purge(engine: Engine, spool: Spool, retention_days: float, skipped_retention_days: float,
          now: float | None = None, dry_run: bool = False, limit: int | None = BATCH_SERIES,
          result_roots: tuple[Path, ...] = ()) -> PurgeReport:
    """Purge up to `limit` due series (all of them with limit=None); `dry_run` only lists them.
    `result_roots` (result_folders(data_dir)): the folders a delivered series' result files may be removed from."""
    now = time.time() if now is None else now
    candidates = purge_candidates(engine, retention_days, skipped_retention_days, now, limit)
    if dry_run:
        return PurgeReport(tuple(candidates), 0, 0, 0, True)
    befores = dict(_cutoffs(now, retention_days, skipped_retention_days))
    purged = files = size = 0
    for candidate in candidates:
        outcome = _purge_one(engine, spool, candidate, befores[candidate.state], now, result_roots)
        if outcome is None:
            continue
        purged += 1
        files += outcome[0]
        size += outcome[1]
        log.info("retention: removed %d spool file(s) (%.1f MB) of series %s (%s)", outcome[0], outcome[1] / 1e6,
                 candidate.series_instance_uid, candidate.state)
    return PurgeReport(tuple(candidates), purged, files, size, False)


AUDIT_BATCH = 5000
"""Audit rows removed per transaction: a long backlog never holds the write lock for long."""


def purge_audit(engine: Engine, retention_days: float, now: float | None = None, dry_run: bool = False) -> int:
    """Remove audit events older than `retention_days` (0 = keep for ever); how many (would) go."""
    if retention_days <= 0:
        return 0
    before = (time.time() if now is None else now) - retention_days * DAY
    if dry_run:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(AuditEvent).where(AuditEvent.at < before)).scalar()
    removed = 0
    while True:
        with engine.begin() as conn:
            ids = conn.execute(select(AuditEvent.id).where(AuditEvent.at < before).order_by(AuditEvent.id)
                               .limit(AUDIT_BATCH)).scalars().all()
            if not ids:
                return removed
            conn.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
        removed += len(ids)
