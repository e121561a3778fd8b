"""The SR the node returns to PACS: valid (dciodvfy), parseable (highdicom), and saying what it is."""

from __future__ import annotations

import re
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from model.checkpoint import ModelInfo
from model.predict import Prediction
from model.preprocess import InputSpec
from model.synth import write_series
from node.report import (
    CODING_SCHEME,
    DECISION_THRESHOLD,
    NON_RESPONDER,
    PREDICTED_RESPONSE,
    RESEARCH_USE_TEXT,
    RESPONDER,
    SR_SERIES_DESCRIPTION,
    SYNTHETIC_TEXT,
    build_sr,
    derive_uid,
    sr_uids,
)
from tests.peers import dciodvfy_errors

SHA = "0123456789abcdef" * 4
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _read(paths) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> list[pydicom.Dataset]:
    series = write_series(tmp_path_factory.mktemp("classic"), slices=24, rows=32, columns=32, spacing=4.0, seed=7)
    return _read(series.paths)


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory) -> list[pydicom.Dataset]:
    series = write_series(
        tmp_path_factory.mktemp("enhanced"), slices=24, rows=32, columns=32, spacing=4.0, enhanced=True, seed=8
    )
    return _read(series.paths)


def _model(synthetic: bool = True, sha256: str = SHA) -> ModelInfo:
    return ModelInfo(
        name="nsaid-resnet", architecture="resnet10", input_spec=InputSpec(), cutoff=0.42,
        sha256=sha256, synthetic=synthetic, version="3",
    )


def _prediction(label: str = "responder", probability: float = 0.876543, synthetic: bool = True) -> Prediction:
    return Prediction(
        probability=probability, label=label, cutoff=0.42, model_id=_model().model_id,
        device="cpu", ms=12.3, synthetic=synthetic,
    )


def _save_and_validate(sr: hd.sr.ComprehensiveSR, path: Path) -> hd.sr.ComprehensiveSR:
    sr.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy_errors(path)  # always runs: `make test` installs dicom3tools
    assert not errors, output
    return hd.sr.srread(path)


def _texts(sr: hd.sr.ComprehensiveSR) -> list[str]:
    items = find_content_items(sr, name=codes.DCM.Comment, value_type=ValueTypeValues.TEXT, recursive=True)
    return [item.value for item in items]


def _image_library_uids(sr: hd.sr.ComprehensiveSR) -> set[str]:
    (library,) = find_content_items(sr, name=codes.DCM.ImageLibrary, recursive=True)
    images = find_content_items(library, value_type=ValueTypeValues.IMAGE, recursive=True)
    return {img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for img in images}


@pytest.mark.parametrize("kind", ["classic", "enhanced"])
@pytest.mark.parametrize("label", ["responder", "non-responder"])
def test_sr_is_valid_and_carries_the_prediction(request, tmp_path, kind, label):
    evidence = request.getfixturevalue(kind)
    source = evidence[0]
    sr = _save_and_validate(build_sr(evidence, _prediction(label), _model()), tmp_path / "sr.dcm")

    assert sr.SOPClassUID == ComprehensiveSRStorage
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber",
                    "StudyDate", "StudyTime", "StudyID"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert (sr.Modality, sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "SR", "COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(source.SeriesInstanceUID, SHA)

    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == CODING_SCHEME
    assert scheme.CodingSchemeName and scheme.CodingSchemeResponsibleOrganization

    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "NSAID response prediction"
    (evaluation,) = group.get_qualitative_evaluations(name=PREDICTED_RESPONSE)
    assert evaluation.value == (RESPONDER if label == "responder" else NON_RESPONDER)
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.8765)
    assert probability.unit == codes.UCUM.NoUnits
    (threshold,) = group.get_measurements(name=DECISION_THRESHOLD)
    assert threshold.value == pytest.approx(0.42)
    assert threshold.unit == codes.UCUM.NoUnits
    assert [site.value for site in group.finding_sites] == [codes.SCT.Brain]

    algorithm = {item.name.meaning: item.value for item in group[0].ContentSequence
                 if item.name.meaning.startswith("Algorithm")}
    assert algorithm["Algorithm Name"] == "nsaid-resnet"
    assert algorithm["Algorithm Version"] == "3"
    parameters = [i.value for i in find_content_items(group[0], name=codes.DCM.AlgorithmParameters)]
    assert f"sha256={SHA}" in parameters and "architecture=resnet10" in parameters

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)
    assert observer.observer_identifying_attributes.model_name == _model().model_id

    source_uids = {ds.SOPInstanceUID for ds in evidence}
    # The Image Library lists the centre image; the evidence sequence lists every source instance.
    (library_uid,) = _image_library_uids(sr)
    assert library_uid in source_uids
    if len(evidence) > 1:
        centre = sorted(evidence, key=lambda ds: float(ds.SliceLocation))[len(evidence) // 2]
        assert library_uid == centre.SOPInstanceUID
    assert {uids[2] for uids in sr.get_evidence(current_procedure_only=True)} == source_uids
    assert "PertinentOtherEvidenceSequence" not in sr


@pytest.mark.parametrize("model_synthetic, prediction_synthetic", [(True, True), (False, True), (True, False)])
def test_synthetic_statement_present_when_either_is_synthetic(classic, tmp_path, model_synthetic, prediction_synthetic):
    sr = build_sr(classic, _prediction(synthetic=prediction_synthetic), _model(synthetic=model_synthetic))
    texts = _texts(_save_and_validate(sr, tmp_path / "sr.dcm"))
    assert RESEARCH_USE_TEXT in texts
    assert SYNTHETIC_TEXT in texts


def test_real_model_has_research_statement_only(enhanced, tmp_path):
    sr = build_sr(enhanced, _prediction(synthetic=False), _model(synthetic=False), institution_name="Test Hospital")
    sr = _save_and_validate(sr, tmp_path / "sr.dcm")
    assert _texts(sr) == [RESEARCH_USE_TEXT]
    assert SYNTHETIC_TEXT not in str(sr)
    assert sr.InstitutionName == "Test Hospital"


def test_resend_gives_the_same_uids(classic):
    first = build_sr(classic, _prediction(), _model())
    second = build_sr(list(reversed(classic)), _prediction(), _model())
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
    other = build_sr(classic, _prediction(), _model(sha256="f" * 64))
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_single_component_name_and_missing_type2_attributes(classic, tmp_path):
    """Anonymised headers: a name without a caret must not make highdicom warn (with the name)."""
    first = pydicom.dcmread(classic[0].filename, stop_before_pixels=True)
    first.PatientName = "ANONYMOUS"
    del first.PatientBirthDate, first.PatientSex, first.ReferringPhysicianName
    sr = _save_and_validate(build_sr([first, *classic[1:3]], _prediction(), _model()), tmp_path / "sr.dcm")
    assert str(sr.PatientName) == "ANONYMOUS"
    assert sr.PatientBirthDate == "" and sr.PatientSex == ""
    assert first.PatientName == "ANONYMOUS" and "PatientBirthDate" not in first  # evidence left untouched


def test_derive_uid_is_deterministic_and_valid():
    uid = derive_uid("a", "b")
    assert uid == derive_uid("a", "b") != derive_uid("a", "c")
    assert uid.startswith("2.25.") and len(uid) <= 64 and UID_RE.match(uid)
    assert derive_uid("a|b") == derive_uid("a", "b")  # documented: parts joined with "|"


def test_sr_uids_depend_on_series_and_checkpoint():
    series_uid, instance_uid = sr_uids("1.2.3", SHA)
    assert (series_uid, instance_uid) == sr_uids("1.2.3", SHA)
    assert series_uid != instance_uid
    for uid in (series_uid, instance_uid):
        assert len(uid) <= 64 and UID_RE.match(uid)
    assert sr_uids("1.2.3", "f" * 64) != (series_uid, instance_uid)
    assert sr_uids("1.2.4", SHA)[1] != instance_uid


def test_empty_evidence_is_rejected():
    with pytest.raises(ValueError, match="no source instances"):
        build_sr([], _prediction(), _model())


def test_evidence_from_two_studies_is_rejected(classic):
    stray = pydicom.dcmread(classic[1].filename, stop_before_pixels=True)
    stray.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="2 studies") as info:
        build_sr([classic[0], stray], _prediction(), _model())
    message = str(info.value)
    assert classic[0].PatientID not in message and "SYNTHETIC" not in message


def test_unknown_label_is_rejected(classic):
    with pytest.raises(ValueError, match="label"):
        build_sr(classic, _prediction(label="maybe"), _model())


def test_instance_without_geometry_is_rejected_clearly(classic):
    broken = pydicom.dcmread(classic[2].filename, stop_before_pixels=True)
    del broken.ImageOrientationPatient
    with pytest.raises(ValueError, match="ImageOrientationPatient, needed for the Image Library"):
        build_sr([broken], _prediction(), _model())


def test_enhanced_library_entry_uses_functional_group_geometry(enhanced):
    sr = build_sr(enhanced, _prediction(), _model())
    (image,) = find_content_items(sr, value_type=ValueTypeValues.IMAGE, recursive=True)
    values = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in image.ContentSequence}
    frame = enhanced[0].PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    shared = enhanced[0].SharedFunctionalGroupsSequence[0]
    assert float(values["Image Position (Patient) Z"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        float(frame.ImagePositionPatient[2]))
    assert float(values["Slice Thickness"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        float(shared.PixelMeasuresSequence[0].SliceThickness))
