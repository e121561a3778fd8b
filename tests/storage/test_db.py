"""Readers never block writers: only write transactions take SQLite's write lock."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import select, update

from storage.db import make_engine, sqlite_url
from storage.models import Series
from storage.store import InstanceRecord, JobStore

WAIT = 10.0  # generous: the old behaviour blocked for the reader's whole hold (or the 30 s busy timeout)


@pytest.fixture
def store(tmp_path):
    return JobStore(make_engine(sqlite_url(tmp_path / "node.db")))


def record(sop: str, series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord("1.2", series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"1.2/{series}/{sop}.dcm", 100, modality="MR", expected_instances=2)


def _in_thread(fn) -> tuple[threading.Thread, threading.Event, list]:  # noqa: ANN001
    done = threading.Event()
    errors: list = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, errors


def test_open_read_transaction_does_not_block_ingest(store):
    store.record_instance(record("1.2.3.1"), replaced_content=False)
    with store.engine.connect() as reader:
        before = reader.execute(select(Series.instances)).scalar_one()
        thread, done, errors = _in_thread(
            lambda: store.record_instance(record("1.2.3.2"), replaced_content=False))
        # The writer finishes while the reader still holds its transaction.
        assert done.wait(WAIT), "C-STORE ingest blocked behind an open read transaction"
        assert errors == []
        # The reader keeps its snapshot (a real transaction, not statement-level autocommit).
        assert reader.execute(select(Series.instances)).scalar_one() == before == 1
    thread.join(WAIT)
    assert store.get_series("1.2.3").instances == 2


def test_open_read_transaction_does_not_block_engine_begin_writes(store):
    store.record_instance(record("1.2.3.1"), replaced_content=False)

    def write() -> None:
        with store.engine.begin() as conn:
            conn.execute(update(Series).values(reason="written"))

    with store.engine.connect() as reader:
        reader.execute(select(Series)).all()
        thread, done, errors = _in_thread(write)
        assert done.wait(WAIT), "write transaction blocked behind an open read transaction"
        assert errors == []
    thread.join(WAIT)
    assert store.get_series("1.2.3").reason == "written"


def test_write_transactions_still_take_the_lock_at_begin(store, tmp_path):
    """engine.begin() is BEGIN IMMEDIATE: a second writer queues instead of failing on upgrade."""
    other = sqlite3.connect(tmp_path / "node.db", timeout=0, isolation_level=None)
    try:
        with store.engine.begin():
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        with store.engine.connect() as reader:
            reader.execute(select(Series)).all()
            other.execute("BEGIN IMMEDIATE")  # a reader holds no write lock
            other.execute("ROLLBACK")
    finally:
        other.close()
