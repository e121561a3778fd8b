"""storage/audit.py on both engines: rows written and read back, filters, --since, who ran a command."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine

from storage import audit
from storage.db import make_engine, sqlite_url

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_events_are_written_and_read_back_oldest_first(engine):
    audit.write(engine, [
        audit.Event(audit.ASSOCIATION_ACCEPTED, actor="SCANNER", address="10.1.2.3", at=T0 + 2),
        audit.Event(audit.STUDY_RECEIVED, actor="SCANNER", address="10.1.2.3", study_instance_uid="1.2.3",
                    series_instance_uid="1.2.3.4", detail={"series": {"1.2.3.4": 5}, "instances": 5}, at=T0 + 3),
        audit.Event(audit.ASSOCIATION_REFUSED, address="192.0.2.9", detail={"reason": "network"}, at=T0 + 1),
        audit.Event(audit.OBJECT_SENT, actor="MIGNODE", destination="pacs", sop_instance_uid="1.2.3.9", at=T0 + 4),
    ])
    rows = audit.events(engine)
    assert [r["kind"] for r in rows] == ["association_refused", "association_accepted", "study_received",
                                         "object_sent"]
    assert rows[0] == {"id": rows[0]["id"], "at": "2026-05-01T08:00:01.000Z", "kind": "association_refused",
                       "actor": None, "address": "192.0.2.9", "study_instance_uid": None, "series_instance_uid": None,
                       "sop_instance_uid": None, "destination": None, "detail": {"reason": "network"}}
    assert rows[2]["detail"] == {"series": {"1.2.3.4": 5}, "instances": 5}
    assert [r["kind"] for r in audit.events(engine, since=T0 + 3)] == ["study_received", "object_sent"]
    assert [r["kind"] for r in audit.events(engine, kinds=["object_sent", "association_refused"])] == [
        "association_refused", "object_sent"]
    assert [r["kind"] for r in audit.events(engine, limit=2)] == ["study_received", "object_sent"]  # the newest two
    assert "by=SCANNER address=10.1.2.3 study=1.2.3 series=1.2.3.4" in audit.format_event(rows[2])


def test_long_values_are_cut_to_their_columns_and_unknown_kinds_refused(engine):
    audit.write(engine, [audit.Event(audit.REPLAY, actor="a" * 300, address="b" * 100, at=T0)])
    (row,) = audit.events(engine)
    assert len(row["actor"]) == 128 and len(row["address"]) == 64
    with pytest.raises(ValueError, match="unknown audit event kind"):
        audit.write(engine, [audit.Event("deleted_everything")])


def test_since_takes_durations_and_iso_times():
    now = T0
    assert audit.parse_since("90s", now) == now - 90
    assert audit.parse_since("15m", now) == now - 900
    assert audit.parse_since("24h", now) == now - 86400
    assert audit.parse_since("7d", now) == now - 7 * 86400
    assert audit.parse_since("2w", now) == now - 14 * 86400
    assert audit.parse_since("2026-05-01", now) == T0 - 8 * 3600  # UTC midnight
    assert audit.parse_since("2026-05-01T08:00:00Z", now) == T0
    assert audit.parse_since("2026-05-01T10:00:00+02:00", now) == T0
    for bad in ("yesterday", "24", "-1h", ""):
        with pytest.raises(ValueError, match="neither a duration"):
            audit.parse_since(bad, now)


def test_a_command_names_who_ran_it(engine, monkeypatch):
    monkeypatch.setattr(audit.getpass, "getuser", lambda: "root")
    monkeypatch.setattr(audit.socket, "gethostname", lambda: "node1")
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert audit.command_actor() == "root@node1"
    monkeypatch.setenv("SUDO_USER", "alice")
    assert audit.command_actor() == "alice as root@node1 (sudo)"
    assert audit.record_command(engine, audit.RESEND, series_instance_uid="1.2.3.4", detail={"destinations": ["pacs"]})
    (row,) = audit.events(engine)
    assert (row["kind"], row["actor"], row["series_instance_uid"]) == ("resend", "alice as root@node1 (sudo)", "1.2.3.4")


def test_a_command_whose_audit_row_cannot_be_written_says_so_and_goes_on(tmp_path, caplog):
    no_tables = create_engine(sqlite_url(tmp_path / "empty.db"))
    assert audit.record_command(no_tables, audit.REPLAY, series_instance_uid="1.2.3") is False
    assert "could not write the replay audit event" in caplog.text
    no_tables.dispose()
