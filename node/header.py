"""Read the few header attributes ingest needs from an encoded dataset.

Pure: bytes in, `InstanceHeader` out. Parsing stops before (0028,0009), so
pixel data is never decoded and pydicom converts only the elements we touch.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, UID


from storage.spool import SpoolKey
from storage.store import InstanceRecord
# Multi-frame SOP classes whose single object carries a whole series (shared with model/volume.py).
from model.sop_classes import (
    ENHANCED_MR_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    MULTIFRAME_SERIES_SOP_CLASSES,
)

_STOP_AFTER = 0x00280008  # Number of Frames


class HeaderError(ValueError):
    """The dataset header cannot be parsed."""


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    modality: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    images_in_acquisition: int | None
    number_of_frames: int

    @property
    def expected_instances(self) -> int | None:
        """Instances that make up the whole series, if the header says."""
        if self.sop_class_uid in MULTIFRAME_SERIES_SOP_CLASSES or self.number_of_frames > 1:
            return 1
        return self.images_in_acquisition


def instance_record(
    header: InstanceHeader,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    size_bytes: int,
    calling_ae_title: str | None,
) -> InstanceRecord:
    """What storage records for one spooled instance; the path comes from the
    validated UIDs (SpoolKey raises SpoolError for any that is not a UID)."""
    key = SpoolKey(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    return InstanceRecord(
        study_instance_uid=key.study_instance_uid,
        series_instance_uid=key.series_instance_uid,
        sop_instance_uid=key.sop_instance_uid,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        path=key.relative_path,
        size_bytes=size_bytes,
        modality=header.modality,
        series_description=header.series_description,
        series_number=header.series_number,
        instance_number=header.instance_number,
        number_of_frames=header.number_of_frames,
        expected_instances=header.expected_instances,
        calling_ae_title=calling_ae_title,
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        series_description=(_text(ds, "SeriesDescription") or None),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
    )


# Top-level elements ingest reads, by tag: (keyword, kind).
_WANTED = {
    0x00080016: ("sop_class_uid", "text"),
    0x00080018: ("sop_instance_uid", "text"),
    0x00080060: ("modality", "text"),
    0x0008103E: ("series_description", "text"),
    0x0020000D: ("study_instance_uid", "text"),
    0x0020000E: ("series_instance_uid", "text"),
    0x00200011: ("series_number", "int"),
    0x00200013: ("instance_number", "int"),
    0x00201002: ("images_in_acquisition", "int"),
    0x00280008: ("number_of_frames", "int"),
}
# Their VRs in the dictionary: the fast scan reads the value as text only when the element has that VR.
_WANTED_VR = {tag: b"UI" for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)} | {
    0x00080060: b"CS", 0x0008103E: b"LO", 0x00200011: b"IS", 0x00200013: b"IS", 0x00201002: b"IS", 0x00280008: b"IS"}
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Undefined-length sequences nest this deep at most (real objects: under 10). Deeper is refused
# as unparseable rather than walked: unbounded recursion is a crash, not a parse failure.
MAX_SEQUENCE_DEPTH = 64


class _Unsupported(Exception):
    """The fast scanner met something it does not handle; pydicom takes over."""


_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
# A deflated data set is inflated whole (header, then the completeness check); one that inflates to more
# than this many times its size, beyond the floor, is refused as a decompression bomb.
MAX_INFLATE_RATIO = 32
INFLATE_FLOOR_BYTES = 16 * 1024 * 1024


def _check_complete(buf: bytes, pos: int, little: bool, implicit: bool) -> None:
    """Walk the elements from `pos` to the end without decoding them (issue 11). A value or item that
    runs past the end of the bytes (a data set cut inside its pixel data, a length declared far beyond
    what was sent) is a HeaderError: acknowledging it would store an instance nobody can read. What
    the walk cannot follow (an explicit-VR element with an unknown VR) is left as pydicom read it."""
    try:
        _elements_end(buf, pos, little, implicit, 0, None)
    except _Unsupported:
        return
    except struct.error:
        raise HeaderError("truncated: the data set ends inside an element header") from None


def _elements_end(buf: bytes, pos: int, little: bool, implicit: bool, depth: int, delimiter: int | None) -> int:
    """Position after the elements from `pos` up to `delimiter` (an item's end), or to the end of `buf`."""
    order = "<" if little else ">"
    while True:
        if delimiter is None and (pos == len(buf) or (len(buf) - pos < 8 and not buf[pos:].strip(b"\x00"))):
            return len(buf)  # the end, or a few bytes of zero padding after the last element
        if len(buf) - pos < 8:
            raise struct.error("ends inside an element header")
        group, element = struct.unpack_from(order + "HH", buf, pos)
        if (group << 16 | element) == delimiter:
            return pos + 8
        vr = None if implicit or group == 0xFFFE else buf[pos + 4 : pos + 6]
        if vr is None:
            (length,), start = struct.unpack_from(order + "I", buf, pos + 4), pos + 8
        elif vr in _LONG_VRS:
            (length,), start = struct.unpack_from(order + "I", buf, pos + 8), pos + 12
        elif vr in _SHORT_VRS:
            (length,), start = struct.unpack_from(order + "H", buf, pos + 6), pos + 8
        else:
            raise _Unsupported("unknown VR")
        if length == _UNDEFINED:  # a sequence, encapsulated pixel data, or UN holding implicit VR items
            pos = _items_end(buf, start, little, implicit or vr == b"UN", depth + 1)
        elif start + length > len(buf):
            raise HeaderError(f"truncated: ({group:04X},{element:04X}) declares {length} bytes, "
                              f"{len(buf) - start} remain")
        else:
            pos = start + length


def _items_end(buf: bytes, pos: int, little: bool, implicit: bool, depth: int) -> int:
    """Position after the sequence delimiter of the undefined-length value starting at `pos`."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    while True:
        group, element, length = struct.unpack_from("<HHI" if little else ">HHI", buf, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported(f"unexpected tag {tag:08X} in a sequence")
        if length == _UNDEFINED:
            pos = _elements_end(buf, pos, little, implicit, depth, _ITEM_END)
        elif pos + length > len(buf):
            raise HeaderError(f"truncated: an item declares {length} bytes, {len(buf) - pos} remain")
        else:
            pos += length


def _skip_undefined(buf: bytes, pos: int, little: bool, depth: int = 1) -> int:
    """Position after the sequence delimiter of an undefined-length sequence at `pos`."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    order = "<" if little else ">"
    while True:
        group, element, length = struct.unpack_from(order + "HHI", buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported(f"unexpected tag {tag:08X} in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(buf, pos, little, depth)


def _skip_item(buf: bytes, pos: int, little: bool, depth: int) -> int:
    """Walk an undefined-length item (explicit VR: _scan refuses implicit) up to its delimiter."""
    while True:
        group, element = struct.unpack_from("<HH" if little else ">HH", buf, pos)
        if (group << 16 | element) == _ITEM_END:
            return pos + 8
        pos = _next_element(buf, pos, little, False, depth)[3]


def _next_element(
    buf: bytes, pos: int, little: bool, implicit: bool, depth: int = 0
) -> tuple[int, int, int, int]:
    """(tag, value start, value length, position after the element) of the element at `pos`."""
    order = "<" if little else ">"
    group, element = struct.unpack_from(order + "HH", buf, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from(order + "I", buf, pos + 4)
        start = pos + 8
    else:
        vr = buf[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from(order + "I", buf, pos + 8)
            start = pos + 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack_from(order + "H", buf, pos + 6)
            start = pos + 8
        else:  # pydicom reads an unknown VR its own way (as implicit VR): it decides, so both agree
            raise _Unsupported(f"unknown VR {vr!r}")
    if length == _UNDEFINED:
        return tag, start, 0, _skip_undefined(buf, start, little, depth + 1)
    end = start + length
    if end > len(buf):
        raise _Unsupported("element runs past the end of the dataset")
    return tag, start, length, end


def _scan(buf: bytes, little: bool, implicit: bool) -> InstanceHeader:
    """Walk top-level elements up to Number of Frames, decoding only the wanted ones."""
    if implicit:
        raise _Unsupported("implicit VR: nested undefined lengths need the data dictionary")
    found: dict[str, object] = {}
    pos = 0
    while pos < len(buf):
        element_at = pos
        tag, start, length, pos = _next_element(buf, pos, little, implicit)
        if tag > _STOP_AFTER:
            _check_complete(buf, pos, little, implicit)  # the rest is not decoded, only walked
            break
        wanted = _WANTED.get(tag)
        if wanted is None:
            continue
        if buf[element_at + 4 : element_at + 6] != _WANTED_VR[tag]:
            raise _Unsupported("a wanted element with another VR: pydicom reads it as that VR")
        raw = buf[start : start + length].rstrip(b"\x00 ").lstrip(b" ")
        name, kind = wanted
        if kind == "int":
            try:
                found[name] = int(raw.split(b"\\")[0]) if raw else None
            except ValueError:
                found[name] = None
        else:
            try:
                found[name] = raw.decode("ascii") or None
            except UnicodeDecodeError:
                raise _Unsupported("non-ASCII text: let pydicom apply the character set") from None
    return InstanceHeader(
        sop_class_uid=found.get("sop_class_uid"),
        sop_instance_uid=found.get("sop_instance_uid"),
        study_instance_uid=found.get("study_instance_uid"),
        series_instance_uid=found.get("series_instance_uid"),
        modality=found.get("modality"),
        series_description=found.get("series_description"),
        series_number=found.get("series_number"),
        instance_number=found.get("instance_number"),
        images_in_acquisition=found.get("images_in_acquisition"),
        number_of_frames=found.get("number_of_frames") or 1,
    )


def read_header(encoded: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the header of a dataset encoded in `transfer_syntax_uid` (no file meta).

    A struct-based scan of the top-level elements handles the common case
    (explicit VR, ASCII text) in a fraction of pydicom's time on the C-STORE
    hot path; anything else goes through pydicom. Every parse failure, of
    either path, is a HeaderError (the SCP answers 0xC210).
    """
    ts = UID(transfer_syntax_uid)
    if ts == DeflatedExplicitVRLittleEndian:
        limit = max(INFLATE_FLOOR_BYTES, MAX_INFLATE_RATIO * len(encoded))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            encoded = inflater.decompress(encoded, limit)  # bounded: a deflate bomb costs no more
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset does not inflate: {exc}") from None
        if not inflater.eof:
            raise HeaderError(f"deflated data set truncated or inflating beyond {limit} bytes")
    implicit = ts == ImplicitVRLittleEndian
    little = ts != ExplicitVRBigEndian
    try:
        return _scan(encoded, little, implicit)
    except HeaderError:
        raise
    except (_Unsupported, struct.error):
        pass
    except Exception:  # noqa: S110  any other surprise of the fast path: pydicom decides
        pass
    try:
        ds = read_dataset(
            BytesIO(encoded),
            is_implicit_VR=implicit,
            is_little_endian=little,
            stop_when=lambda tag, vr, length: tag > _STOP_AFTER,
        )
        header = header_from_dataset(ds)
    except RecursionError:
        raise HeaderError("cannot parse dataset header: sequences nested too deeply") from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise HeaderError(f"cannot parse dataset header: {type(exc).__name__}: {exc}") from None
    _check_complete(encoded, 0, little, implicit)
    return header
