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


def instance_content(ds) -> bytes:  # noqa: ANN001  pydicom.Dataset
    """What of one source instance decides a result: its pixel data and CONTENT_KEYWORDS' values."""
    header = "|".join(f"{k}={ds.get(k)!r}" for k in CONTENT_KEYWORDS).encode("utf-8", "replace")
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
