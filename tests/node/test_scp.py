"""The SCP in-process, driven by a pynetdicom SCU on 127.0.0.1: bad input, resends, codecs."""

from __future__ import annotations

import subprocess
import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

from node.errors import StoreStatus
from node.service import NodeService  # noqa: F401  (type of the fixture's nodes)
from tests.peers import scu_store, wait_until


@pytest.fixture
def service(in_process_node):
    return lambda **storage: in_process_node(storage=storage)


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

    assert scu_store(svc.port, bad) == [StoreStatus.MISSING_OR_INVALID_UID]
    assert spool_files(svc) == []
    assert scu_store(svc.port, slice_dataset(series_dir)) == [StoreStatus.SUCCESS]
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

    [status] = scu_store(svc.port, path)
    assert status == StoreStatus.MISSING_OR_INVALID_UID
    data_dir = svc.settings.storage.data_dir
    assert not any("etc" in p.name for p in data_dir.parent.rglob("*") if p.is_file() and p.suffix in ("", ".dcm", ".tmp"))
    assert spool_files(svc) == []
    assert svc.store.count_instances() == 0


def test_free_disk_floor_answers_out_of_resources(service, small_series):
    series_dir, _ = small_series
    svc = service(min_free_disk_mb=10**9)  # a petabyte: never available
    assert scu_store(svc.port, slice_dataset(series_dir)) == [StoreStatus.OUT_OF_RESOURCES]
    assert spool_files(svc) == []


def test_deflate_and_rle_are_stored_byte_for_byte_readable(service, small_series):
    series_dir, _ = small_series
    svc = service()
    deflated = slice_dataset(series_dir, 1)
    assert scu_store(svc.port, deflated, transfer_syntax=DeflatedExplicitVRLittleEndian) == [StoreStatus.SUCCESS]
    rle = slice_dataset(series_dir, 2)
    rle.compress(RLELossless, generate_instance_uid=False)
    assert scu_store(svc.port, rle, transfer_syntax=RLELossless) == [StoreStatus.SUCCESS]

    for original, ts in ((slice_dataset(series_dir, 1), DeflatedExplicitVRLittleEndian), (slice_dataset(series_dir, 2), RLELossless)):
        stored = pydicom.dcmread(svc.spool.root / original.StudyInstanceUID / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm")
        assert stored.file_meta.TransferSyntaxUID == ts
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == "SCANNER"
        assert (stored.pixel_array == original.pixel_array).all()


def test_late_or_changed_instance_reopens_a_completed_series_as_new_version(in_process_node, small_series):
    series_dir, series = small_series
    svc = in_process_node(series={"idle_seconds": 1, "max_wait_seconds": 3})
    datasets = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    assert set(scu_store(svc.port, *datasets[:-1])) == {StoreStatus.SUCCESS}
    # 47 of the announced 48: not classified at the idle timer, `incomplete` at max wait.
    view = wait_until(lambda: (v := svc.store.get_series(series.series_instance_uid)).state == "incomplete" and v,
                      timeout=20)
    assert "47 of 48 expected instances" in view.reason

    # The identical instance again changes nothing.
    assert scu_store(svc.port, datasets[0]) == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.state, view.version, view.instances) == ("incomplete", 1, 47)

    # A new instance reopens it; with all 48 of Images in Acquisition and the
    # sender released, it completes at once as version 2 with its own job.
    assert scu_store(svc.port, datasets[-1]) == [StoreStatus.SUCCESS]
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
    assert scu_store(svc.port, changed) == [StoreStatus.SUCCESS]
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
    assert scu_store(svc.port, ds) == [StoreStatus.SUCCESS]
    moved = copy.deepcopy(ds)
    moved.SeriesInstanceUID = generate_uid()
    assert scu_store(svc.port, moved) == [StoreStatus.UID_MISMATCH]
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
    [status] = scu_store(svc.port, bad)
    assert status in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.MISSING_OR_INVALID_UID)
    assert scu_store(svc.port, ds) == [StoreStatus.SUCCESS]


def _completed(svc: NodeService, series_uid: str):  # noqa: ANN202
    return wait_until(lambda: (v := svc.store.get_series(series_uid)) and v.state not in ("receiving",) and v,
                      timeout=20, what="series completed")


def test_same_instance_from_another_ae_is_a_duplicate(service, small_series):
    """`replay --from-pacs` resends what the scanner sent; only the file meta (Source AE) differs."""
    series_dir, series = small_series
    svc = service()
    files = sorted(series_dir.iterdir())
    assert set(scu_store(svc.port, *files, calling="SCANNER")) == {StoreStatus.SUCCESS}
    _completed(svc, series.series_instance_uid)
    stored = next(svc.spool.root.rglob(f"{pydicom.dcmread(files[0]).SOPInstanceUID}.dcm"))
    before = stored.read_bytes()

    assert scu_store(svc.port, *files, calling="PACS") == [StoreStatus.SUCCESS] * len(files)
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (1, 48)
    assert view.state != "receiving"  # not reopened
    assert len(view.jobs) == 1
    assert svc.store.count_instances() == 48
    assert stored.read_bytes() == before  # kept as first received (Source AE SCANNER)
    assert pydicom.dcmread(stored).file_meta.SourceApplicationEntityTitle == "SCANNER"


def test_same_dataset_in_another_transfer_syntax_is_a_duplicate(service, small_series, tmp_path):
    series_dir, series = small_series
    svc = service()
    datasets = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    assert set(scu_store(svc.port, *datasets)) == {StoreStatus.SUCCESS}
    _completed(svc, series.series_instance_uid)

    # DCMTK's lossless JPEG (SV1) of the same file (it adds a Derivation Description), from another AE.
    import subprocess

    from pydicom.uid import JPEGLosslessSV1

    from tests.peers import DCMTK_ENV

    jpeg = tmp_path / "sv1.dcm"
    subprocess.run(["/usr/bin/dcmcjpeg", "+e1", "+un", str(sorted(series_dir.iterdir())[0]), str(jpeg)],
                   check=True, capture_output=True, env=DCMTK_ENV, timeout=60)
    assert pydicom.dcmread(jpeg).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    rle = copy.deepcopy(datasets[1])
    rle.compress(RLELossless, generate_instance_uid=False)
    assert scu_store(svc.port, jpeg, transfer_syntax=JPEGLosslessSV1, calling="PACS") == [StoreStatus.SUCCESS]
    assert scu_store(svc.port, rle, transfer_syntax=RLELossless, calling="PACS") == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (1, 48)
    assert len(svc.store.get_series(series.series_instance_uid).jobs) == 1

    # The same syntax change with one pixel changed is a new version, and replaces the file.
    changed = copy.deepcopy(datasets[2])
    pixels = changed.pixel_array.copy()
    pixels[10, 10] += 1
    changed.PixelData = pixels.tobytes()
    changed.compress(RLELossless, generate_instance_uid=False)
    assert scu_store(svc.port, changed, transfer_syntax=RLELossless, calling="PACS") == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (2, 48)
    stored = pydicom.dcmread(next(svc.spool.root.rglob(f"{changed.SOPInstanceUID}.dcm")))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert (stored.pixel_array == pixels).all()


def test_changed_pixel_in_the_same_syntax_replaces_and_reopens(service, small_series):
    series_dir, series = small_series
    svc = service()
    datasets = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    assert set(scu_store(svc.port, *datasets)) == {StoreStatus.SUCCESS}
    _completed(svc, series.series_instance_uid)
    changed = copy.deepcopy(datasets[0])
    pixels = changed.pixel_array.copy()
    pixels[0, 0] += 1
    changed.PixelData = pixels.tobytes()
    assert scu_store(svc.port, changed, calling="PACS") == [StoreStatus.SUCCESS]
    view = svc.store.get_series(series.series_instance_uid)
    assert (view.version, view.instances) == (2, 48)
    stored = pydicom.dcmread(next(svc.spool.root.rglob(f"{changed.SOPInstanceUID}.dcm")))
    assert (stored.pixel_array == pixels).all()


def test_allowed_networks_refuse_other_sources_before_the_request(in_process_node, caplog):
    """A connection from outside [node] allowed_networks is closed unanswered (logged with its
    address); one from inside is served. IPv4 only here: the tests run on 127.0.0.1."""
    import logging

    from tests.peers import ECHOSCU, DCMTK_ENV

    caplog.set_level(logging.WARNING, logger="node.scp")
    closed = in_process_node(node={"allowed_networks": ["10.1.0.0/16", "192.168.40.7"]})
    result = subprocess.run([ECHOSCU, "-aec", "MIGNODE", "127.0.0.1", str(closed.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "connection from 127.0.0.1 refused: address not in allowed_networks" in caplog.text
    opened = in_process_node(node={"allowed_networks": ["10.1.0.0/16", "127.0.0.0/8"]})
    result = subprocess.run([ECHOSCU, "-aec", "MIGNODE", "127.0.0.1", str(opened.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
