"""The fast header scan must agree with pydicom on every file it accepts."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import pydicom.config
import pydicom.data
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import node.header as header_module
from model.synth import write_series
from node.header import HeaderError, _scan, header_from_dataset, read_header


def _encoded(ds: pydicom.Dataset) -> tuple[bytes, str]:
    """The dataset as a C-STORE carries it: the Part 10 file without preamble and file meta."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:], str(ds.file_meta.TransferSyntaxUID)


def _files() -> list[Path]:
    out = []
    # pydicom's bundled files only (get_testdata_files would try to download more).
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "SOPInstanceUID" in ds and getattr(ds, "file_meta", None) and "TransferSyntaxUID" in ds.file_meta:
            out.append(Path(path))
    return out


def test_fast_scan_matches_pydicom_on_pydicom_test_files(monkeypatch):
    # Some bundled files carry deliberately invalid values (e.g. IS '1A'); compare, don't warn.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    compared = scanned = 0
    for path in _files():
        ds = pydicom.dcmread(path)
        try:
            encoded, ts = _encoded(ds)
        except Exception:
            continue
        expected = header_from_dataset(ds)
        assert read_header(encoded, ts) == expected, path.name
        compared += 1
        if ts not in (str(ImplicitVRLittleEndian),):
            try:
                _scan(encoded, ts != str(ExplicitVRBigEndian), False)
                scanned += 1
            except Exception:
                pass
    assert compared > 50 and scanned > 30  # the fast path really ran on most of them


def test_fast_scan_on_synthetic_classic_and_multiframe(tmp_path):
    classic = write_series(tmp_path / "c", slices=4, rows=8, columns=8, spacing=1.0)
    multi = write_series(tmp_path / "m", slices=4, rows=8, columns=8, spacing=1.0, enhanced=True)
    for path in (classic.paths[0], multi.paths[0]):
        ds = pydicom.dcmread(path)
        encoded, ts = _encoded(ds)
        assert _scan(encoded, True, False) == header_from_dataset(ds)
    assert _scan(_encoded(pydicom.dcmread(multi.paths[0]))[0], True, False).expected_instances == 1


def test_unsupported_input_falls_back_to_pydicom(tmp_path, monkeypatch):
    ds = pydicom.dcmread(write_series(tmp_path / "c", slices=2, rows=8, columns=8).paths[0])
    ds.SeriesDescription = "T1 3D Körper"  # non-ASCII: pydicom applies the character set
    ds.SpecificCharacterSet = "ISO_IR 100"
    encoded, ts = _encoded(ds)
    assert read_header(encoded, ts).series_description == "T1 3D Körper"
    implicit = pydicom.dcmread(write_series(tmp_path / "i", slices=2, rows=8, columns=8).paths[0])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    encoded, ts = _encoded(implicit)
    assert read_header(encoded, ts).sop_instance_uid == implicit.SOPInstanceUID


def test_garbage_never_yields_a_usable_uid():
    """Truncated input either fails to parse or parses without a SOP Instance UID (ingest refuses both)."""
    garbage = b"\x08\x00\x18\x00UI\xff\xff" + b"1" * 10
    try:
        assert read_header(garbage, str(ExplicitVRLittleEndian)).study_instance_uid is None
    except HeaderError:
        pass
    with pytest.raises(header_module._Unsupported):
        _scan(garbage, True, False)


# ---- parse failures are HeaderError, never another exception ------------------------------------


def _el(group: int, element: int, vr: bytes, value: bytes, implicit: bool = False) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    if implicit:
        return tag + len(value).to_bytes(4, "little") + value
    return tag + vr + len(value).to_bytes(2, "little") + value


def nested_sequences_dataset(depth: int, sop_instance_uid: str = "1.2.3.4.5", implicit: bool = False) -> bytes:
    """`depth` undefined-length Referenced Image Sequences, each in an undefined-length item."""
    vr = b"" if implicit else b"SQ\x00\x00"
    sq_open = b"\x08\x00\x40\x11" + vr + b"\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    sq_close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (
        _el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4", implicit)
        + _el(0x0008, 0x0018, b"UI", sop_instance_uid.encode(), implicit)
        + _el(0x0008, 0x0060, b"CS", b"MR", implicit)
        + sq_open * depth
        + sq_close * depth
        + _el(0x0020, 0x000D, b"UI", b"1.2.3.4", implicit)
        + _el(0x0020, 0x000E, b"UI", b"1.2.3.4.1", implicit)
    )


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_deeply_nested_sequences_are_a_header_error(ts):
    encoded = nested_sequences_dataset(2000, implicit=ts == ImplicitVRLittleEndian)
    with pytest.raises(HeaderError, match="nested"):
        read_header(encoded, ts)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_moderately_nested_sequences_still_parse(ts):
    header = read_header(nested_sequences_dataset(20, implicit=ts == ImplicitVRLittleEndian), ts)
    assert header.sop_instance_uid == "1.2.3.4.5" and header.series_instance_uid == "1.2.3.4.1"


def test_any_fast_path_surprise_falls_back_to_pydicom(monkeypatch):
    def boom(*args, **kwargs):  # noqa: ANN002, ANN003
        raise IndexError("scanner bug")

    monkeypatch.setattr(header_module, "_scan", boom)
    assert read_header(nested_sequences_dataset(3), ExplicitVRLittleEndian).series_instance_uid == "1.2.3.4.1"
