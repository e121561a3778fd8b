from __future__ import annotations

import pytest

from storage.db import make_engine
from storage.store import InstanceRecord, JobStore, RecordOutcome, StoreError


@pytest.fixture
def store(database_url):
    engine = make_engine(database_url)
    yield JobStore(engine)
    engine.dispose()


def record(sop: str, series: str = "1.2.3", study: str = "1.2", expected: int | None = 2) -> InstanceRecord:
    return InstanceRecord(study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"{study}/{series}/{sop}.dcm", 100, modality="MR", series_description="T1W_3D_TFE",
                          expected_instances=expected)


def test_sqlite_is_wal(store):
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_outcomes_and_counting(store):
    assert store.record_instance(record("1.2.3.1"), replaced_content=False) is RecordOutcome.NEW
    assert store.record_instance(record("1.2.3.1"), replaced_content=False) is RecordOutcome.DUPLICATE
    assert store.record_instance(record("1.2.3.1"), replaced_content=True) is RecordOutcome.REPLACED
    assert store.get_series("1.2.3").instances == 1
    assert store.count_instances() == 1


def test_uid_conflicts_are_refused(store):
    store.record_instance(record("1.2.3.1"), replaced_content=False)
    with pytest.raises(StoreError, match="another series"):
        store.record_instance(record("1.2.3.1", series="1.2.4"), replaced_content=False)
    with pytest.raises(StoreError, match="another study"):
        store.record_instance(record("1.2.3.2", study="1.9"), replaced_content=False)
    assert store.count_instances() == 1


def test_mark_complete_loses_to_a_newer_instance(store):
    store.record_instance(record("1.2.3.1"), replaced_content=False, now=100.0)
    [snapshot] = store.receiving_series()
    store.record_instance(record("1.2.3.2"), replaced_content=False, now=101.0)
    assert store.mark_complete(snapshot, "idle") is False
    [fresh] = store.receiving_series()
    assert store.mark_complete(fresh, "idle") is True
    view = store.get_series("1.2.3")
    assert view.state == "complete" and view.instances == 2
    assert [j["version"] for j in view.jobs] == [1]


def test_forget_instance_undoes_a_record(store):
    store.record_instance(record("1.2.3.1"), replaced_content=False)
    store.forget_instance("1.2.3", "1.2.3.1")
    assert store.count_instances() == 0
    assert store.get_series("1.2.3").instances == 0


def test_concurrent_ingest_of_the_same_instances_counts_each_once(database_url):
    """Two nodes (two engines) with four threads each record the same 40 instances at once: every
    record succeeds, each instance is NEW exactly once, and the series counts 40. Select-then-insert
    failed here on PostgreSQL (unique violations) under READ COMMITTED."""
    import threading

    engines = [make_engine(database_url) for _ in range(2)]
    stores = [JobStore(e) for e in engines]
    outcomes: list[RecordOutcome] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def ingest(store: JobStore) -> None:
        try:
            barrier.wait()
            for i in range(40):
                outcomes.append(store.record_instance(record(f"1.2.3.{i}", expected=40), replaced_content=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(stores[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert outcomes.count(RecordOutcome.NEW) == 40
        assert outcomes.count(RecordOutcome.DUPLICATE) == 7 * 40
        (snapshot,) = stores[0].receiving_series()
        assert snapshot.instances == 40
    finally:
        for e in engines:
            e.dispose()
