"""Job and delivery transitions around a newer version: superseded work stays superseded."""

from __future__ import annotations

import pytest

from storage.db import make_engine
from storage.jobs import JobQueue, JobStoreError, ResultFile
from storage.store import JobStore
from tests.storage.test_store import record

SERIES = "1.2.3"


@pytest.fixture
def queue(database_url):
    engine = make_engine(database_url)
    yield JobStore(engine), JobQueue(engine)
    engine.dispose()


def _complete(store: JobStore, queue: JobQueue) -> int:
    (snapshot,) = [s for s in store.receiving_series() if s.series_instance_uid == SERIES]
    assert store.mark_complete(snapshot, "test")
    ((job_id, _),) = queue.awaiting_selection()
    queue.selected(job_id, True, "3D T1")
    return job_id


def _result(sop: str) -> dict:
    obj = ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.33", "9.9", sop, f"/x/{sop}.dcm", "k")
    return {"probability": 0.7, "label": "responder", "model_id": "m@1", "device": "cpu", "synthetic": True,
            "timings": {}, "sr_sop_instance_uid": sop, "sr_path": obj.path, "objects": [obj]}


def _classified(store, queue, sop: str, destinations=("pacs",)) -> int:
    job_id = _complete(store, queue)
    claimed = queue.claim()
    assert claimed.job_id == job_id
    assert queue.finish(job_id, _result(sop), list(destinations))
    return job_id


def test_a_superseded_delivery_is_not_revived_by_a_late_retry(queue):
    store, jobs = queue
    store.record_instance(record("1.2.3.1", expected=None), replaced_content=False)
    v1 = _classified(store, jobs, "5.1")
    (due,) = jobs.due_deliveries()  # the exporter has it in hand ...
    store.record_instance(record("1.2.3.2", expected=None), replaced_content=False)  # ... when version 2 arrives
    jobs.delivery_retry(due.delivery_id, "timeout", 0.0)  # the send it was doing timed out
    assert jobs.due_deliveries() == []
    (delivery,) = store.get_series(SERIES).jobs[0]["deliveries"]
    assert delivery["state"] == "superseded"
    assert store.get_series(SERIES).jobs[0]["state"] == "superseded" and v1


def test_resend_refuses_an_older_version_and_fail_supersedes_it(queue):
    store, jobs = queue
    store.record_instance(record("1.2.3.1", expected=None), replaced_content=False)
    v1 = _classified(store, jobs, "5.1")
    (due,) = jobs.due_deliveries()
    jobs.record_sent(due.delivery_id, ((due.objects[0], 0),))
    jobs.delivery_sent(due.delivery_id)
    assert store.get_series(SERIES).state == "delivered"
    store.record_instance(record("1.2.3.2", expected=None), replaced_content=False)  # version 2, no result yet
    with pytest.raises(JobStoreError, match="version 2 has no result yet"):
        jobs.resend(SERIES, ["pacs"])
    assert jobs.due_deliveries() == []
    # Version 2 is claimed; version 3 arrives; version 2's attempt then fails: it is not requeued.
    v2 = _complete(store, jobs)
    assert jobs.claim().job_id == v2
    store.record_instance(record("1.2.3.3", expected=None), replaced_content=False)
    assert jobs.fail(v2, "boom", max_attempts=3, retry_seconds=0) == "superseded"
    assert jobs.claim() is None
    assert v1 != v2


def test_predecessor_is_the_newest_version_acknowledged(queue):
    store, jobs = queue
    store.record_instance(record("1.2.3.1", expected=None), replaced_content=False)
    _classified(store, jobs, "5.1")
    (first,) = jobs.due_deliveries()
    store.record_instance(record("1.2.3.2", expected=None), replaced_content=False)
    _classified(store, jobs, "5.2")
    (second,) = jobs.due_deliveries()
    jobs.record_sent(second.delivery_id, ((second.objects[0], 0),), now=100.0)
    jobs.record_sent(first.delivery_id, ((first.objects[0], 0),), now=200.0)  # the old one acknowledged last
    assert jobs.last_acknowledged(SERIES, "sr", unlike="5.3").sop_instance_uid == "5.2"
    assert jobs.last_acknowledged(SERIES, "sr", unlike="5.2").sop_instance_uid == "5.1"
    assert jobs.last_acknowledged(SERIES, "image", unlike="5.3") is None
