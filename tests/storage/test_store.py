from __future__ import annotations

import pytest

from storage.db import make_engine, sqlite_url
from storage.store import InstanceRecord, JobStore, RecordOutcome, StoreError


@pytest.fixture
def store(tmp_path):
    return JobStore(make_engine(sqlite_url(tmp_path / "node.db")))


def record(sop: str, series: str = "1.2.3", study: str = "1.2", expected: int | None = 2) -> InstanceRecord:
    return InstanceRecord(study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"{study}/{series}/{sop}.dcm", 100, modality="MR", series_description="T1W_3D_TFE",
                          expected_instances=expected)


def test_sqlite_is_wal(store):
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
