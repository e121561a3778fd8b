"""The SCP in-process, driven by a pynetdicom SCU on 127.0.0.1: bad input, resends, codecs."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom import _config as pynetdicom_config

from node.errors import StoreStatus
from node.service import NodeService  # noqa: F401  (type of the fixture's nodes)
from tests.peers import free_port, wait_until


@pytest.fixture
def service(in_process_node):
    return lambda **storage: in_process_node(storage=storage)


def send(port: int, *datasets_or_paths, transfer_syntax=None) -> list[int]:
    ae = AE(ae_title="SCANNER")
    for cx in StoragePresentationContexts:
        ae.add_requested_context(cx.abstract_syntax, [transfer_syntax] if transfer_syntax else None)
    assoc = ae.associate("127.0.0.1", port, ae_title="MIGNODE")
    assert assoc.is_established
    # Files are sent as they are on disk (no decode), so malformed ones reach the node.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return [assoc.send_c_store(item).Status for item in datasets_or_paths]
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


def slice_dataset(series_dir: Path, index: int = 0) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(series_dir.iterdir())[index])


def spool_files(svc: NodeService) -> list[Path]:
    return sorted(p for p in svc.spool.root.rglob("*") if p.is_file())


def test_missing_sop_instance_uid_fails_and_next_association_succeeds(service, small_series, tmp_path):
    series_dir, series = small_series
    svc = service()
    ds = slice_dataset(series_dir)
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    bad = tmp_path / "no-sop-uid.dcm"
    ds.file_meta.MediaStorageSOPInstanceUID = uid  # the request carries it; the dataset does not
    ds.save_as(bad, enforce_file_format=False)

    assert send(svc.port, bad) == [StoreStatus.MISSING_OR_INVALID_UID]
    assert spool_files(svc) == []
    assert send(svc.port, slice_dataset(series_dir)) == [StoreStatus.SUCCESS]
    assert svc.store.count_instances() == 1


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_path_traversal_uid_never_names_a_file(service, small_series, tmp_path, keyword):
    series_dir, _ = small_series
    svc = service()
    ds = slice_dataset(series_dir)
    setattr(ds, keyword, "1.2.3/../../etc")
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../etc"
    path = tmp_path / "evil.dcm"
    ds.save_as(path, enforce_file_format=False)

    [status] = send(svc.port, path)
    assert status == StoreStatus.MISSING_OR_INVALID_UID
    data_dir = svc.settings.storage.data_dir
    assert not any("etc" in p.name for p in data_dir.parent.rglob("*") if p.is_file() and p.suffix in ("", ".dcm", ".tmp"))
    assert spool_files(svc) == []
    assert svc.store.count_instances() == 0


def test_free_disk_floor_answers_out_of_resources(service, small_series):
    series_dir, _ = small_series
    svc = service(min_free_disk_mb=10**9)  # a petabyte: never available
    assert send(svc.port, slice_dataset(series_dir)) == [StoreStatus.OUT_OF_RESOURCES]
    assert spool_files(svc) == []


def test_deflate_and_rle_are_stored_byte_for_byte_readable(service, small_series):
    series_dir, _ = small_series
    svc = service()
    deflated = slice_dataset(series_dir, 1)
    assert send(svc.port, deflated, transfer_syntax=DeflatedExplicitVRLittleEndian) == [StoreStatus.SUCCESS]
    rle = slice_dataset(series_dir, 2)
    rle.compress(RLELossless, generate_instance_uid=False)
    assert send(svc.port, rle, transfer_syntax=RLELossless) == [StoreStatus.SUCCESS]

    for original, ts in ((slice_dataset(series_dir, 1), DeflatedExplicitVRLittleEndian), (slice_dataset(series_dir, 2), RLELossless)):
        stored = pydicom.dcmread(svc.spool.root / original.StudyInstanceUID / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm")
        assert stored.file_meta.TransferSyntaxUID == ts
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == "SCANNER"
        assert (stored.pixel_array == original.pixel_array).all()


def test_late_or_changed_instance_reopens_a_completed_series_as_new_version(service, small_series):
    series_dir, series = small_series
    svc = service()
    datasets = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    assert set(send(svc.port, *datasets[:-1])) == {StoreStatus.SUCCESS}
    wait_until(lambda: svc.store.get_series(series.series_instance_uid).state == "skipped", timeout=20)

    # The identical instance again changes nothing.
    assert send(svc.port, datasets[0]) == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.state, view.version, view.instances) == ("skipped", 1, 47)

    # A new instance reopens it; with all 48 of Images in Acquisition and the
    # sender released, it completes at once as version 2 with its own job.
    assert send(svc.port, datasets[-1]) == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (2, 48)
    # The node completes it when it handles the release, which may be just after our release() returns.
    view = wait_until(
        lambda: (v := svc.store.get_series(series.series_instance_uid)) and v.state != "receiving" and v, timeout=20
    )
    assert "expected instance count reached (48/48)" in view.reason
    wait_until(lambda: svc.store.get_series(series.series_instance_uid).state == "skipped", timeout=20)

    # Same UID, different bytes: the file is replaced, counted once, version 3.
    changed = copy.deepcopy(datasets[0])
    changed.ImageComments = "corrected"
    assert send(svc.port, changed) == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (3, 48)
    stored = pydicom.dcmread(svc.spool.root / changed.StudyInstanceUID / changed.SeriesInstanceUID / f"{changed.SOPInstanceUID}.dcm")
    assert stored.ImageComments == "corrected"
    wait_until(lambda: svc.store.get_series(series.series_instance_uid).state == "skipped", timeout=20)
    jobs = svc.store.get_series(series.series_instance_uid).jobs
    assert [(j["version"], j["instances"]) for j in jobs] == [(1, 47), (2, 48), (3, 48)]


def test_sop_instance_in_another_series_is_refused(service, small_series):
    series_dir, _ = small_series
    svc = service()
    ds = slice_dataset(series_dir)
    assert send(svc.port, ds) == [StoreStatus.SUCCESS]
    moved = copy.deepcopy(ds)
    moved.SeriesInstanceUID = generate_uid()
    assert send(svc.port, moved) == [StoreStatus.UID_MISMATCH]
    assert len(spool_files(svc)) == 1


def test_unparseable_dataset_is_refused_and_node_keeps_serving(service, small_series, tmp_path):
    series_dir, _ = small_series
    svc = service()
    ds = slice_dataset(series_dir)
    good = tmp_path / "good.dcm"
    ds.save_as(good)
    raw = bytearray(good.read_bytes())
    # Corrupt the length of the first element after the file meta.
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    raw[meta_end + 6 : meta_end + 8] = b"\xff\xff"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(raw))
    [status] = send(svc.port, bad)
    assert status in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.MISSING_OR_INVALID_UID)
    assert send(svc.port, ds) == [StoreStatus.SUCCESS]
