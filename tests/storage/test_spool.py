from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from storage.spool import Spool, SpoolError, SpoolKey, encode_file_meta
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
