"""The audit trail: who talked to the node, what it received and sent, and who replayed or resent.

One row per event in `audit_event` (storage/models.py AuditEvent), read by `migraine-node audit`.
Identifiers only (AE titles, addresses, UIDs, destination names, counts), never patient data:
nothing here reads a dataset.

What is recorded, and when:

- association_accepted / association_refused: when the SCP accepts or refuses an association
  (actor: the calling AE title; refusals by allowed_networks, before any AE title is read, have
  none), with the address and, for a refusal, the reason (detail).
- study_received: once per study and association, when the association ends (released, aborted
  or its connection closed): the series and how many instances of each were stored, so the hot
  path writes nothing per instance. An association cut by a crash of the node leaves none.
- object_sent: each object a destination acknowledged (actor: our AE title, destination: its
  name, address: where it is), when the exporter records it.
- replay / resend / purge: the command line's, after they succeeded (actor: "user@host", with the
  user who ran sudo when there was one).

A failure to write an audit row is logged and counted (migraine_node_audit_write_errors_total),
never raised into the work it describes: a C-STORE or a delivery does not fail for it.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select

from storage.models import AuditEvent, Series
from storage.store import iso

log = logging.getLogger(__name__)

ASSOCIATION_ACCEPTED = "association_accepted"
ASSOCIATION_REFUSED = "association_refused"
STUDY_RECEIVED = "study_received"
OBJECT_SENT = "object_sent"
REPLAY = "replay"
RESEND = "resend"
PURGE = "purge"
KINDS = (ASSOCIATION_ACCEPTED, ASSOCIATION_REFUSED, STUDY_RECEIVED, OBJECT_SENT, REPLAY, RESEND, PURGE)

_LIMITS = {"actor": 128, "address": 64, "study_instance_uid": 64, "series_instance_uid": 64,
           "sop_instance_uid": 64, "destination": 64}


@dataclass(frozen=True)
class Event:
    """One audit row to write."""

    kind: str
    actor: str | None = None
    address: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    destination: str | None = None
    detail: Mapping | None = field(default=None)
    at: float | None = None

    def row(self, now: float) -> dict:
        if self.kind not in KINDS:
            raise ValueError(f"unknown audit event kind {self.kind!r}")
        values = {"at": now if self.at is None else self.at, "kind": self.kind,
                  "detail": None if self.detail is None else json.dumps(self.detail, sort_keys=True)}
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            values[name] = None if value is None else str(value)[:limit]
        return values


def write(engine: Engine, events: Iterable[Event], now: float | None = None) -> int:
    """Insert the events in one transaction; returns how many. Raises what the database raises."""
    now = time.time() if now is None else now
    rows = [event.row(now) for event in events]
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(AuditEvent), rows)
    return len(rows)


def study_of(engine: Engine, series_instance_uid: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(Series.study_instance_uid)
                            .where(Series.series_instance_uid == series_instance_uid)).scalar()


def command_actor() -> str:
    """Who runs this command: "user@host", and "sudo-user as user@host" when run through sudo."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name, no passwd entry
        user = f"uid {os.getuid()}"
    actor = f"{user}@{socket.gethostname()}"
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != user:
        actor = f"{sudo_user} as {actor} (sudo)"
    return actor[:128]


def record_command(engine: Engine, kind: str, **values) -> bool:  # noqa: ANN003
    """A command's audit row (actor: `command_actor`); False, with a warning logged, when it could not be written."""
    try:
        write(engine, [Event(kind, actor=command_actor(), **values)])
        return True
    except Exception as exc:  # noqa: BLE001 - the command itself succeeded; say so, do not hide it
        log.warning("could not write the %s audit event: %s: %s", kind, type(exc).__name__, exc)
        return False


def record_replay(engine: Engine, uid: str, series: list[str], from_pacs: str | None = None) -> bool:
    """`migraine-node replay UID`: a series, or every series of a study (`series`: those replayed)."""
    one_series = list(series) == [uid]
    detail: dict = {"series": list(series)}
    if from_pacs:
        detail["retrieved_from"] = from_pacs
    return record_command(engine, REPLAY, study_instance_uid=None if one_series else uid,
                          series_instance_uid=uid if one_series else None, detail=detail)


def record_resend(engine: Engine, series_instance_uid: str, destinations: list[str]) -> bool:
    """`migraine-node resend SERIES`: its result queued again for `destinations`."""
    return record_command(engine, RESEND, study_instance_uid=study_of(engine, series_instance_uid),
                          series_instance_uid=series_instance_uid, detail={"destinations": list(destinations)})


def record_purge(engine: Engine, report) -> bool:  # noqa: ANN001
    """`migraine-node purge` (not --dry-run): storage/retention.py's PurgeReport."""
    return record_command(engine, PURGE, detail={
        "purged": report.purged, "files_removed": report.files_removed, "bytes_removed": report.bytes_removed,
        "series": [c.series_instance_uid for c in report.candidates]})


# ---- reading ------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (90s, 15m, 24h, 7d, 2w) or an ISO 8601 date or time
    (UTC unless it names its offset). Raises ValueError."""
    now = time.time() if now is None else now
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (90s, 15m, 24h, 7d, 2w) nor an ISO 8601 date or time "
                         "(2026-05-01, 2026-05-01T08:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def events(engine: Engine, since: float | None = None, kinds: Iterable[str] = (), limit: int | None = None) -> list[dict]:
    """Audit events, oldest first, as JSON-ready dicts (`at` in ISO 8601 UTC, `detail` decoded).
    With `limit`, the newest `limit` of them."""
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    kinds = list(kinds)
    if kinds:
        query = query.where(AuditEvent.kind.in_(kinds))
    if limit is not None:
        query = query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    else:
        query = query.order_by(AuditEvent.at, AuditEvent.id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    if limit is not None:
        rows = list(reversed(rows))
    out = []
    for row in rows:
        try:
            detail = None if row.detail is None else json.loads(row.detail)
        except ValueError:
            detail = row.detail
        out.append({"id": row.id, "at": iso(row.at), "kind": row.kind, "actor": row.actor, "address": row.address,
                    "study_instance_uid": row.study_instance_uid, "series_instance_uid": row.series_instance_uid,
                    "sop_instance_uid": row.sop_instance_uid, "destination": row.destination, "detail": detail})
    return out


def format_event(event: dict) -> str:
    """One line of `migraine-node audit`: time, kind, then the fields it has."""
    parts = [event["at"], f"{event['kind']:<20}"]
    for key, label in (("actor", "by"), ("address", "address"), ("destination", "to"), ("study_instance_uid", "study"),
                       ("series_instance_uid", "series"), ("sop_instance_uid", "sop")):
        if event[key]:
            parts.append(f"{label}={event[key]}")
    detail = event["detail"]
    if detail:
        parts.append(json.dumps(detail, sort_keys=True) if not isinstance(detail, str) else detail)
    return " ".join(parts)
