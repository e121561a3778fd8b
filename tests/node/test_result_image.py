"""The result image (Secondary Capture): valid (dciodvfy), filed in the source's study, and legible."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from model.checkpoint import ModelInfo
from model.predict import Prediction
from model.preprocess import InputSpec
from node import __version__
from node.report import MANUFACTURER, RESEARCH_USE_TEXT, SYNTHETIC_TEXT
from node.result_image import (
    PANEL_WIDTH,
    RESULT_IMAGE_SERIES_DESCRIPTION,
    RESULT_IMAGE_SERIES_NUMBER,
    SLICE_HEIGHT,
    build_result_image,
    compose_result_pixels,
    image_text_lines,
    patient_orientation,
    render_text_panel,
    resample,
    window_to_uint8,
)
from tests.peers import dciodvfy_errors

SHA = "0123456789abcdef" * 4
CREATED = dt.datetime(2026, 2, 3, 4, 5, 6)
SECRET_NAME = "DOE^JANE^SECRETNAME"
SECRET_ID = "SECRET-ID-4711"


@dataclasses.dataclass
class Source:
    header: pydicom.Dataset  # as the caller passes it: no pixel data
    pixels: np.ndarray  # the centre slice, as stored
    frame: int | None


@pytest.fixture(scope="module")
def classic(source_classic) -> Source:
    datasets = sorted((pydicom.dcmread(p) for p in source_classic.paths), key=lambda ds: float(ds.SliceLocation))
    centre = datasets[len(datasets) // 2]
    return Source(pydicom.dcmread(centre.filename, stop_before_pixels=True), centre.pixel_array, None)


@pytest.fixture(scope="module")
def enhanced(source_enhanced) -> Source:
    (path,) = source_enhanced.paths
    frames = pydicom.dcmread(path).pixel_array
    return Source(pydicom.dcmread(path, stop_before_pixels=True), frames[len(frames) // 2], len(frames) // 2 + 1)


def _model(synthetic: bool = True) -> ModelInfo:
    return ModelInfo(name="nsaid-resnet", architecture="resnet10", input_spec=InputSpec(), cutoff=0.5,
                     sha256=SHA, synthetic=synthetic, version="3")


def _prediction(label: str = "responder", probability: float = 0.81, synthetic: bool = True, **kw) -> Prediction:
    fields = dict(probability=probability, label=label, cutoff=0.5, model_id=_model().model_id, device="cpu",
                  ms=12.3, synthetic=synthetic)
    return Prediction(**{**fields, **kw})


def _build(source: Source, prediction: Prediction | None = None, model: ModelInfo | None = None, **kw):
    args = dict(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                referenced_frame_number=source.frame, created=CREATED)
    return build_result_image(source.pixels, source.header, prediction or _prediction(), model or _model(),
                              **{**args, **kw})


@pytest.mark.parametrize("kind", ["classic", "enhanced"])
@pytest.mark.parametrize("label, probability", [("responder", 0.81), ("non-responder", 0.23)])
def test_result_image_is_valid_and_in_the_source_study(request, tmp_path, kind, label, probability):
    source: Source = request.getfixturevalue(kind)
    series_uid, sop_uid = generate_uid(), generate_uid()
    built = _build(source, _prediction(label, probability), series_instance_uid=series_uid,
                   sop_instance_uid=sop_uid, institution_name="Research Hospital")
    built.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    errors, output = dciodvfy_errors(tmp_path / "sc.dcm")
    assert not errors, output
    ds = pydicom.dcmread(tmp_path / "sc.dcm")

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID) == (
        SecondaryCaptureImageStorage, sop_uid, series_uid)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert keyword in ds and ds[keyword].value == source.header[keyword].value, keyword
    assert (ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber) == (
        RESULT_IMAGE_SERIES_DESCRIPTION, RESULT_IMAGE_SERIES_NUMBER, 1)
    assert (ds.Modality, ds.ConversionType, list(ds.ImageType), ds.BurnedInAnnotation) == (
        "OT", "WSD", ["DERIVED", "SECONDARY"], "NO")
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions, ds.InstitutionName) == (
        MANUFACTURER, _model().model_id, __version__, "Research Hospital")
    assert (ds.ContentDate, ds.ContentTime) == ("20260203", "040506")
    assert ds.DerivationDescription

    (reference,) = ds.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.header.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.header.SOPClassUID
    assert reference.get("ReferencedFrameNumber") == source.frame  # absent for a classic source

    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored) == (
        "MONOCHROME2", 1, 8, 8)
    assert (ds.Rows, ds.Columns) == (SLICE_HEIGHT, SLICE_HEIGHT + PANEL_WIDTH)  # landscape, square slice
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    assert SECRET_NAME not in ds.ImageComments and str(source.header.PatientName) not in ds.ImageComments


def test_pixels_are_the_untouched_slice_left_of_the_text_panel(classic):
    lines = image_text_lines(_prediction(), _model())
    image = compose_result_pixels(classic.pixels, lines, (4.0, 4.0))
    panel = render_text_panel(lines)
    picture = resample(window_to_uint8(classic.pixels), (4.0, 4.0))

    assert picture.shape == (SLICE_HEIGHT, SLICE_HEIGHT) == panel.shape[:1] * 2
    assert image.shape == (512, 512 + PANEL_WIDTH) == (512, 1184)
    assert np.array_equal(image[:, :512], picture)  # no text over the anatomy
    assert np.array_equal(image[:, 512:], panel)
    text_rows = np.flatnonzero((panel > 200).any(axis=1))
    assert text_rows.size > 100  # many rows carry bright text
    assert not render_text_panel([]).any()  # the text, not the panel, makes those pixels


@pytest.mark.parametrize("shape, spacing, expected", [
    ((64, 64), (1.0, 1.0), (512, 1184)),
    ((256, 256), (1.0, 1.0), (512, 1184)),
    ((256, 192), (1.0, 1.0), (512, 384 + PANEL_WIDTH)),  # portrait slice: narrower
    ((192, 256), (1.0, 1.0), (512, 683 + PANEL_WIDTH + 1)),  # odd slice width: the panel evens it out
    ((8, 1024), (1.0, 1.0), (512, 2048 + PANEL_WIDTH)),  # degenerate: width capped, slice centred
])
def test_layout_is_landscape_and_even(shape, spacing, expected):
    pixels = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    image = compose_result_pixels(pixels, image_text_lines(_prediction(), _model()), spacing)
    assert image.shape == expected
    assert image.shape[1] > image.shape[0]


def test_text_is_large():
    panel = render_text_panel(["H"])
    cap_rows = np.flatnonzero((panel > 128).any(axis=1))
    assert cap_rows.max() - cap_rows.min() + 1 >= 20  # cap height on the 512 px tall panel


def test_prediction_line_is_larger_than_the_rest():
    lines = ["H", "H", "H"]
    panel = render_text_panel(lines)
    rows = np.flatnonzero((panel > 128).any(axis=1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    heights = [len(run) for run in runs]
    assert len(heights) == 3 and heights[1] > heights[0] >= 20 and heights[2] >= 20


def test_lines_wrap_only_when_needed():
    lines = image_text_lines(_prediction("non-responder", 0.23, synthetic=False), _model(synthetic=False))
    panel = render_text_panel(lines)
    rows = np.flatnonzero((panel > 128).any(axis=1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(runs) == len(lines)  # every line on one row at full size
    assert min(len(run) for run in runs) >= 20


def test_long_words_wrap_inside_the_panel():
    one_row = render_text_panel(["Model: x"], height=0)
    panel = render_text_panel([f"Model: nsaid-resnet-{'x' * 60}@0123456789ab"], height=0)
    assert panel.shape[0] > 2 * one_row.shape[0]  # broken over several rows, not cut off
    assert not panel[:, -8:].any()  # nothing runs into the right margin


def test_overflowing_text_shrinks_then_grows_the_panel_never_cut():
    few = render_text_panel(["H"] * 6)
    many = render_text_panel(["H"] * 12)  # does not fit at full size: a smaller font
    assert few.shape[0] == many.shape[0] == SLICE_HEIGHT
    many_rows = np.flatnonzero((many > 128).any(axis=1))
    runs = np.split(many_rows, np.flatnonzero(np.diff(many_rows) > 1) + 1)
    assert len(runs) == 12 and 16 <= len(runs[-1]) < 21  # all drawn, cap height shrunk but >= 16 px
    assert not many[-4:].any()  # the last line ends above the bottom edge
    huge = render_text_panel(["H"] * 40)  # too much even at the smallest font: the panel grows
    huge_rows = np.flatnonzero((huge > 128).any(axis=1))
    runs = np.split(huge_rows, np.flatnonzero(np.diff(huge_rows) > 1) + 1)
    assert huge.shape[0] > SLICE_HEIGHT and len(runs) == 40 and min(len(r) for r in runs[2:]) >= 16
    assert not huge[-4:].any()
    image = compose_result_pixels(np.ones((64, 64)), ["H"] * 40)
    assert image.shape[0] >= huge.shape[0] and image.shape[0] % 2 == 0
    assert np.array_equal(image[: huge.shape[0], -PANEL_WIDTH:], huge)


def test_synthetic_statement_only_for_synthetic_models():
    real = image_text_lines(_prediction(synthetic=False), _model(synthetic=False))
    assert SYNTHETIC_TEXT not in real and RESEARCH_USE_TEXT in real
    for prediction_synthetic, model_synthetic in ((True, False), (False, True), (True, True)):
        lines = image_text_lines(_prediction(synthetic=prediction_synthetic), _model(synthetic=model_synthetic))
        assert lines == [*real, SYNTHETIC_TEXT]

    real_panel = render_text_panel(real)
    synthetic_panel = render_text_panel([*real, SYNTHETIC_TEXT])
    assert real_panel.shape == synthetic_panel.shape == (SLICE_HEIGHT, PANEL_WIDTH)  # it fits at full size
    last_text_row = np.flatnonzero(real_panel.any(axis=1)).max()
    assert np.array_equal(synthetic_panel[: last_text_row + 1], real_panel[: last_text_row + 1])
    assert (synthetic_panel[last_text_row + 1:] > 200).any()  # the extra line is drawn


def test_text_lines_say_the_result():
    lines = image_text_lines(_prediction("non-responder", 0.234567), _model())
    assert lines[0] == "AI RESULT: NSAID response prediction"
    assert "Prediction: NSAID non-responder" in lines
    assert "Probability of response: 0.23   (cutoff 0.50)" in lines
    assert f"Model: {_model().model_id}" in lines
    assert "Prediction: NSAID responder" in image_text_lines(_prediction("responder", 0.5), _model())


def test_probability_printed_with_enough_decimals_not_to_contradict_the_label():
    lines = image_text_lines(_prediction("non-responder", 0.4951), _model())
    assert "Probability of response: 0.495   (cutoff 0.500)" in lines


@pytest.mark.parametrize("shape, spacing, expected", [
    ((64, 64), (1.0, 1.0), (512, 512)),
    ((256, 256), (1.0, 1.0), (512, 512)),
    ((32, 32), (4.0, 4.0), (512, 512)),
    ((64, 32), (1.0, 2.0), (512, 512)),  # non-square pixels become square: 64 x 64 mm
    ((256, 192), (1.0, 1.0), (512, 384)),
    ((192, 256), (1.0, 1.0), (512, 683)),
    ((1024, 1024), (1.0, 1.0), (512, 512)),  # a fixed height: a large matrix is shrunk
    ((8, 1024), (1.0, 1.0), (16, 2048)),  # a degenerate aspect ratio does not make a huge image
])
def test_resample_keeps_the_physical_aspect_at_a_fixed_height(shape, spacing, expected):
    image = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    assert resample(image, spacing).shape == expected


def test_shrinking_does_not_alias():
    stripes = np.tile(np.array([0, 255], dtype=np.uint8), (1024, 512))  # finest vertical stripes
    shrunk = resample(stripes)
    assert shrunk.shape == (512, 512) and np.abs(shrunk.astype(int) - 128).max() < 16  # grey, not moire


def test_window_is_robust_to_hot_pixels_and_flat_or_odd_inputs():
    rng = np.random.default_rng(0)
    tissue = rng.normal(1000, 100, size=(64, 64))
    tissue[0, 0] = 1e6  # one hot pixel must not darken the rest
    windowed = window_to_uint8(tissue)
    assert windowed.dtype == np.uint8 and 100 < np.median(windowed) < 155
    assert not window_to_uint8(np.full((8, 8), 7, dtype=np.int16)).any()
    with_nan = np.array([[np.nan, 1.0], [2.0, 3.0]])
    assert window_to_uint8(with_nan)[0, 0] == 0
    assert not window_to_uint8(np.full((2, 2), np.nan)).any()
    mostly_empty = np.zeros((32, 32), dtype=np.uint16)
    mostly_empty[0, :3] = 500  # fewer than 1 % of pixels: the 1st and 99th percentiles are both 0
    assert window_to_uint8(mostly_empty).sum() == 3 * 255


def test_patient_orientation_from_classic_and_enhanced(classic, enhanced):
    assert patient_orientation(classic.header) == ["P", "F"]  # synthetic sagittal
    assert patient_orientation(enhanced.header, enhanced.frame) == ["P", "F"]
    axial = pydicom.Dataset()
    axial.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert patient_orientation(axial) == ["L", "P"]
    oblique = pydicom.Dataset()
    oblique.ImageOrientationPatient = [0.2, -0.98, 0, 0, 0, -1]
    assert patient_orientation(oblique) == ["AL", "F"]
    assert patient_orientation(pydicom.Dataset()) == []


def test_absent_type2_attributes_are_present_empty_and_odd_sex_blank(tmp_path, classic):
    header = copy.deepcopy(classic.header)
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        delattr(header, keyword)
    header.PatientSex = "X"
    built = _build(dataclasses.replace(classic, header=header))
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID", "PatientSex"):
        assert keyword in built and not built[keyword].value, keyword
    built.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    errors, output = dciodvfy_errors(tmp_path / "sc.dcm")
    assert not errors, output


def test_non_ascii_patient_name_keeps_its_character_set(tmp_path, classic):
    header = copy.deepcopy(classic.header)
    header.SpecificCharacterSet = "ISO_IR 192"
    header.PatientName = "Müller^Jürgen"
    built = _build(dataclasses.replace(classic, header=header), institution_name="Universitätsklinikum")
    built.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    errors, output = dciodvfy_errors(tmp_path / "sc.dcm")
    assert not errors, output
    ds = pydicom.dcmread(tmp_path / "sc.dcm")
    assert (ds.SpecificCharacterSet, ds.PatientName, ds.InstitutionName) == (
        "ISO_IR 192", "Müller^Jürgen", "Universitätsklinikum")


def test_same_inputs_same_pixels(enhanced):
    assert _build(enhanced).PixelData == _build(enhanced).PixelData


def _secret(source: Source) -> Source:
    header = copy.deepcopy(source.header)
    header.PatientName, header.PatientID = SECRET_NAME, SECRET_ID
    return dataclasses.replace(source, header=header)


@pytest.mark.parametrize("change, message", [
    (dict(probability=1.2), "probability must be within 0..1"),
    (dict(probability=-0.1, label="non-responder"), "probability must be within 0..1"),
    (dict(probability=float("nan")), "probability must be within 0..1"),
    (dict(cutoff=1.5), "cutoff must be within 0..1"),
    (dict(label="maybe"), "unknown prediction label"),
    (dict(label="non-responder"), "contradicts probability"),
    (dict(model_id="other@000000000000"), "prediction is from model"),
])
def test_bad_predictions_raise_without_patient_data(classic, change, message):
    with pytest.raises(ValueError, match=message) as raised:
        _build(_secret(classic), dataclasses.replace(_prediction(), **change))
    assert SECRET_NAME not in str(raised.value) and SECRET_ID not in str(raised.value)


@pytest.mark.parametrize("kind, change, message", [
    ("classic", dict(pixels=np.zeros((2, 32, 32))), "must be a 2D slice"),
    ("classic", dict(pixels=np.zeros((32, 16))), "differs from the source"),
    ("classic", dict(pixels=np.full((32, 32), "a")), "must be real numbers"),
    ("classic", dict(frame=1), "single-frame source"),
    ("enhanced", dict(frame=None), "referenced_frame_number is required"),
    ("enhanced", dict(frame=25), "outside the source's frames 1..24"),
    ("enhanced", dict(frame=0), "outside the source's frames 1..24"),
])
def test_bad_inputs_raise_without_patient_data(request, kind, change, message):
    source = dataclasses.replace(_secret(request.getfixturevalue(kind)), **change)
    with pytest.raises(ValueError, match=message) as raised:
        _build(source)
    assert SECRET_NAME not in str(raised.value) and SECRET_ID not in str(raised.value)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_source_without_identity_raises(classic, keyword):
    header = copy.deepcopy(classic.header)
    delattr(header, keyword)
    with pytest.raises(ValueError, match=f"lacks {keyword}"):
        _build(dataclasses.replace(classic, header=header))


@pytest.mark.parametrize("uid", ["", "1.2.abc", "1.02.3", "1." + "2" * 70])
def test_bad_uids_raise(classic, uid):
    with pytest.raises(ValueError, match="sop_instance_uid is not a valid UID"):
        _build(classic, sop_instance_uid=uid)
