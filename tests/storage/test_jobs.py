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


def _queued(store, queue, sop: str = "1.2.3.1") -> int:
    store.record_instance(record(sop, expected=None), replaced_content=False)
    return _complete(store, queue)


def test_a_lease_is_renewed_by_its_holder_and_taken_back_when_it_runs_out(queue):
    store, jobs = queue
    job_id = _queued(store, jobs)
    worker = JobQueue(jobs.engine, owner="gpu-host-2:4242", lease_seconds=60)
    other = JobQueue(jobs.engine, owner="gpu-host-3:77", lease_seconds=60)
    assert worker.claim(now=1000.0).job_id == job_id
    assert other.claim(now=1000.0) is None  # exactly once
    assert worker.heartbeat(job_id, now=1050.0)  # lease now until 1110
    assert not other.heartbeat(job_id, now=1050.0)  # only the holder renews
    assert jobs.expire_leases(3, 0, now=1100.0) == []
    # Start-up recovery on this machine never takes another machine's job, even an overdue one.
    assert jobs.requeue_interrupted(now=1200.0) == 0
    assert store.get_series(SERIES).jobs[0]["lease_owner"] == "gpu-host-2:4242"
    # gpu-host-2 is gone: its lease runs out and the job goes back to the queue, one attempt spent.
    ((expired, owner, state),) = jobs.expire_leases(3, 0, now=1111.0)
    assert (expired, owner, state) == (job_id, "gpu-host-2:4242", "queued")
    view = store.get_series(SERIES)
    assert view.state == "queued" and "lease of gpu-host-2:4242 expired" in view.reason
    assert other.claim(now=1112.0).job_id == job_id
    # The first holder comes back late: its heartbeat and its result are refused, the new holder's count.
    assert not worker.heartbeat(job_id, now=1113.0)
    assert not worker.finish(job_id, _result("5.1"), ["pacs"], now=1114.0)
    assert worker.fail(job_id, "late", 3, 0, now=1114.0) == "classifying"
    assert other.finish(job_id, _result("5.2"), ["pacs"], now=1115.0)
    view = store.get_series(SERIES)
    assert view.state == "classified" and view.sr_sop_instance_uid == "5.2" and view.jobs[0]["attempts"] == 2


def test_a_delivery_claimed_by_one_exporter_is_not_sent_by_another(queue):
    store, jobs = queue
    store.record_instance(record("1.2.3.1", expected=None), replaced_content=False)
    _classified(store, jobs, "5.1")
    first = JobQueue(jobs.engine, owner="node-a:1")
    second = JobQueue(jobs.engine, owner="node-b:2")
    (due,) = first.claim_deliveries(now=2e9, lease_seconds=120)
    assert second.claim_deliveries(now=2e9 + 60) == []
    # node-a died mid-send: after its lease the delivery is due again, for node-b.
    (again,) = second.claim_deliveries(now=2e9 + 121)
    assert again.delivery_id == due.delivery_id
    second.delivery_sent(again.delivery_id, now=2e9 + 122)
    assert store.get_series(SERIES).state == "delivered"
    assert first.claim_deliveries(now=2e9 + 1000) == []


def test_concurrent_claims_take_each_job_once(queue, capsys):
    """Eight claimers (two engines, as two machines) race for 60 queued jobs: each job is claimed
    exactly once. Prints the median time of one claim transaction (the closing note's figure)."""
    import statistics
    import threading
    import time

    from storage.db import make_engine

    store, jobs = queue
    for i in range(60):
        series = f"1.2.4.{i}"
        store.record_instance(record(f"{series}.1", series=series, expected=None), replaced_content=False)
    for snapshot in store.receiving_series():
        assert store.mark_complete(snapshot, "test")
    for job_id, _ in jobs.awaiting_selection():
        jobs.selected(job_id, True, "3D T1")
    engines = [jobs.engine, make_engine(str(jobs.engine.url.render_as_string(hide_password=False)))]
    claimed: list[int] = []
    seconds: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def claimer(index: int) -> None:
        q = JobQueue(engines[index % 2], owner=f"host-{index % 2}:{index}")
        try:
            barrier.wait()
            while True:
                started = time.perf_counter()
                job = q.claim()
                seconds.append(time.perf_counter() - started)
                if job is None:
                    return
                claimed.append(job.job_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engines[1].dispose()
    assert not errors, errors
    assert len(claimed) == 60 and len(set(claimed)) == 60
    with capsys.disabled():
        print(f"\n{jobs.engine.dialect.name}: one claim transaction, median {statistics.median(seconds) * 1000:.1f} ms "
              f"(8 concurrent claimers, {len(seconds)} claims)")
