"""Retention: spool files of finished series go after their retention period, rows stay."""

from __future__ import annotations

import threading

import pytest

from storage.db import make_engine
from storage.jobs import JobQueue, JobStoreError, ResultFile
from storage.retention import DAY, purge, purge_candidates, result_folders
from storage.spool import Spool, SpoolKey
from storage.store import InstanceRecord, JobStore, RecordOutcome

STUDY = "1.2.9"
NOW = 1_000_000_000.0


@pytest.fixture
def node(database_url, tmp_path):
    engine = make_engine(database_url)
    yield JobStore(engine), JobQueue(engine), Spool(tmp_path / "spool")
    engine.dispose()


def _receive(store: JobStore, spool: Spool, series: str, count: int, now: float) -> None:
    for i in range(1, count + 1):
        key = SpoolKey(STUDY, series, f"{series}.{i}")
        spool.write(key, (b"DICM" * 100,))
        store.record_instance(InstanceRecord(STUDY, series, key.sop_instance_uid, "1.2.840.10008.5.1.4.1.1.4",
                                             "1.2.840.10008.1.2.1", key.relative_path, 400, modality="MR",
                                             expected_instances=count), replaced_content=False, now=now)


def _finish(store: JobStore, queue: JobQueue, series: str, outcome: str, now: float,
            objects: list[ResultFile] | None = None) -> None:
    """Complete the series and take it to `outcome`: delivered, skipped, classified (pending) or failed."""
    (snap,) = [s for s in store.receiving_series() if s.series_instance_uid == series]
    assert store.mark_complete(snap, "complete", now=now)
    (job_id,) = [j for j, s in queue.awaiting_selection() if s == series]
    queue.selected(job_id, outcome != "skipped", "rule", now=now)
    if outcome == "skipped":
        return
    assert queue.claim(now=now).job_id == job_id
    if outcome == "failed":
        queue.fail(job_id, "boom", max_attempts=1, retry_seconds=0, now=now)
        return
    objects = objects or [ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "9.9", f"{series}.99", "/x/sr.dcm", "k")]
    sr = objects[0]
    queue.finish(job_id, {"probability": 0.6, "label": "responder", "model_id": "m", "device": "cpu",
                          "synthetic": True, "timings": {}, "sr_sop_instance_uid": sr.sop_instance_uid,
                          "sr_path": sr.path, "objects": objects}, ["pacs"], now=now)
    if outcome == "delivered":
        (due,) = [d for d in queue.claim_deliveries(now=now + 1) if d.series_instance_uid == series]
        queue.delivery_sent(due.delivery_id, now=now)


def _files(spool: Spool, series: str) -> int:
    return len(list(spool.root.glob(f"{STUDY}/{series}/*.dcm")))


def test_only_finished_series_past_their_retention_lose_their_files(node):
    store, queue, spool = node
    old, recent = NOW - 40 * DAY, NOW - 5 * DAY
    cases = {"1.2.9.1": ("delivered", old), "1.2.9.2": ("delivered", recent), "1.2.9.3": ("skipped", old),
             "1.2.9.4": ("skipped", recent), "1.2.9.5": ("classified", old), "1.2.9.6": ("failed", old)}
    for series, (outcome, when) in cases.items():
        _receive(store, spool, series, 3, when)
        _finish(store, queue, series, outcome, when)
    assert {s: store.get_series(s).state for s in cases} == {s: o for s, (o, _) in cases.items()}

    listed = purge(store.engine, spool, retention_days=30, skipped_retention_days=7, now=NOW, dry_run=True)
    assert [c.series_instance_uid for c in listed.candidates] == ["1.2.9.1", "1.2.9.3"]
    assert [c.files for c in listed.candidates] == [3, 3] and listed.candidates[0].size_bytes == 1200
    assert all(_files(spool, s) == 3 for s in cases), "a dry run removes nothing"

    report = purge(store.engine, spool, retention_days=30, skipped_retention_days=7, now=NOW)
    assert (report.purged, report.files_removed) == (2, 6)
    assert {s: _files(spool, s) for s in cases} == {"1.2.9.1": 0, "1.2.9.2": 3, "1.2.9.3": 0, "1.2.9.4": 3,
                                                    "1.2.9.5": 3, "1.2.9.6": 3}
    # Rows and history stay: `jobs` and `show` still tell what happened.
    view = store.get_series("1.2.9.1")
    assert view.state == "delivered" and view.purged_at is not None and view.instances == 3
    assert view.probability == pytest.approx(0.6) and view.jobs[0]["deliveries"][0]["state"] == "sent"
    assert store.get_series("1.2.9.5").purged_at is None
    assert purge(store.engine, spool, 30, 7, now=NOW).purged == 0  # nothing twice
    # 0 days = keep for ever.
    assert purge_candidates(store.engine, 0, 0, now=NOW + 1000 * DAY) == []


def test_a_delivered_series_loses_its_result_files_and_resend_says_why(node, tmp_path):
    """The SR and result image of every version go with the source images (PACS has the delivered ones);
    a result path outside the node's result folders is never removed; resend then names the purge."""
    store, queue, spool = node
    roots = result_folders(tmp_path / "data")
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"not ours")
    made = []
    for series, when in (("1.2.9.1", NOW - 40 * DAY), ("1.2.9.2", NOW - 5 * DAY)):
        _receive(store, spool, series, 3, when)
        paths = []
        for root, name in ((roots[0], "sr.dcm"), (roots[1], "image.dcm")):
            path = root / STUDY / series / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"R" * 1000)
            paths.append(path)
        made.append(paths)
        _finish(store, queue, series, "delivered", when,
                objects=[ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "9.9", f"{series}.99", str(paths[0]), "k"),
                         ResultFile("image", "1.2.840.10008.5.1.4.1.1.7", "9.8", f"{series}.98", str(paths[1]), "k")])
    # A result row pointing outside the result folders (a tampered or foreign database).
    _receive(store, spool, "1.2.9.3", 3, NOW - 40 * DAY)
    _finish(store, queue, "1.2.9.3", "delivered", NOW - 40 * DAY,
            objects=[ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "9.9", "1.2.9.3.99", str(outside), "k")])

    report = purge(store.engine, spool, 30, 7, now=NOW, result_roots=roots)
    assert report.purged == 2
    assert report.files_removed == 3 + 2 + 3  # the old series' images and results, the other's images
    assert not any(p.exists() for p in made[0]) and all(p.exists() for p in made[1])
    assert outside.read_bytes() == b"not ours"
    with pytest.raises(JobStoreError, match="purged by retention on .*replay --from-pacs"):
        queue.resend("1.2.9.1", ["pacs"])
    assert queue.resend("1.2.9.2", ["pacs"]) == 1  # not purged: resent as before


def test_a_purged_series_sent_again_counts_from_zero(node):
    store, queue, spool = node
    _receive(store, spool, "1.2.9.1", 3, NOW - 40 * DAY)
    _finish(store, queue, "1.2.9.1", "delivered", NOW - 40 * DAY)
    purge(store.engine, spool, 30, 7, now=NOW)
    _receive(store, spool, "1.2.9.1", 3, NOW)
    view = store.get_series("1.2.9.1")
    assert (view.state, view.instances, view.version, view.purged_at) == ("receiving", 3, 2, None)


def test_ingest_goes_on_while_a_purge_runs(node):
    """Another series' instances are recorded, each acknowledged once, while retention removes 40
    series in per-series transactions."""
    store, queue, spool = node
    for i in range(40):
        series = f"1.2.9.{100 + i}"
        _receive(store, spool, series, 4, NOW - 40 * DAY)
        _finish(store, queue, series, "delivered", NOW - 40 * DAY)
    outcomes: list[RecordOutcome] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def ingest() -> None:
        try:
            started.set()
            for i in range(1, 121):
                key = SpoolKey(STUDY, "1.2.9.7", f"1.2.9.7.{i}")
                spool.write(key, (b"DICM",))
                outcomes.append(store.record_instance(InstanceRecord(
                    STUDY, "1.2.9.7", key.sop_instance_uid, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                    key.relative_path, 4, modality="MR"), replaced_content=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=ingest)
    thread.start()
    started.wait()
    report = purge(store.engine, spool, 30, 7, now=NOW, limit=None)
    thread.join()
    assert not errors, errors
    assert report.purged == 40 and report.files_removed == 160
    assert outcomes == [RecordOutcome.NEW] * 120
    assert _files(spool, "1.2.9.7") == 120 and store.get_series("1.2.9.7").instances == 120


def test_audit_events_older_than_audit_retention_days_go_in_batches(node, monkeypatch):
    from sqlalchemy import select

    from storage import audit, retention
    from storage.models import AuditEvent
    from storage.retention import purge_audit

    store, _, _ = node
    events = [audit.Event(audit.ASSOCIATION_ACCEPTED, actor="SCANNER", at=NOW - days * DAY)
              for days in (400,) * 7 + (100, 10)]
    audit.write(store.engine, events)
    assert purge_audit(store.engine, 0, now=NOW) == 0  # 0 = kept for ever
    assert purge_audit(store.engine, 365, now=NOW, dry_run=True) == 7
    monkeypatch.setattr(retention, "AUDIT_BATCH", 3)  # several transactions
    assert purge_audit(store.engine, 365, now=NOW) == 7
    with store.engine.connect() as conn:
        left = sorted(round((NOW - at) / DAY) for at in conn.execute(select(AuditEvent.at)).scalars())
    assert left == [10, 100]
    assert purge_audit(store.engine, 365, now=NOW) == 0
