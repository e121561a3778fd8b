"""Study in, SR in PACS: DCMTK storescu -> migraine-node (subprocess, worker process) -> real Orthanc."""

from __future__ import annotations

import json

import highdicom as hd
import pydicom
import pytest

from model.synth import write_series
from tests.peers import NODE_AE, OrthancProcess, dciodvfy_errors, free_port, storescu, wait_until


@pytest.fixture
def orthanc_factory(tmp_path):
    started = []

    def make(modalities=None) -> OrthancProcess:
        pacs = OrthancProcess.create(tmp_path / f"orthanc{len(started)}", modalities)
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop(kill=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 3D T1 (passes selection) and a T2 series (must be skipped) in one study."""
    root = tmp_path_factory.mktemp("study")
    t1 = write_series(root / "t1", slices=104, rows=80, columns=80, spacing=1.5, seed=11, responder=True)
    t2 = write_series(root / "t2", slices=104, rows=80, columns=80, spacing=1.5, seed=12,
                      study_instance_uid=t1.study_instance_uid, patient_id="SYNTH-000011", series_description="T2W_TSE")
    return root, t1, t2


def send_study(root, port: int, called: str = NODE_AE) -> None:
    for name in ("t1", "t2"):
        result = storescu(root / name, port, called=called)
        assert result.returncode == 0, result.stderr


def row_of(node, series_uid: str) -> dict | None:
    return next((r for r in node.jobs() if r["series_instance_uid"] == series_uid), None)


def wait_state(node, series_uid: str, state: str, timeout: float = 120) -> dict:
    def check():
        row = row_of(node, series_uid)
        if row and row["state"] == "failed":
            raise AssertionError(f"job failed: {row['reason']}\n{node.log_text()[-3000:]}")
        return row if row and row["state"] == state else None

    return wait_until(check, timeout=timeout, interval=0.5, what=f"series {state}")


def sr_in(pacs: OrthancProcess, study_uid: str) -> list[str]:
    return pacs.find_instances({"StudyInstanceUID": study_uid, "Modality": "SR"})


def check_sr(pacs: OrthancProcess, instance_id: str, tmp_path, study_uid: str, row: dict) -> hd.sr.ComprehensiveSR:
    path = tmp_path / "from-pacs.dcm"
    path.write_bytes(pacs.download(instance_id))
    errors, output = dciodvfy_errors(path)
    assert errors == [], output
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == study_uid
    assert sr.SOPInstanceUID == row["sr_sop_instance_uid"]
    text = " | ".join(str(e.value) for e in sr.iterall() if e.VR not in ("SQ", "OB", "OW", "UN"))
    assert row["label"] in ("responder", "non-responder")
    assert ("NSAID responder" if row["label"] == "responder" else "NSAID non-responder") in text
    assert f"{round(100 * row['probability'], 2)}".rstrip("0").rstrip(".") in text  # percent
    assert row["model_id"] in text and "SYNTHETIC" in text and "Research use only" in text
    return sr


def test_study_from_scanner_sr_in_orthanc_then_replay_and_resend(node_factory, orthanc_factory, study,
                                                                 tiny_checkpoint, tmp_path):
    root, t1, t2 = study
    pacs = orthanc_factory()
    pacs.start()
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, idle_seconds=2,
                        destinations=[{"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port}]).start()
    send_study(root, node.port)

    row = wait_state(node, t1.series_instance_uid, "delivered")
    assert row["deliveries"] == [{"destination": "pacs", "state": "sent", "attempts": 1, "last_error": None,
                                 "next_attempt_at": None}]
    assert set(row["timings"]) >= {"load", "assemble", "preprocess", "inference", "report", "write"}
    skipped = wait_state(node, t2.series_instance_uid, "skipped")
    assert "T2W_TSE" in skipped["reason"] and skipped["sr_sop_instance_uid"] is None

    [sr_id] = wait_until(lambda: sr_in(pacs, t1.study_instance_uid), timeout=30, what="SR in Orthanc")
    check_sr(pacs, sr_id, tmp_path, t1.study_instance_uid, row)

    # resend: delivered again, same SOP Instance UID, so PACS still holds one SR.
    cli = node.cli("resend", t1.series_instance_uid)
    assert cli.returncode == 0, cli.stderr
    row = wait_state(node, t1.series_instance_uid, "delivered")
    assert row["deliveries"][0]["attempts"] == 1 and row["deliveries"][0]["state"] == "sent"
    assert len(sr_in(pacs, t1.study_instance_uid)) == 1

    # replay: a new job version from the spool; the old result stays in history.
    cli = node.cli("replay", t1.series_instance_uid)
    assert cli.returncode == 0, cli.stderr
    wait_until(lambda: (r := row_of(node, t1.series_instance_uid)) and r["version"] == 2 and r["state"] == "delivered",
               timeout=120, interval=0.5, what="replayed series delivered")
    shown = node.cli("show", t1.series_instance_uid, "--json")
    history = json.loads(shown.stdout)["jobs"]
    assert [j["version"] for j in history] == [1, 2]
    assert history[0]["probability"] == pytest.approx(history[1]["probability"], abs=1e-6)
    assert len(sr_in(pacs, t1.study_instance_uid)) == 1  # deterministic SR UID: no duplicate in PACS

    status = node.cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["failed"] == 0
    assert "SYNTHETIC^PHANTOM" not in node.log_text() and "SYNTH-000011" not in node.log_text()


def test_pacs_routes_study_to_node(node_factory, orthanc_factory, study, tiny_checkpoint, tmp_path):
    """As a PACS auto-routing rule would: the study arrives at Orthanc, Orthanc forwards it to the node."""
    root, t1, _ = study
    node_port = free_port()
    pacs = orthanc_factory({"node": (NODE_AE, node_port)}).start()
    node = node_factory(port=node_port, workers=1, checkpoint=tiny_checkpoint, runtime="torch", idle_seconds=2,
                        destinations=[{"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port}]).start()
    send_study(root, pacs.dicom_port, called=pacs.aet)
    found = wait_until(
        lambda: pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": t1.study_instance_uid}}),
        timeout=30, what="study in Orthanc")
    assert len(found) == 1, found
    pacs.post("/modalities/node/store", {"Resources": found, "Synchronous": True})
    row = wait_state(node, t1.series_instance_uid, "delivered")
    [sr_id] = wait_until(lambda: sr_in(pacs, t1.study_instance_uid), timeout=30, what="SR in Orthanc")
    check_sr(pacs, sr_id, tmp_path, t1.study_instance_uid, row)
    assert row["calling_ae_title"] == pacs.aet


def test_pacs_down_then_up_sr_delivered_once(node_factory, orthanc_factory, study, tiny_checkpoint, tmp_path):
    root, t1, _ = study
    pacs = orthanc_factory()  # created (ports chosen) but not started: the PACS is down
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, runtime="torch", idle_seconds=2, export_retry_seconds=1,
                        destinations=[{"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port}]).start()
    send_study(root, node.port)

    def retrying():
        row = row_of(node, t1.series_instance_uid)
        return row if row and row["deliveries"] and row["deliveries"][0]["attempts"] >= 2 else None

    row = wait_until(retrying, timeout=120, interval=0.5, what="delivery retried while the PACS is down")
    assert row["state"] == "classified"
    assert row["deliveries"][0]["state"] == "pending" and "cannot connect" in row["deliveries"][0]["last_error"]

    # The pending delivery survives a restart of the node.
    node.stop()
    node.start()
    pacs.start()
    row = wait_state(node, t1.series_instance_uid, "delivered", timeout=60)
    assert row["deliveries"][0]["state"] == "sent"
    assert len(sr_in(pacs, t1.study_instance_uid)) == 1
    assert pacs.get("/statistics")["CountInstances"] == 1  # exactly one object reached the PACS: the SR


def test_replay_from_pacs_retrieves_by_c_get(node_factory, orthanc_factory, study, tiny_checkpoint):
    """The node never saw the study: `replay --from-pacs` fetches it from Orthanc by C-GET and classifies it."""
    root, t1, t2 = study
    pacs = orthanc_factory().start()
    send_study(root, pacs.dicom_port, called=pacs.aet)
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, runtime="torch", idle_seconds=2,
                        destinations=[{"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port}]).start()
    cli = node.cli("replay", "--from-pacs", "pacs", t1.study_instance_uid)
    assert cli.returncode == 0, cli.stderr + node.log_text()[-2000:]
    assert f"retrieved {104 * 2} instance(s)" in cli.stdout
    row = wait_state(node, t1.series_instance_uid, "delivered")
    assert row["instances"] == 104
    wait_state(node, t2.series_instance_uid, "skipped")
    assert len(sr_in(pacs, t1.study_instance_uid)) == 1

    unknown = node.cli("replay", "--from-pacs", "nowhere", t1.study_instance_uid)
    assert unknown.returncode == 1 and "no [[destinations]] named 'nowhere'" in unknown.stderr


def test_reopened_series_replaces_its_result_in_pacs_and_resend_replay_add_nothing(
        node_factory, orthanc_factory, tiny_checkpoint, tmp_path):
    """Orthanc keeps the first object per SOP Instance UID: a changed result must come under a new UID."""
    t1 = write_series(tmp_path / "t1", slices=104, rows=64, columns=64, spacing=1.5, seed=21)
    *first, late = sorted((tmp_path / "t1").iterdir())
    for path in (*first, late):  # no announced count: the first 103 complete by the idle rule
        ds = pydicom.dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(path, enforce_file_format=True)
    pacs = orthanc_factory().start()
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, runtime="torch", idle_seconds=2, destinations=[
        {"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port, "objects": ["sr", "image"]}]).start()
    study = t1.study_instance_uid

    assert storescu(first, node.port).returncode == 0
    v1 = wait_state(node, t1.series_instance_uid, "delivered")
    assert v1["version"] == 1 and v1["instances"] == 103
    [old_sr] = wait_until(lambda: sr_in(pacs, study), timeout=30, what="first SR in Orthanc")
    assert len(pacs.find_instances({"StudyInstanceUID": study, "Modality": "OT"})) == 1

    # A late slice reopens the series: a new version, a new result, under new UIDs.
    assert storescu([late], node.port).returncode == 0
    v2 = wait_until(lambda: (r := row_of(node, t1.series_instance_uid)) and r["version"] == 2
                    and r["state"] == "delivered" and r, timeout=120, interval=0.5, what="version 2 delivered")
    assert v2["sr_sop_instance_uid"] != v1["sr_sop_instance_uid"]
    assert v2["image_sop_instance_uid"] != v1["image_sop_instance_uid"]
    srs = wait_until(lambda: len(found := sr_in(pacs, study)) == 2 and found, timeout=30, what="second SR")
    assert len(pacs.find_instances({"StudyInstanceUID": study, "Modality": "OT"})) == 2
    [new_sr] = [i for i in srs if i != old_sr]
    path = tmp_path / "new-sr.dcm"
    path.write_bytes(pacs.download(new_sr))
    errors, output = dciodvfy_errors(path)
    assert errors == [], output
    sr = hd.sr.srread(path)
    assert sr.SOPInstanceUID == v2["sr_sop_instance_uid"]
    (predecessor,) = sr.PredecessorDocumentsSequence
    (series_ref,) = predecessor.ReferencedSeriesSequence
    assert predecessor.StudyInstanceUID == study
    assert [r.ReferencedSOPInstanceUID for r in series_ref.ReferencedSOPSequence] == [v1["sr_sop_instance_uid"]]

    # Resend, and a replay of unchanged input with the same model: the same UIDs, nothing new in PACS.
    assert node.cli("resend", t1.series_instance_uid).returncode == 0
    assert node.cli("replay", t1.series_instance_uid).returncode == 0
    v3 = wait_until(lambda: (r := row_of(node, t1.series_instance_uid)) and r["version"] == 3
                    and r["state"] == "delivered" and r, timeout=120, interval=0.5, what="replay delivered")
    assert v3["sr_sop_instance_uid"] == v2["sr_sop_instance_uid"]
    assert len(sr_in(pacs, study)) == 2
    assert len(pacs.find_instances({"StudyInstanceUID": study, "Modality": "OT"})) == 2

    shown = json.loads(node.cli("show", t1.series_instance_uid, "--json").stdout)
    sent = [(o["version"], o["kind"], o["sop_instance_uid"], o["destination"]) for o in shown["sent_objects"]]
    assert (1, "sr", v1["sr_sop_instance_uid"], "pacs") in sent
    assert (2, "sr", v2["sr_sop_instance_uid"], "pacs") in sent
    assert (2, "image", v2["image_sop_instance_uid"], "pacs") in sent
    assert all(o["sent_at"] for o in shown["sent_objects"])
    [v2_sr] = [o for o in shown["jobs"][1]["objects"] if o["kind"] == "sr"]
    assert v2_sr["predecessor_sop_instance_uid"] == v1["sr_sop_instance_uid"]
    text = node.cli("show", t1.series_instance_uid).stdout
    assert f"replaces {v1['sr_sop_instance_uid']}" in text and "-> pacs" in text
