"""node/service.py's pipeline stages: a tick, and a wake-up that runs the stage at once."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from node.service import Stage
from tests.peers import wait_until

HOUR = 3600.0  # a tick that never comes during a test: only a wake-up makes a stage run again


def _stopped(stage: Stage) -> None:
    stopper = threading.Thread(target=stage.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() must wake the stage from its wait"


@pytest.mark.parametrize("kind", ["threading", "multiprocessing"])
def test_a_woken_stage_runs_at_once_and_wake_ups_during_a_run_bring_one_more_run(kind):
    signal = threading.Semaphore(0) if kind == "threading" else multiprocessing.get_context("spawn").Semaphore(0)
    runs, running, proceed = [], threading.Event(), threading.Event()

    def step() -> None:
        runs.append(len(runs))
        if len(runs) == 2:
            running.set()
            proceed.wait(10)

    stage = Stage("test", step, HOUR, signal)
    stage.start()
    try:
        wait_until(lambda: len(runs) == 1, timeout=10, what="the first run at start")
        stage.wake()
        wait_until(running.is_set, timeout=10, what="a run on wake-up")
        for _ in range(3):  # three wake-ups while it runs
            stage.wake()
        proceed.set()
        wait_until(lambda: len(runs) == 3, timeout=10, what="one more run after the wake-ups")
    finally:
        _stopped(stage)
    assert len(runs) == 3  # the three wake-ups were served by one run


def test_a_failing_stage_keeps_running(caplog):
    calls = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    stage = Stage("flaky", step, HOUR)
    stage.start()
    try:
        wait_until(lambda: calls, timeout=10)
        stage.wake()
        wait_until(lambda: len(calls) == 2, timeout=10, what="the run after a failed one")
    finally:
        _stopped(stage)
    assert "flaky step failed" in caplog.text and "database is locked" in caplog.text


# ---- selection wakes one worker per job it queues, not per series it judged ----------------------------------------

def _spool_series(spool, store, src, contrast=None) -> str:
    import pydicom

    from node.header import header_from_dataset, instance_record
    from storage.spool import SpoolKey

    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        if contrast:
            ds.ContrastBolusAgent = contrast
        rec = instance_record(header_from_dataset(ds), ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, 1, "SCANNER")
        target = spool.root / SpoolKey(rec.study_instance_uid, rec.series_instance_uid, rec.sop_instance_uid).relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        store.record_instance(rec, replaced_content=False)
    return rec.series_instance_uid


@pytest.mark.parametrize("processes", [1, 4])
def test_selection_releases_one_work_permit_per_queued_job(tmp_path, processes):
    """A study of several series of which one is a 3D T1: skipped and failed series wake no worker
    (an idle worker would query the queue once per leftover permit), and never more than one per worker."""
    from types import SimpleNamespace

    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from model.synth import write_classic_series
    from node.dispatch import Dispatcher
    from node.service import NodeService
    from storage.db import make_engine, sqlite_url
    from storage.jobs import JobQueue
    from storage.spool import Spool
    from storage.store import InstanceRecord, JobStore

    spool = Spool(tmp_path / "spool")
    store = JobStore(make_engine(sqlite_url(tmp_path / "node.db")))
    sources = []
    for seed in range(3):  # each its own study/series UIDs
        src = tmp_path / f"src{seed}"
        src.mkdir()
        write_classic_series(src, slices=120, rows=16, columns=16, seed=seed)
        sources.append(src)
    t1 = _spool_series(spool, store, sources[0])
    _spool_series(spool, store, sources[1], contrast="GADOVIST")  # skipped: post-contrast
    _spool_series(spool, store, sources[2], contrast="GADOVIST")
    # Failed selection: recorded, its file gone from the spool.
    store.record_instance(InstanceRecord("9.1", "9.1.2", "9.1.2.1", MRImageStorage, "1.2.840.10008.1.2.1",
                                         "9.1/9.1.2/9.1.2.1.dcm", 100), replaced_content=False)
    for snapshot in store.receiving_series():
        assert store.mark_complete(snapshot, "test")

    work_ready = threading.Semaphore(0)
    node = SimpleNamespace(dispatcher=Dispatcher(JobQueue(store.engine), spool), _work_ready=work_ready,
                           settings=SimpleNamespace(worker=SimpleNamespace(processes=processes)))
    NodeService._select(node)
    assert store.get_series(t1).state == "queued"
    assert JobQueue(store.engine).status()["series"] == {"queued": 1, "skipped": 2, "failed": 1}
    permits = 0
    while work_ready.acquire(blocking=False):
        permits += 1
    assert permits == 1
