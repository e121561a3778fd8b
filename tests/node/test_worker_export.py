"""Worker and export in-process: real associations on 127.0.0.1, real SQLite, real spool."""

from __future__ import annotations

import logging
import multiprocessing
import random
import subprocess
import threading
import time

import pydicom
import pynetdicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, MRImageStorage  # type: ignore[attr-defined]

from node.config import ExportSection
from node.export import Exporter, backoff_seconds, classify_status
from node.service import NodeService
from node.worker import Worker
from tests.peers import free_port, scu_store, wait_until


@pytest.fixture
def service(in_process_node, tiny_checkpoint):
    def make(destinations=(), **worker) -> NodeService:
        return in_process_node(
            model={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
            worker={"processes": 0, "retry_seconds": 0, **worker},
            export={"retry_initial_seconds": 0.1, "retry_max_seconds": 0.2, "max_attempts": 3},
            destinations=list(destinations),
        )

    return make


@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    from model.synth import write_series

    out = tmp_path_factory.mktemp("t1")
    return out, write_series(out, slices=100, rows=48, columns=48, spacing=1.5, seed=4)


def send(port: int, paths) -> None:
    """The series' files, read and sent by pynetdicom proposing MR Image Storage; every one stored."""
    assert all(status == 0 for status in scu_store(port, *paths, contexts=[MRImageStorage], chunked=False))


def queued(svc, series_uid):
    return wait_until(lambda: (v := svc.store.get_series(series_uid)) and v.state == "queued" and v, timeout=20)


def test_worker_classifies_and_writes_the_outbox_without_destinations(service, t1):
    series_dir, series = t1
    svc = service()
    send(svc.port, sorted(series_dir.iterdir()))
    queued(svc, series.series_instance_uid)
    worker = Worker(svc.settings, svc.queue)
    assert worker.run_once() is True
    assert worker.run_once() is False  # nothing else to do
    view = svc.store.get_series(series.series_instance_uid)
    assert view.state == "delivered" and "outbox" in view.reason
    assert view.model_id.startswith("test-random@") and 0 <= view.probability <= 1
    assert set(view.timings) == {"load", "assemble", "preprocess", "inference", "report", "write"}
    outbox = list((svc.settings.storage.data_dir / "outbox").rglob("*.dcm"))
    assert sorted(p.stem for p in outbox) == sorted([view.sr_sop_instance_uid, view.image_sop_instance_uid])
    for path in outbox:
        assert pydicom.dcmread(path).StudyInstanceUID == series.study_instance_uid
    assert {pydicom.dcmread(p).Modality for p in outbox} == {"SR", "OT"}


def test_worker_warms_up_then_takes_each_job_as_soon_as_serve_signals_it(service, t1, caplog):
    """With an hour between polls, only the semaphore serve releases per queued job can start the second job."""
    series_dir, series = t1
    svc = service()
    send(svc.port, sorted(series_dir.iterdir()))
    queued(svc, series.series_instance_uid)
    spawn = multiprocessing.get_context("spawn")
    work_ready, results_ready = spawn.Semaphore(0), spawn.Semaphore(0)
    worker = Worker(svc.settings, svc.queue, results_ready)
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="node.worker")
    def run() -> None:  # what worker_main does, in this process (so without exit_on_stop)
        worker.start_up()
        worker.take_jobs(stop, work_ready, poll_seconds=3600)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Version 1 was queued before the worker started: it takes it after the warm-up.
        wait_until(lambda: svc.store.get_series(series.series_instance_uid).state == "delivered", timeout=120)
        assert "worker ready" in caplog.text and "warm-up failed" not in caplog.text
        # The warm-up's SR and image are never saved: the outbox holds version 1's two objects.
        assert len(list((svc.settings.storage.data_dir / "outbox").rglob("*.dcm"))) == 2
        svc.queue.replay(series.series_instance_uid)
        queued(svc, series.series_instance_uid)
        work_ready.release()  # what serve's selection stage does for each job it queues
        view = wait_until(lambda: (v := svc.store.get_series(series.series_instance_uid)) and v.version == 2
                          and v.state == "delivered" and v, timeout=60, what="version 2 classified")
        assert view.model_id.startswith("test-random@")
        assert not results_ready.acquire(False)  # no destinations: the outbox, nothing for the exporter
    finally:
        stop.set()
        work_ready.release()
        thread.join(30)
    assert not thread.is_alive()


def test_failures_are_retried_then_failed_and_interrupted_jobs_requeued(service, t1):
    series_dir, series = t1
    svc = service(max_attempts=2)
    send(svc.port, sorted(series_dir.iterdir()))
    queued(svc, series.series_instance_uid)
    # Break the spool: one slice goes missing after it was acknowledged (disk trouble).
    victim = next(svc.spool.root.rglob("*.dcm"))
    saved = victim.read_bytes()
    victim.unlink()
    worker = Worker(svc.settings, svc.queue)
    assert worker.run_once()
    view = svc.store.get_series(series.series_instance_uid)
    assert view.state == "queued" and view.reason.startswith("attempt 1 failed") and "No such file" in view.reason
    assert worker.run_once()
    view = svc.store.get_series(series.series_instance_uid)
    assert view.state == "failed" and "failed after 2 attempt(s)" in view.reason

    # A job left `classifying` by a worker process of this machine that is gone goes back to the queue
    # at start-up; a live process's job stays with it (it returns through its lease, if ever).
    victim.write_bytes(saved)
    svc.queue.replay(series.series_instance_uid)
    svc.dispatcher.run()
    gone = subprocess.Popen(["true"])
    gone.wait()
    claimed = svc.queue.claim(worker_pid=gone.pid)
    assert claimed is not None and svc.store.get_series(series.series_instance_uid).state == "classifying"
    assert svc.queue.requeue_interrupted() == 1
    assert svc.store.get_series(series.series_instance_uid).state == "queued"
    assert svc.queue.claim() is not None  # held by this (live) test process now
    assert svc.queue.requeue_interrupted() == 0
    assert svc.store.get_series(series.series_instance_uid).state == "classifying"
    assert svc.queue.expire_leases(3, 0, now=time.time() + svc.settings.worker.lease_seconds + 1)
    assert svc.store.get_series(series.series_instance_uid).state == "queued"


def test_classify_status_and_backoff():
    assert classify_status(0x0000).sent and classify_status(0xB000).sent
    assert not classify_status(0xA700).permanent and not classify_status(None).permanent
    assert classify_status(0xC000).permanent and classify_status(0xA900).permanent
    section = ExportSection(retry_initial_seconds=5, retry_max_seconds=60)
    rng = random.Random(1)
    delays = [backoff_seconds(n, section, rng) for n in range(1, 8)]
    assert 2.5 <= delays[0] <= 5 and 5 <= delays[1] <= 10 and all(30 <= d <= 60 for d in delays[4:])


class FlakyPacs:
    """A real pynetdicom storage SCP answering the scripted statuses, then success."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.received = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.require_called_aet = True  # associations addressed to another AE title are rejected
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event):
        status = self.statuses.pop(0) if self.statuses else 0x0000
        if status == 0x0000:
            self.received.append(event.request.AffectedSOPInstanceUID)
        return status

    def close(self):
        self.server.shutdown()


def _classified(svc, t1, destinations):
    series_dir, series = t1
    send(svc.port, sorted(series_dir.iterdir()))
    queued(svc, series.series_instance_uid)
    assert Worker(svc.settings, svc.queue).run_once()
    return series


def test_export_retries_out_of_resources_and_delivers_once(service, t1):
    pacs = FlakyPacs([0xA700])
    try:
        svc = service(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
        series = _classified(svc, t1, ["pacs"])
        view = wait_until(lambda: (v := svc.store.get_series(series.series_instance_uid)) and v.state == "delivered"
                          and v, timeout=30)
        assert view.deliveries == [{"destination": "pacs", "state": "sent", "attempts": 2, "last_error": None,
                                 "next_attempt_at": None}]
        assert pacs.received == [view.sr_sop_instance_uid]
    finally:
        pacs.close()


def test_export_permanent_refusal_fails_at_once(service, t1):
    pacs = FlakyPacs([0xC001])
    try:
        svc = service(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                                    {"name": "wrong", "ae_title": "NOT_PACS", "host": "127.0.0.1", "port": pacs.port}])
        series = _classified(svc, t1, ["pacs", "wrong"])

        def settled():
            v = svc.store.get_series(series.series_instance_uid)
            return v if v.deliveries and all(d["state"] == "failed" for d in v.deliveries) else None

        view = wait_until(settled, timeout=30)
        by_name = {d["destination"]: d for d in view.deliveries}
        assert by_name["pacs"]["attempts"] == 1 and "0xC001" in by_name["pacs"]["last_error"]
        assert by_name["wrong"]["attempts"] == 1 and "rejected" in by_name["wrong"]["last_error"]
        assert view.state == "classified" and "delivery failed" in view.reason
        assert pacs.received == []
    finally:
        pacs.close()


@pytest.fixture(scope="module")
def t1_late(tmp_path_factory):
    """A 3D T1 whose last slice arrives after the series was judged complete."""
    from model.synth import write_series

    out = tmp_path_factory.mktemp("t1-late")
    series = write_series(out, slices=101, rows=48, columns=48, spacing=1.5, seed=5)
    *first, late = sorted(out.iterdir())
    for path in (*first, late):  # a sender that does not announce its count: the idle rule completes it
        ds = pydicom.dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(path, enforce_file_format=True)
    return first, late, series


def _job(svc, series_uid: str, version: int) -> dict:
    return next(j for j in svc.store.get_series(series_uid).jobs if j["version"] == version)


def test_a_late_instance_supersedes_the_queued_job(service, t1_late):
    first, late, series = t1_late
    svc = service()
    send(svc.port, first)
    queued(svc, series.series_instance_uid)
    send(svc.port, [late])  # reopens the series as version 2
    v1 = _job(svc, series.series_instance_uid, 1)
    assert v1["state"] == "superseded" and "superseded by version 2" in v1["reason"]
    view = queued(svc, series.series_instance_uid)
    assert view.version == 2 and view.instances == 101
    worker = Worker(svc.settings, svc.queue)
    assert worker.run_once() and not worker.run_once()  # only version 2 is classified
    assert _job(svc, series.series_instance_uid, 1)["probability"] is None
    assert svc.store.get_series(series.series_instance_uid).state == "delivered"
    shown = svc.store.get_series(series.series_instance_uid).to_json(detail=True)
    assert [j["state"] for j in shown["jobs"]] == ["superseded", "delivered"]


def test_a_job_superseded_while_classifying_is_never_exported(service, t1_late):
    first, late, series = t1_late
    pacs = FlakyPacs()
    try:
        svc = service(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
        send(svc.port, first)
        queued(svc, series.series_instance_uid)
        claimed = svc.queue.claim()
        assert claimed is not None and claimed.version == 1
        send(svc.port, [late])  # version 2 arrives while a worker holds version 1
        worker = Worker(svc.settings, svc.queue)
        worker.process(claimed)
        v1 = _job(svc, series.series_instance_uid, 1)
        assert v1["state"] == "superseded" and "while classifying" in v1["reason"]
        assert v1["deliveries"] == [] and v1["probability"] is not None  # kept for the record, not sent
        assert svc.queue.fail(claimed.job_id, "late error", 3, 0) == "superseded"  # no retry of old work
        queued(svc, series.series_instance_uid)
        assert worker.run_once()
        view = wait_until(lambda: (v := svc.store.get_series(series.series_instance_uid)) and v.state == "delivered"
                          and v, timeout=30)
        assert view.version == 2 and pacs.received == [view.sr_sop_instance_uid]
        assert v1["sr_sop_instance_uid"] != view.sr_sop_instance_uid
    finally:
        pacs.close()


# ---- export: warnings are stored, errors are recorded, a dead PACS does not flood the log ----------------------

def _pending_delivery(tmp_path, destinations=("pacs",)):
    """A real SQLite queue holding one classified job with a pending delivery of a small SR file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from storage.db import make_engine, sqlite_url
    from storage.jobs import JobQueue, ResultFile
    from storage.store import InstanceRecord, JobStore

    store = JobStore(make_engine(sqlite_url(tmp_path / "node.db")))
    store.record_instance(InstanceRecord("1.2", "1.2.3", "1.2.3.1", MRImageStorage, ExplicitVRLittleEndian,
                                         "1.2/1.2.3/1.2.3.1.dcm", 100), replaced_content=False)
    [snapshot] = store.receiving_series()
    assert store.mark_complete(snapshot, "test")
    queue = JobQueue(store.engine)
    [(job_id, _)] = queue.awaiting_selection()
    queue.selected(job_id, True, "test")
    claimed = queue.claim()

    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = "1.2", generate_uid(), "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    obj = ResultFile("sr", ComprehensiveSRStorage, sr.SeriesInstanceUID, sr.SOPInstanceUID, str(path))
    result = {"objects": [obj], "probability": 0.7, "label": "responder", "model_id": "m", "device": "cpu",
              "synthetic": True, "timings": {}, "sr_sop_instance_uid": sr.SOPInstanceUID, "sr_path": str(path)}
    assert queue.finish(claimed.job_id, result, list(destinations))
    return store, queue


def _exporter(queue, port, **section):
    from node.config import Destination

    section = {"retry_initial_seconds": 60, "retry_max_seconds": 60, "max_attempts": 5, "timeout_seconds": 3,
               **section}
    return Exporter(queue, [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)], "MIGNODE",
                    ExportSection(**section))


def _make_due(store):
    from sqlalchemy import update

    from storage.models import Delivery

    with store.engine.begin() as conn:
        conn.execute(update(Delivery).values(next_attempt_at=0))


def test_classify_status_warnings_mean_stored():
    for status in (0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116):
        outcome = classify_status(status)
        assert outcome.sent and "warning" in outcome.message, hex(status)
    assert classify_status(0x0000).sent and "warning" not in classify_status(0x0000).message
    assert classify_status(0x0110).permanent and not classify_status(0x0110).sent


@pytest.mark.parametrize("status", [0x0107, 0x0116, 0x0001, 0xB007])
def test_export_warning_status_is_delivered(tmp_path, status):
    store, queue = _pending_delivery(tmp_path)
    pacs = FlakyPacs([status])
    try:
        assert _exporter(queue, pacs.port).run_due() == 1
    finally:
        pacs.close()
    view = store.get_series("1.2.3")
    assert view.state == "delivered"
    assert view.deliveries == [{"destination": "pacs", "state": "sent", "attempts": 1, "last_error": None,
                                 "next_attempt_at": None}]
    [sent] = store.get_series("1.2.3").sent_objects
    assert sent["status"] == status


def test_export_unexpected_error_is_recorded_with_backoff(tmp_path, monkeypatch):
    import time

    from node import export

    store, queue = _pending_delivery(tmp_path)

    def explode(self, *args, **kwargs):
        raise KeyError("pynetdicom internals")

    monkeypatch.setattr(pynetdicom.AE, "associate", explode)
    exporter = _exporter(queue, free_port())
    assert exporter.run_due() == 1  # nothing escapes to the scheduler
    [delivery] = store.get_series("1.2.3").deliveries
    assert delivery["state"] == "pending" and delivery["attempts"] == 1
    assert "KeyError" in delivery["last_error"] and "pynetdicom internals" in delivery["last_error"]
    assert queue.due_deliveries(time.time()) == []  # backed off, not retried on the next 0.25 s tick
    assert exporter.run_due() == 0


def test_export_unreachable_pacs_does_not_flood_the_log(tmp_path, caplog):
    import logging

    store, queue = _pending_delivery(tmp_path)
    exporter = _exporter(queue, free_port())
    caplog.set_level(logging.DEBUG, logger="node.export")
    for _ in range(4):
        _make_due(store)
        assert exporter.run_due() == 1
    warnings = [r for r in caplog.records if r.name == "node.export" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "will be retried" in warnings[0].getMessage()
    [delivery] = store.get_series("1.2.3").deliveries
    assert delivery["attempts"] == 4 and "cannot connect" in delivery["last_error"]


# ---- selection: an error is a recorded failure, never a silent skip ----------------------------------------------

def test_dispatch_error_fails_the_job_with_its_reason(tmp_path):
    from node.dispatch import Dispatcher
    from storage.db import make_engine, sqlite_url
    from storage.jobs import JobQueue
    from storage.spool import Spool
    from storage.store import InstanceRecord, JobStore

    store = JobStore(make_engine(sqlite_url(tmp_path / "node.db")))
    # Recorded, but its header file is gone from the spool (disk trouble, manual clean-up).
    store.record_instance(InstanceRecord("1.2", "1.2.3", "1.2.3.1", MRImageStorage, "1.2.840.10008.1.2.1",
                                         "1.2/1.2.3/1.2.3.1.dcm", 100), replaced_content=False)
    [snapshot] = store.receiving_series()
    assert store.mark_complete(snapshot, "test")
    queue = JobQueue(store.engine)
    assert Dispatcher(queue, Spool(tmp_path / "spool")).run() == 1
    view = store.get_series("1.2.3")
    assert view.state == "failed"
    assert view.reason.startswith("selection failed: ") and "1.2.3.1.dcm" in view.reason
    assert queue.awaiting_selection() == []  # handled once, not retried every tick
    assert queue.status()["series"] == {"failed": 1}


# ---- SCP bookkeeping: the sender is on record before its instance's row is ---------------------------------------

def test_scp_marks_the_sender_active_before_recording_the_instance(in_process_node, t1, monkeypatch):
    """Else the tracker could see the expected count reached with no sender open, and complete the
    series before the last file is in place or 0x0000 has gone back."""
    series_dir, series = t1
    svc = in_process_node()
    seen = []
    record_instance = svc.store.record_instance

    def checked(rec, *args, **kwargs):
        seen.append(svc.active.senders_active(rec.series_instance_uid))
        return record_instance(rec, *args, **kwargs)

    monkeypatch.setattr(svc.store, "record_instance", checked)
    send(svc.port, sorted(series_dir.iterdir())[:3])
    assert seen == [True, True, True]
