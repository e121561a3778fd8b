"""Read the few header attributes ingest needs from an encoded dataset.

Pure: bytes in, `InstanceHeader` out. Parsing stops before (0028,0009), so
pixel data is never decoded and pydicom converts only the elements we touch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, UID

# Multi-frame SOP classes whose single object carries a whole series.
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MULTIFRAME_SERIES_SOP_CLASSES = frozenset({ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE})

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


def read_header(encoded: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the header of a dataset encoded in `transfer_syntax_uid` (no file meta)."""
    ts = UID(transfer_syntax_uid)
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            encoded = zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded)
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset does not inflate: {exc}") from None
    implicit = ts == ImplicitVRLittleEndian
    little = ts != ExplicitVRBigEndian
    try:
        ds = read_dataset(
            BytesIO(encoded),
            is_implicit_VR=implicit,
            is_little_endian=little,
            stop_when=lambda tag, vr, length: tag > _STOP_AFTER,
        )
        return header_from_dataset(ds)
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise HeaderError(f"cannot parse dataset header: {type(exc).__name__}: {exc}") from None
