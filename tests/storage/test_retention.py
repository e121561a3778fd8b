"""Retention: spool files of finished series go after their retention period, rows stay."""

from __future__ import annotations

import threading

import pytest

from storage.db import make_engine
from storage.jobs import JobQueue, ResultFile
from storage.retention import DAY, purge, purge_candidates
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


def _finish(store: JobStore, queue: JobQueue, series: str, outcome: str, now: float) -> None:
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
    sr = ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "9.9", f"{series}.99", "/x/sr.dcm", "k")
    queue.finish(job_id, {"probability": 0.6, "label": "responder", "model_id": "m", "device": "cpu",
                          "synthetic": True, "timings": {}, "sr_sop_instance_uid": sr.sop_instance_uid,
                          "sr_path": sr.path, "objects": [sr]}, ["pacs"], now=now)
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
