from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from storage.spool import Spool, SpoolError, SpoolKey, encode_file_meta, read_spooled, split_file_meta
from storage.uids import is_valid_uid


def test_file_meta_reads_back_with_pydicom():
    ds = pydicom.Dataset()
    ds.PatientName = "X"
    body = io.BytesIO()
    pydicom.dcmwrite(body, ds, implicit_vr=False, little_endian=True)  # no meta: dataset only
    raw = encode_file_meta(MRImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "SCANNER") + body.getvalue()
    back = pydicom.dcmread(io.BytesIO(raw))
    meta = back.file_meta
    assert meta.MediaStorageSOPClassUID == MRImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "SCANNER"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.FileMetaInformationGroupLength == len(raw) - 132 - 12 - len(body.getvalue())
    assert back.PatientName == "X"


@pytest.mark.parametrize(
    "uid",
    ["1.2.3/../../etc", "..", "", "1..2", ".1", "1.2.", "1.2.3\x00", "a.b", "1" * 65, "/1.2", "1.2 3"],
)
def test_unsafe_uids_are_refused(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(SpoolError):
        SpoolKey("1.2", "1.2.3", uid)


def test_write_is_complete_and_private(tmp_path):
    spool = Spool(tmp_path / "spool")
    key = SpoolKey("1.2", "1.2.3", "1.2.3.4")
    path = spool.write(key, (b"abc", b"def"))
    assert path == tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert path.read_bytes() == b"abcdef"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert spool.same_content(key, (b"abc", b"def"))
    assert not spool.same_content(key, (b"abc", b"deX"))
    assert list(spool.incoming.iterdir()) == []


def test_partial_files_are_removed(tmp_path):
    spool = Spool(tmp_path / "spool")
    staged = spool.stage("1.2.3.5", (b"partial",))
    assert staged.exists()
    assert spool.remove_partial_files() == 1
    assert not staged.exists()
    assert list(spool.iter_files()) == []


# ---- read_spooled: what dcmread reads, without pydicom's file-meta reader --------------------------

# How a file may arrive: as the synthetic writer (pydicom) wrote it, or re-encoded by DCMTK.
ENCODERS = {
    "explicit-vr": None,
    "implicit-vr": ("/usr/bin/dcmconv", "+ti"),
    "big-endian": ("/usr/bin/dcmconv", "+tb"),
    "deflated": ("/usr/bin/dcmconv", "+td"),
    "rle": ("/usr/bin/dcmcrle", "+un"),
}


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    from model.synth import write_series

    return write_series(tmp_path_factory.mktemp("read-spooled"), slices=2, rows=16, columns=16, seed=9).paths


def _assert_reads_like_dcmread(path, fast: bool) -> None:
    ours, reference = read_spooled(path), pydicom.dcmread(path)
    # The fast path builds a plain Dataset; dcmread (the fallback) a FileDataset.
    assert (type(ours) is pydicom.Dataset) is fast
    assert ours.file_meta == reference.file_meta
    assert ours == reference
    assert ours.original_encoding == reference.original_encoding
    np.testing.assert_array_equal(ours.pixel_array, reference.pixel_array)


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_read_spooled_reads_what_dcmread_reads(slices, tmp_path, encoding):
    for src in slices:
        dst = tmp_path / src.name
        if ENCODERS[encoding] is None:
            dst.write_bytes(src.read_bytes())
        else:
            subprocess.run([*ENCODERS[encoding], str(src), str(dst)], check=True, capture_output=True, timeout=60)
        _assert_reads_like_dcmread(dst, fast=encoding != "deflated")  # a deflated dataset is dcmread's


def test_read_spooled_reads_files_as_the_scp_spools_them(slices, tmp_path):
    data = slices[0].read_bytes()
    offset, syntax = split_file_meta(data)
    ds = pydicom.dcmread(slices[0], stop_before_pixels=True)
    spool = Spool(tmp_path / "spool")
    key = SpoolKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, syntax, "SCANNER")
    _assert_reads_like_dcmread(spool.write(key, (meta, data[offset:])), fast=True)


def test_read_spooled_leaves_other_file_meta_layouts_to_dcmread(slices, tmp_path):
    """Meta without its group length (allowed to readers, never written here): dcmread reads it."""
    data = slices[0].read_bytes()
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) File Meta Information Group Length
    odd = tmp_path / "no-group-length.dcm"
    odd.write_bytes(data[:132] + data[144:])  # the group length element is the first 12 bytes after DICM
    assert split_file_meta(odd.read_bytes()) is None
    _assert_reads_like_dcmread(odd, fast=False)
    with pytest.raises(FileNotFoundError):
        read_spooled(tmp_path / "missing.dcm")
