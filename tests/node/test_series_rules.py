"""Series-level ingest rules over a real association: counts that never fill, private vendor
objects that travel with a series, and headers the scanner cannot parse."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from model.synth import write_classic_series
from tests.peers import scu_association, scu_echo, scu_store, scu_store_responses, wait_until


@pytest.fixture(scope="module")
def short_series(tmp_path_factory) -> tuple[list[Path], object]:
    out = tmp_path_factory.mktemp("t1-30")
    series = write_classic_series(out, slices=30, rows=32, columns=32, seed=3)
    return sorted(out.iterdir()), series


def state_of(svc, uid: str) -> str | None:
    view = svc.store.get_series(uid)
    return view.state if view else None


# ---- 1. a known count that never fills ----------------------------------------------------


def test_series_short_of_its_expected_count_ends_incomplete_then_completes_when_the_rest_arrives(
    in_process_node, short_series
):
    files, series = short_series
    assert pydicom.dcmread(files[0], stop_before_pixels=True).ImagesInAcquisition == 30
    svc = in_process_node(series={"idle_seconds": 1, "max_wait_seconds": 3})
    uid = series.series_instance_uid

    assert set(scu_store(svc.port, *files[:20])) == {0x0000}
    # Idle for longer than idle_seconds: a known count that is not reached keeps it receiving.
    time.sleep(1.8)
    view = svc.store.get_series(uid)
    assert view.state == "receiving", view.reason

    wait_until(lambda: state_of(svc, uid) == "incomplete", timeout=10, what="series incomplete at max wait")
    view = svc.store.get_series(uid)
    assert view.reason.startswith("20 of 30 expected instances after ")
    assert [(j["version"], j["state"]) for j in view.jobs] == [(1, "incomplete")]
    time.sleep(1)  # never selected: selection takes complete jobs only
    assert state_of(svc, uid) == "incomplete"
    assert svc.queue.awaiting_selection() == []

    # The rest arrives: a new version, complete on release, then selected (queued or skipped, not stuck).
    assert set(scu_store(svc.port, *files[20:])) == {0x0000}
    wait_until(lambda: state_of(svc, uid) in ("queued", "skipped"), timeout=15, what="version 2 selected")
    view = svc.store.get_series(uid)
    assert view.version == 2 and view.instances == 30
    assert "expected instance count reached (30/30)" in view.reason
    assert [(j["version"], j["state"]) for j in view.jobs][0] == (1, "incomplete")


# ---- 2. vendor-private objects travel with the series ---------------------------------------

PHILIPS_SERIES_DATA = "1.3.46.670589.11.0.0.12.2"


@pytest.fixture(scope="module")
def t1_120(tmp_path_factory) -> tuple[list[Path], object]:
    out = tmp_path_factory.mktemp("t1-120")
    series = write_classic_series(out, slices=120, rows=16, columns=16, seed=4)
    return sorted(out.iterdir()), series


def private_series_data(image: Path, sop_instance_uid: str = "1.0.1") -> pydicom.Dataset:
    """A minimal Philips Private MR Series Data object: same study and series, Rows/Columns, no pixels.

    Its SOP Instance UID sorts before the images' so that, were it not filtered, it would be
    the header selection reads first.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    src = pydicom.dcmread(image, stop_before_pixels=True)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = PHILIPS_SERIES_DATA
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = PHILIPS_SERIES_DATA
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = "MR"
    ds.StudyInstanceUID = src.StudyInstanceUID
    ds.SeriesInstanceUID = src.SeriesInstanceUID
    ds.SeriesDescription = src.SeriesDescription
    ds.ImagesInAcquisition = 999  # whatever it says, it is not the image count
    ds.Rows = src.Rows
    ds.Columns = src.Columns
    return ds


def test_private_series_data_is_kept_but_never_a_slice(in_process_node, t1_120, tmp_path):
    files, series = t1_120
    svc = in_process_node()
    uid = series.series_instance_uid
    private = tmp_path / "series-data.dcm"
    private_series_data(files[0]).save_as(private, enforce_file_format=True)

    statuses = scu_store(svc.port, private, *files, extra_contexts=[PHILIPS_SERIES_DATA])
    assert set(statuses) == {0x0000}

    wait_until(lambda: state_of(svc, uid) in ("queued", "skipped"), timeout=15, what="series selected")
    view = svc.store.get_series(uid)
    assert (view.instances, view.expected_instances) == (120, 120)
    assert view.state == "queued", view.reason
    assert view.reason.startswith("3D T1 'T1W_3D_TFE', 120 slices")
    assert "(120/120)" in view.reason
    assert svc.store.count_instances(uid) == 121  # kept in the spool and the instance table
    assert svc.store.count_instances(uid, private=False) == 120

    paths = svc.queue.instance_paths(uid)
    assert len(paths) == 120 and not any("1.0.1" in p.rsplit("/", 1)[-1] for p in paths)
    claimed = svc.queue.claim()
    assert claimed is not None and len(claimed.instance_paths) == 120
    assert set(claimed.instance_paths) == set(paths)

    # The same object again after completion reopens nothing.
    again = private_series_data(files[0], sop_instance_uid="1.0.2")
    again_path = tmp_path / "series-data-2.dcm"
    again.save_as(again_path, enforce_file_format=True)
    assert scu_store(svc.port, again_path, extra_contexts=[PHILIPS_SERIES_DATA]) == [0x0000]
    view = svc.store.get_series(uid)
    assert view.version == 1 and view.instances == 120


def test_private_classes_are_configurable(in_process_node, t1_120, tmp_path):
    files, _ = t1_120
    svc = in_process_node(node={"private_sop_classes": []})
    private = tmp_path / "series-data.dcm"
    private_series_data(files[0]).save_as(private, enforce_file_format=True)
    with scu_association(svc.port, contexts=[PHILIPS_SERIES_DATA, "1.2.840.10008.1.1"]) as assoc:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]


# ---- 4. parse failures and internal errors ------------------------------------------------


def raw_part10(path: Path, dataset: bytes, sop_class_uid: str, sop_instance_uid: str) -> Path:
    """A Part 10 file around already-encoded explicit VR little endian bytes (pydicom never parses them)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + dataset)
    return path


def test_deeply_nested_sequences_answer_cannot_understand_and_the_node_lives_on(in_process_node, tmp_path):
    from tests.node.test_header import nested_sequences_dataset

    svc = in_process_node()
    sop = "1.2.826.0.1.3680043.8.498.1"
    bad = raw_part10(tmp_path / "nested.dcm", nested_sequences_dataset(2000, sop_instance_uid=sop),
                     "1.2.840.10008.5.1.4.1.1.4", sop)
    [rsp] = scu_store_responses(svc.port, bad, contexts=["1.2.840.10008.5.1.4.1.1.4"])
    assert rsp.Status == 0xC210
    assert "nested" in rsp.ErrorComment
    assert svc.store.count_instances() == 0
    assert scu_echo(svc.port) == 0x0000


def test_an_internal_error_answers_processing_failure_not_out_of_resources(in_process_node, short_series, monkeypatch):
    files, _ = short_series
    svc = in_process_node()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("a bug")

    monkeypatch.setattr(svc.ingest, "receive", broken)
    [rsp] = scu_store_responses(svc.port, pydicom.dcmread(files[0]), contexts=["1.2.840.10008.5.1.4.1.1.4"],
                                chunked=False)
    assert rsp.Status == 0x0110
    assert rsp.ErrorComment
    assert scu_echo(svc.port) == 0x0000
