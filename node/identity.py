"""Result identity: which UIDs a result (SR, result image) gets, from what decides its content.

A PACS that does not overwrite (Orthanc's default) keeps the first object it
received under a SOP Instance UID and still answers success to a second. So a
result whose content changes must get a new UID, and a result whose content
does not change must keep its UID (a resend or an identical replay adds
nothing to PACS). The content of a result is decided by:

- the source instances: their SOP Instance UIDs, pixel data and the header
  values the result depends on or copies (geometry, rescale, patient and
  study identification): a corrected instance keeps its UID but changes one
  of these;
- the model: the checkpoint's sha256;
- the cutoff that turns the probability into a label.

Series Instance UIDs stay stable per source series and model, so successive
results for one series line up in one result series in the viewer.
Everything here is pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement


def derive_uid(*parts: str) -> str:
    """UUID-derived UID (PS3.5 B.2) from a hash, so the same inputs always give the same UID."""
    digest = hashlib.sha256("|".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


# Header values that change the result (geometry, intensity scaling) or what it copies (patient, study).
CONTENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber",
    "StudyDate", "StudyTime", "StudyID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "Rows", "Columns",
    "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)


_CONTENT_TAGS = tuple((keyword, tag_for_keyword(keyword)) for keyword in CONTENT_KEYWORDS)
_SPECIFIC_CHARACTER_SET = tag_for_keyword("SpecificCharacterSet")


def instance_content(ds, reprs: dict | None = None) -> bytes:  # noqa: ANN001  pydicom.Dataset
    """What of one source instance decides a result: its pixel data and CONTENT_KEYWORDS' values.

    `reprs`, one dict shared by the instances of a series, remembers each value's text by the
    element's raw bytes: a classic series repeats all but its position on every slice, and
    converting the same bytes 170 times was most of this function's cost. The text, and so the
    result's UIDs, are the same with or without it.
    """
    charset = None
    if reprs is not None and _SPECIFIC_CHARACTER_SET in ds:
        element = ds.get_item(_SPECIFIC_CHARACTER_SET)
        charset = element.value if isinstance(element, RawDataElement) else repr(element.value)
    parts = []
    for keyword, tag in _CONTENT_TAGS:
        element = ds.get_item(tag) if reprs is not None and tag in ds else None
        if not isinstance(element, RawDataElement) or element.VR == "SQ" or element.value is None:
            parts.append(f"{keyword}={ds.get(keyword)!r}")
            continue
        key = (tag, element.VR, element.is_implicit_VR, element.is_little_endian, charset, element.value)
        text = reprs.get(key)
        if text is None:
            text = reprs[key] = repr(ds.get(keyword))
        parts.append(f"{keyword}={text}")
    header = "|".join(parts).encode("utf-8", "replace")
    return hashlib.sha256(header).digest() + (ds.get("PixelData") or b"")


def source_digest(sources: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (SOP Instance UID, content) pairs, in UID order, so arrival order does not matter.

    `content` is `instance_content(ds)` in the worker; tests may pass any bytes.
    """
    digest = hashlib.sha256()
    for sop_instance_uid, pixel_data in sorted(sources, key=lambda item: item[0]):
        digest.update(sop_instance_uid.encode("ascii"))
        digest.update(b"\0")
        digest.update(hashlib.sha256(pixel_data).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class ResultIdentity:
    """The UIDs of one result's objects; `content_key` names what decided their content."""

    content_key: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str
    image_series_instance_uid: str
    image_sop_instance_uid: str


def result_identity(series_instance_uid: str, source_digest_hex: str, model_sha256: str, cutoff: float) -> ResultIdentity:
    """UIDs for the result of `model` at `cutoff` on the sources summarised by `source_digest_hex`."""
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"cutoff must be within 0..1, got {cutoff}")
    content_key = hashlib.sha256(
        "|".join((series_instance_uid, source_digest_hex, model_sha256, repr(float(cutoff)))).encode("utf-8")
    ).hexdigest()
    return ResultIdentity(
        content_key=content_key,
        sr_series_instance_uid=derive_uid("sr-series", series_instance_uid, model_sha256),
        sr_sop_instance_uid=derive_uid("sr-instance", content_key),
        image_series_instance_uid=derive_uid("image-series", series_instance_uid, model_sha256),
        image_sop_instance_uid=derive_uid("image-instance", content_key),
    )
