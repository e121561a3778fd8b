"""Worker and export in-process: real associations on 127.0.0.1, real SQLite, real spool."""

from __future__ import annotations

import random

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, MRImageStorage  # type: ignore[attr-defined]

from node.config import ExportSection
from node.export import Exporter, backoff_seconds, classify_status
from node.service import NodeService
from node.worker import Worker
from tests.peers import free_port, wait_until


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
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MIGNODE")
    assert assoc.is_established
    try:
        assert all(assoc.send_c_store(p).Status == 0 for p in paths)
    finally:
        assoc.release()


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

    # A job left `classifying` (worker killed) goes back to the queue at start-up.
    victim.write_bytes(saved)
    svc.queue.replay(series.series_instance_uid)
    svc.dispatcher.run()
    claimed = svc.queue.claim()
    assert claimed is not None and svc.store.get_series(series.series_instance_uid).state == "classifying"
    assert svc.queue.requeue_interrupted() == 1
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
        assert view.deliveries == [{"destination": "pacs", "state": "sent", "attempts": 2, "last_error": None}]
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
