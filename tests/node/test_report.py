"""The SR the node returns to PACS: valid (dciodvfy), parseable (highdicom), and saying what it is."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

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
from node.identity import derive_uid, result_identity, source_digest
from node.report import (
    CODING_SCHEME,
    DECISION_THRESHOLD,
    NON_RESPONDER,
    PREDICTED_RESPONSE,
    RESEARCH_USE_TEXT,
    RESPONDER,
    SR_SERIES_DESCRIPTION,
    SYNTHETIC_TEXT,
    build_sr as _build_sr,
    centre_image,
    head_centre,
    prediction_text,
)
from storage.jobs import Predecessor
from tests.peers import dciodvfy_errors

SHA = "0123456789abcdef" * 4
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _read(paths) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _identity(evidence, model, cutoff: float = 0.42):
    digest = source_digest((ds.SOPInstanceUID, b"") for ds in evidence)
    return result_identity(evidence[0].SeriesInstanceUID, digest, model.sha256, cutoff)


def build_sr(evidence, prediction, model, **kwargs):
    """The builder with the identity the worker would give it."""
    evidence = list(evidence)
    identity = kwargs.pop("identity", None) or (_identity(evidence, model, prediction.cutoff) if evidence else None)
    return _build_sr(evidence, prediction, model, identity=identity, **kwargs)


@pytest.fixture(scope="module")
def classic(source_classic) -> list[pydicom.Dataset]:
    return _read(source_classic.paths)


@pytest.fixture(scope="module")
def enhanced(source_enhanced) -> list[pydicom.Dataset]:
    return _read(source_enhanced.paths)


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
    identity = _identity(evidence, _model())
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (identity.sr_series_instance_uid, identity.sr_sop_instance_uid)
    assert "PredecessorDocumentsSequence" not in sr

    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == CODING_SCHEME
    assert scheme.CodingSchemeName and scheme.CodingSchemeResponsibleOrganization

    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "NSAID response prediction"
    (evaluation,) = group.get_qualitative_evaluations(name=PREDICTED_RESPONSE)
    assert evaluation.value == (RESPONDER if label == "responder" else NON_RESPONDER)
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(87.65)
    assert probability.unit == codes.UCUM.Percent
    (threshold,) = group.get_measurements(name=DECISION_THRESHOLD)
    assert threshold.value == pytest.approx(42.0)
    assert threshold.unit == codes.UCUM.Percent
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

    # What OHIF draws: the probability NUM INFERRED FROM a closed polyline on the centre image, and Comments.
    (region,) = probability.referenced_coordinates
    assert region.graphic_type.value == "POINT" and region.RelationshipType == "INFERRED FROM"
    assert len(region.value) == 1
    (selected,) = region.ContentSequence
    assert selected.RelationshipType == "SELECTED FROM"
    assert selected.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == library_uid
    centre, frame = centre_image(evidence)
    assert selected.ReferencedSOPSequence[0].get("ReferencedFrameNumber") == frame
    assert _texts(sr)[:2] == [prediction_text(_prediction(label)), RESEARCH_USE_TEXT]
    assert ("NSAID non-responder" if label == "non-responder" else "NSAID responder") in _texts(sr)[0]
    continuity = [e.value for e in sr.iterall() if e.keyword == "ContinuityOfContent"]
    assert len(continuity) >= 4 and set(continuity) == {"SEPARATE"}  # root, measurements, group, library


@pytest.mark.parametrize("model_synthetic, prediction_synthetic", [(True, True), (False, True), (True, False)])
def test_synthetic_statement_present_when_either_is_synthetic(classic, tmp_path, model_synthetic, prediction_synthetic):
    sr = build_sr(classic, _prediction(synthetic=prediction_synthetic), _model(synthetic=model_synthetic))
    texts = _texts(_save_and_validate(sr, tmp_path / "sr.dcm"))
    assert RESEARCH_USE_TEXT in texts
    assert SYNTHETIC_TEXT in texts
    assert len(texts) + 2 <= 5  # OHIF draws at most five lines: comments plus two numbers


def test_real_model_has_research_statement_only(enhanced, tmp_path):
    sr = build_sr(enhanced, _prediction(synthetic=False), _model(synthetic=False), institution_name="Test Hospital")
    sr = _save_and_validate(sr, tmp_path / "sr.dcm")
    assert _texts(sr) == [prediction_text(_prediction(synthetic=False)), RESEARCH_USE_TEXT]
    assert SYNTHETIC_TEXT not in str(sr)
    assert sr.InstitutionName == "Test Hospital"


def test_resend_gives_the_same_uids(classic):
    first = build_sr(classic, _prediction(), _model())
    second = build_sr(list(reversed(classic)), _prediction(), _model())
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
    other = build_sr(classic, _prediction(), _model(sha256="f" * 64))
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_identity_changes_with_any_input_that_decides_the_content():
    pairs = [("1.2.3.1", b"a"), ("1.2.3.2", b"b")]
    base = result_identity("1.2.3", source_digest(pairs), SHA, 0.5)
    assert base == result_identity("1.2.3", source_digest(reversed(pairs)), SHA, 0.5)  # arrival order
    changed = [
        result_identity("1.2.3", source_digest([*pairs, ("1.2.3.3", b"c")]), SHA, 0.5),  # a late instance
        result_identity("1.2.3", source_digest([("1.2.3.1", b"a"), ("1.2.3.2", b"B")]), SHA, 0.5),  # corrected
        result_identity("1.2.3", source_digest(pairs), "f" * 64, 0.5),  # another checkpoint
        result_identity("1.2.3", source_digest(pairs), SHA, 0.6),  # another cutoff
    ]
    for other in changed:
        assert other.sr_sop_instance_uid != base.sr_sop_instance_uid
        assert other.image_sop_instance_uid != base.image_sop_instance_uid
    # The result series stays per source series and model, so versions line up in one series.
    assert changed[0].sr_series_instance_uid == base.sr_series_instance_uid
    assert changed[2].sr_series_instance_uid != base.sr_series_instance_uid
    uids = {base.sr_series_instance_uid, base.sr_sop_instance_uid, base.image_series_instance_uid,
            base.image_sop_instance_uid}
    assert len(uids) == 4 and all(len(u) <= 64 and UID_RE.match(u) for u in uids)
    with pytest.raises(ValueError, match="cutoff"):
        result_identity("1.2.3", source_digest(pairs), SHA, 1.5)


def test_new_result_names_the_one_it_replaces(classic, tmp_path):
    old = build_sr(classic[:-1], _prediction(), _model())
    new = build_sr(classic, _prediction(), _model(), predecessor=Predecessor(
        str(old.SOPClassUID), str(old.SeriesInstanceUID), str(old.SOPInstanceUID)))
    sr = _save_and_validate(new, tmp_path / "sr.dcm")
    assert sr.SOPInstanceUID != old.SOPInstanceUID and sr.SeriesInstanceUID == old.SeriesInstanceUID
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == old.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence] == [
        (old.SOPClassUID, old.SOPInstanceUID)]
    # A result that is its own predecessor (an identical replay) names none.
    same = build_sr(classic, _prediction(), _model(), predecessor=Predecessor(
        str(new.SOPClassUID), str(new.SeriesInstanceUID), str(new.SOPInstanceUID)))
    assert "PredecessorDocumentsSequence" not in same


def test_head_centre_marks_the_foreground():
    pixels = np.zeros((64, 80), dtype=np.uint16)
    pixels[10:50, 20:40] = 1000
    ((column, row),) = head_centre(pixels, 64, 80)
    assert (column, row) == pytest.approx((30.0, 30.0))  # centroid (29.5, 29.5) at the pixel centre
    ((column, row),) = head_centre(np.zeros((64, 80)), 64, 80)
    assert (column, row) == pytest.approx((40.0, 32.0))
    ((column, row),) = head_centre(None, 64, 80)
    assert (column, row) == pytest.approx((40.0, 32.0))


def test_dsr2html_shows_every_item_with_its_name(classic, tmp_path):
    """DCMTK's renderer: SEPARATE containers list each item as "name: value", not one run-on line
    (CONTINUOUS ran "0.8123 1 0.5 1 NSAID responder" together)."""
    path = tmp_path / "sr.dcm"
    build_sr(classic, _prediction(probability=0.8123), _model()).save_as(path, enforce_file_format=True)
    result = subprocess.run(["/usr/bin/dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = re.sub(r"<[^>]+>", " ", result.stdout)
    text = re.sub(r"\s+", " ", text)
    for expected in ("Probability: 81.23 %", "Decision threshold: 42.0 %",
                     "Predicted NSAID response: NSAID responder (R, 99MIGRNODE)",
                     "Comment: AI prediction: NSAID responder", f"Comment: {RESEARCH_USE_TEXT}",
                     f"Comment: {SYNTHETIC_TEXT}"):
        assert expected in text, (expected, text[:3000])


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
    (library,) = find_content_items(sr, name=codes.DCM.ImageLibrary, recursive=True)
    (image,) = find_content_items(library, value_type=ValueTypeValues.IMAGE, recursive=True)
    values = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in image.ContentSequence}
    frame = enhanced[0].PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    shared = enhanced[0].SharedFunctionalGroupsSequence[0]
    assert float(values["Image Position (Patient) Z"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        float(frame.ImagePositionPatient[2]))
    assert float(values["Slice Thickness"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        float(shared.PixelMeasuresSequence[0].SliceThickness))


def test_a_header_correction_changes_the_result_identity(classic):
    from node.identity import instance_content

    original = pydicom.dcmread(classic[0].filename)
    for keyword, value in (("PatientName", "CORRECTED^NAME"), ("ImagePositionPatient", [1, 2, 3]),
                           ("RescaleSlope", "2")):
        corrected = pydicom.dcmread(classic[0].filename)
        setattr(corrected, keyword, value)
        assert instance_content(corrected) != instance_content(original), keyword
    same = pydicom.dcmread(classic[0].filename)
    same.file_meta.SourceApplicationEntityTitle = "OTHER_AE"  # who sent it does not matter
    assert instance_content(same) == instance_content(original)


def test_remembered_header_texts_give_the_same_content(source_classic, source_enhanced, tmp_path):
    """The worker's memo of value texts (by raw bytes) must not change a result's identity: every
    instance's content equals the one computed without it, including two copies of a slice whose
    patient name has the same bytes under two character sets (so two different names)."""
    from node.identity import instance_content

    paths = [Path(p) for p in source_classic.paths[:4]]
    latin = pydicom.dcmread(paths[3])
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "M\xfcller^Anna"
    latin.save_as(tmp_path / "latin.dcm")
    data = (tmp_path / "latin.dcm").read_bytes()  # the same name bytes, declared Cyrillic
    (tmp_path / "cyrillic.dcm").write_bytes(data.replace(b"ISO_IR 100", b"ISO_IR 144", 1))
    sources = [*paths, tmp_path / "latin.dcm", tmp_path / "cyrillic.dcm", *source_enhanced.paths]
    reprs: dict = {}
    remembered = [instance_content(pydicom.dcmread(p), reprs) for p in sources]
    plain = [instance_content(pydicom.dcmread(p)) for p in sources]
    assert remembered == plain
    name = [pydicom.dcmread(tmp_path / f).get_item(0x00100010).value for f in ("latin.dcm", "cyrillic.dcm")]
    assert name[0] == name[1] and plain[4] != plain[5]  # same bytes, two names
    assert reprs  # the memo was used
