"""The prediction as a DICOM Comprehensive SR that PACS files beside the study and a radiologist reads.

Content follows TID 1500 "Measurement Report" (the form IHE AI Results expects):
TID 1204 language, TID 1001 observation context with a device observer (TID
1004), the TID 1600 Image Library, and one TID 1501 measurement group holding
the coded prediction, its probability and threshold (TID 300), the algorithm
(TID 4019) and the statements a reader must see.

Laid out so that OHIF v3 draws it (tests/node/test_viewer.py proves it in a
browser; docs/conformance.md explains the choice): OHIF sends a TID 1500 report
to its measurement viewport, which draws a group only when a NUM of it is
INFERRED FROM a SCOORD on an image, and labels it with the group's Comment
TEXT items and its NUM items (value and the unit's code value; at most five
lines). So the probability NUM is INFERRED FROM a point at the centre of the
head on the centre image (the region the network looked at), the probability
is in percent, and the prediction, research-use and synthetic statements are
Comments. Every container is SEPARATE so text renderers (dsr2html, OHIF's
text view) show each item with its concept name.

Everything here is pure: datasets and values in, a dataset out. UIDs come
from node/identity.py. Messages never carry patient identifiers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from model.checkpoint import ModelInfo
from model.predict import Prediction
from node import __version__
from node.identity import ResultIdentity, derive_uid

SR_SERIES_DESCRIPTION = "AI: NSAID response prediction"
SR_SERIES_NUMBER = 9901
MANUFACTURER = "migraine-node"
CODING_SCHEME = "99MIGRNODE"
CODING_SCHEME_NAME = "migraine-node private codes"
CODING_SCHEME_RESPONSIBLE_ORGANIZATION = "migraine-node project (research software)"

RESEARCH_USE_TEXT = "Research use only, not for diagnostic use."
SYNTHETIC_TEXT = "SYNTHETIC DEMO MODEL: no clinical meaning."
LABEL_TEXTS = {"responder": "NSAID responder", "non-responder": "NSAID non-responder"}

PREDICTED_RESPONSE = Code("P001", CODING_SCHEME, "Predicted NSAID response")
DECISION_THRESHOLD = Code("P002", CODING_SCHEME, "Decision threshold")
RESPONDER = Code("R", CODING_SCHEME, "NSAID responder")
NON_RESPONDER = Code("N", CODING_SCHEME, "NSAID non-responder")
LABEL_CODES = {"responder": RESPONDER, "non-responder": NON_RESPONDER}
PROCEDURE_MR_BRAIN = codes.LN.BrainMRI  # LOINC 24590-2, CID 100 is extensible
TRACKING_IDENTIFIER = "NSAID response prediction"
COMMENT = codes.DCM.Comment  # DCM 121106, TEXT rows of TID 1501
PERCENT = codes.UCUM.Percent  # OHIF shows the unit's code value: "%" reads, "1" does not

# Type 2 patient/study attributes that highdicom reads from the first instance as attributes.
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# TID 1604 descriptors (Image Library entry) that highdicom reads from the top level of an image.
_LIBRARY_GEOMETRY = ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
                     "ImageOrientationPatient", "ImagePositionPatient")
_LIBRARY_REQUIRED = ("Modality", "Rows", "Columns", "PixelSpacing", "SliceThickness",
                     "ImageOrientationPatient", "ImagePositionPatient")


def _check_evidence(evidence: Sequence[Dataset]) -> None:
    """One SR per series: its UIDs, study placement and evidence all come from that series."""
    if not evidence:
        raise ValueError("cannot build an SR without evidence: no source instances given")
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        missing = sum(1 for ds in evidence if not ds.get(attr))
        if missing:
            raise ValueError(f"{missing} of {len(evidence)} evidence instances lack {attr}")
    studies = {ds.StudyInstanceUID for ds in evidence}
    if len(studies) > 1:
        raise ValueError(f"evidence spans {len(studies)} studies; an SR reports on exactly one")
    series = {ds.SeriesInstanceUID for ds in evidence}
    if len(series) > 1:
        raise ValueError(f"evidence spans {len(series)} series; the prediction is made on one series")


def _library_view(ds: Dataset) -> Dataset:
    """Header with the TID 1604 geometry at the top level, where highdicom's Image Library reads it.

    Classic MR images carry it there already. Enhanced and Legacy Converted Enhanced
    MR keep it in functional groups: lift pixel measures and orientation from the
    shared (else first per-frame) group, and the position of the first frame.
    """
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        view = Dataset()
        for attr in ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "FrameOfReferenceUID"):
            if attr in ds:
                view[attr] = ds[attr]
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        first = ds.get("PerFrameFunctionalGroupsSequence", [Dataset()])[0]
        for group in ("PixelMeasuresSequence", "PlaneOrientationSequence", "PlanePositionSequence"):
            items = shared.get(group) or first.get(group)
            for attr in _LIBRARY_GEOMETRY if items else ():
                if attr in items[0]:
                    view[attr] = items[0][attr]
        ds = view
    missing = [a for a in _LIBRARY_REQUIRED if ds.get(a) is None or ds.get(a) == "" or ds.get(a) == []]
    if missing:
        raise ValueError(f"instance {ds.SOPInstanceUID} lacks {', '.join(missing)}, needed for the Image Library")
    return ds


def _patient_study_source(ds: Dataset) -> Dataset:
    """Copy of the first instance that highdicom can read patient and study data from without harm.

    highdicom raises on absent Type 2 attributes, rejects PatientSex outside M/F/O, and
    warns with the patient's name in the message when the name has no caret; so fill
    absent ones empty, blank a non-standard sex, and blank the name (restored after).
    """
    source = copy.deepcopy(ds)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in source:
            setattr(source, keyword, None)
    if source.PatientSex not in (None, "", "M", "F", "O"):
        source.PatientSex = None
    source.PatientName = None
    return source


def prediction_text(prediction: Prediction) -> str:
    return f"AI prediction: {LABEL_TEXTS[prediction.label]}"


def _comments(prediction: Prediction, model: ModelInfo) -> list[TextContentItem]:
    """What a reader must see with the number, as TID 1501 Comments (OHIF shows them; CODE items it does not)."""
    texts = [prediction_text(prediction), RESEARCH_USE_TEXT]
    if prediction.synthetic or model.synthetic:
        texts.append(SYNTHETIC_TEXT)
    return [
        TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
        for text in texts
    ]


def head_centre(pixels: np.ndarray | None, rows: int, columns: int) -> np.ndarray:
    """(column, row) of the head's centre on the centre image: where the analysed region is marked.

    The centroid of the pixels brighter than a tenth of the 99th percentile;
    the image centre without pixels or foreground. A point, not an outline:
    OHIF anchors the result's text at the right edge of the marked region, so
    an outline of the head would push the text off the viewport, while from the
    head's centre it reads over the image (tests/node/test_viewer.py).
    """
    row, column = (rows - 1) / 2, (columns - 1) / 2
    if pixels is not None and pixels.ndim == 2 and pixels.size:
        values = np.asarray(pixels, dtype=np.float32)
        level = float(np.percentile(values, 99)) * 0.1
        found = np.argwhere(values > level) if level > 0 else np.empty((0, 2))
        if len(found):
            row, column = found.mean(axis=0)
    return np.array([[column + 0.5, row + 0.5]], dtype=np.float32)  # pixel centre (PS3.3 C.18.6.1.2)


def _measurement_group(
    series_instance_uid: str,
    prediction: Prediction,
    model: ModelInfo,
    centre: Dataset,
    frame: int | None,
    centre_point: np.ndarray,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: probability on the analysed region, threshold, coded label, algorithm, comments."""
    if prediction.label not in LABEL_CODES:
        raise ValueError(f"unknown prediction label {prediction.label!r}; expected one of {', '.join(LABEL_CODES)}")
    for name, value in (("probability", prediction.probability), ("cutoff", prediction.cutoff)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within 0..1, got {value}")
    region = CoordinatesForMeasurement(
        graphic_type="POINT",
        graphic_data=centre_point,
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=centre.SOPClassUID,
            referenced_sop_instance_uid=centre.SOPInstanceUID,
            referenced_frame_numbers=None if frame is None else [frame],
        ),
    )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid("tracking", series_instance_uid, model.sha256),
            identifier=TRACKING_IDENTIFIER,
        ),
        finding_sites=[FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"sha256={model.sha256}", f"architecture={model.architecture}"],
        ),
        measurements=[
            Measurement(name=codes.DCM.Probability, value=round(100 * float(prediction.probability), 2), unit=PERCENT,
                        referenced_coordinates=[region]),
            Measurement(name=DECISION_THRESHOLD, value=round(100 * float(prediction.cutoff), 2), unit=PERCENT),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(name=PREDICTED_RESPONSE, value=LABEL_CODES[prediction.label]),
        ],
    )
    group[0].ContentSequence.extend(_comments(prediction, model))
    return group


def _separate(item: Dataset) -> None:
    """Every CONTAINER SEPARATE: each item stands alone with its concept name (dsr2html, OHIF's text view)."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", ()):
        _separate(child)


def centre_image(evidence: Sequence[Dataset]) -> tuple[Dataset, int | None]:
    """The centre image of the series: (instance, None) for classic slices, (object, frame) for multi-frame.

    The SR's Image Library and region, and the result image, all show this image.
    """
    centre = _representative(evidence)
    frames = int(centre.get("NumberOfFrames", 1) or 1)
    if len(evidence) == 1 and "PerFrameFunctionalGroupsSequence" in centre:
        return centre, frames // 2 + 1
    return centre, None


def _representative(evidence: Sequence[Dataset]) -> Dataset:
    """The centre slice (by position along the slice normal), or the multi-frame object.

    The Image Library (TID 1600) lists one image of the series: the prediction
    is about the whole series and references no single image, and viewers (OHIF)
    need one entry to attach the report to the series. Listing all 170 slices
    with their TID 1602 descriptors cost ~9 s per report in highdicom; every
    source instance is still referenced in the Current Requested Procedure
    Evidence Sequence.
    """
    if len(evidence) == 1:
        return evidence[0]
    orientation = [float(v) for v in evidence[0].get("ImageOrientationPatient", ())]
    if len(orientation) != 6 or any("ImagePositionPatient" not in ds for ds in evidence):
        return evidence[len(evidence) // 2]
    normal = (
        orientation[1] * orientation[5] - orientation[2] * orientation[4],
        orientation[2] * orientation[3] - orientation[0] * orientation[5],
        orientation[0] * orientation[4] - orientation[1] * orientation[3],
    )
    ordered = sorted(evidence, key=lambda ds: sum(float(p) * n for p, n in zip(ds.ImagePositionPatient, normal)))
    return ordered[len(ordered) // 2]


def build_sr(
    evidence: Sequence[Dataset],
    prediction: Prediction,
    model: ModelInfo,
    *,
    identity: ResultIdentity,
    predecessor=None,  # noqa: ANN001  storage.jobs.Predecessor: the result PACS holds now
    centre_pixels: np.ndarray | None = None,
    institution_name: str | None = None,
) -> ComprehensiveSR:
    """TID 1500 report of one prediction on one series; patient and study copied from the evidence.

    `evidence` are the source instances' headers (read with stop_before_pixels);
    `centre_pixels` the centre image (`centre_image`), to mark the head on it.
    The result is complete but PRELIMINARY and UNVERIFIED: no person has signed it.
    """
    evidence = list(evidence)
    _check_evidence(evidence)
    centre, frame = centre_image(evidence)
    library_entry = _library_view(centre)
    point = head_centre(centre_pixels, int(library_entry.Rows), int(library_entry.Columns))
    series_uid = evidence[0].SeriesInstanceUID
    sr_series_uid, sr_instance_uid = identity.sr_series_instance_uid, identity.sr_sop_instance_uid
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", model.name),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=model.model_id,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_MR_BRAIN,
        imaging_measurements=[_measurement_group(series_uid, prediction, model, centre, frame, point)],
        referenced_images=[library_entry],
    )
    _separate(report[0])
    previous = None
    if predecessor is not None and predecessor.sop_instance_uid != sr_instance_uid:
        previous = [Dataset()]
        previous[0].StudyInstanceUID = evidence[0].StudyInstanceUID
        previous[0].SeriesInstanceUID = predecessor.series_instance_uid
        previous[0].SOPInstanceUID = predecessor.sop_instance_uid
        previous[0].SOPClassUID = predecessor.sop_class_uid
    sr = ComprehensiveSR(
        evidence=[_patient_study_source(evidence[0]), *evidence[1:]],
        previous_versions=previous,
        content=report,
        series_instance_uid=sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.model_id,
        software_versions=__version__,
        series_description=SR_SERIES_DESCRIPTION,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=CODING_SCHEME,
                name=CODING_SCHEME_NAME,
                responsible_organization=CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
            )
        ],
    )
    if evidence[0].get("PatientName"):
        sr.PatientName = evidence[0].PatientName
    return sr
