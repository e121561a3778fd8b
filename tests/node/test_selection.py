from __future__ import annotations

import dataclasses

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from node.selection import (
    DEFAULT_T1_3D_PATTERNS,
    Decision,
    SelectionRules,
    SeriesHeader,
    header_from_datasets,
    select_series,
)

T1_3D = SeriesHeader(
    modality="MR",
    series_description="T1W_3D_TFE",
    protocol_name="T1W_3D_TFE",
    sop_class_uid=MRImageStorage,
    mr_acquisition_type="3D",
    image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
    slices=170,
    pixel_spacing=(1.0, 1.0),
    slice_thickness=1.0,
    spacing_between_slices=1.0,
    scanning_sequence=("GR",),
    sequence_variant=("MP",),
)


def with_(**changes) -> SeriesHeader:  # noqa: ANN003
    return dataclasses.replace(T1_3D, **changes)


def test_the_trained_acquisition_is_accepted():
    decision = select_series(T1_3D)
    assert decision == Decision(True, "3D T1 'T1W_3D_TFE', 170 slices, 1.00 mm")


@pytest.mark.parametrize(
    "name",
    [
        # Philips
        "T1W_3D_TFE",
        "sT1W_3D_TFE",
        "sT1W_3D_TFE_SENSE",
        "WIP cs_T1W_3D_TFE",
        "3D_T1W_TFE",
        "T1_3D_TFE",
        "t1w_3d_tfe",
        # Siemens / Canon
        "t1_mprage_sag_p2_iso",
        "MPRAGE",
        "MP-RAGE",
        "3D MPRAGE",
        # GE
        "Sag 3D BRAVO",
        "BRAVO",
        "FSPGR 3D",
        "3D SPGR",
        "SAG FSPGR BRAVO",
        "IR-FSPGR",
        # generic
        "T1 3D",
        "3D T1",
        "T1W 3D",
    ],
)
def test_3d_t1_names_are_accepted(name):
    decision = select_series(with_(series_description=name, protocol_name=None))
    assert decision.accepted, decision.reason
    assert name in decision.reason


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("T2W_TSE", "does not match a 3D T1 protocol"),
        ("FLAIR_3D", "does not match a 3D T1 protocol"),
        ("3D T1 FLAIR", "does not match a 3D T1 protocol"),
        ("T1W 3D FLAIR", "does not match a 3D T1 protocol"),
        ("DWI", "does not match a 3D T1 protocol"),
        ("sT2W_3D_FLAIR", "does not match a 3D T1 protocol"),
        ("T1W_SE", "does not match a 3D T1 protocol"),
        ("SWI", "does not match a 3D T1 protocol"),
        ("MP2RAGE_UNI", "does not match a 3D T1 protocol"),
        ("Survey", "localizer/survey"),
        ("FAST LOCALIZER", "localizer/survey"),
        ("AAHead_Scout", "localizer/survey"),
        ("T1 post contrast MPR tra", "localizer/survey or reformat"),
        ("T1W_3D_TFE MIP", "localizer/survey or reformat"),
    ],
)
def test_other_names_are_refused(name, words):
    decision = select_series(with_(series_description=name, protocol_name=None))
    assert not decision.accepted
    assert words in decision.reason
    assert name in decision.reason


def test_default_patterns_never_match_flair():
    import re

    for name in ("FLAIR_3D", "3D_FLAIR", "T1_FLAIR_3D", "sT2W_3D_FLAIR", "3D T1 FLAIR"):
        assert not any(re.search(p, name, re.IGNORECASE) for p in DEFAULT_T1_3D_PATTERNS), name


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"modality": "CT", "sop_class_uid": CTImageStorage}, ["modality 'CT' is not MR"]),
        ({"modality": None}, ["modality is missing"]),
        ({"sop_class_uid": SecondaryCaptureImageStorage}, ["SOP class", "not an MR image storage class"]),
        ({"image_type": ("DERIVED", "PRIMARY", "MPR")}, ["ImageType", "DERIVED", "reformat"]),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, ["ImageType", "LOCALIZER"]),
        ({"series_description": "Survey", "protocol_name": "Survey"}, ["localizer/survey", "'Survey'"]),
        ({"series_description": "DWI"}, ["series description 'DWI'", "does not match a 3D T1 protocol"]),
        ({"series_description": None, "protocol_name": None}, ["no SeriesDescription or ProtocolName"]),
        ({"mr_acquisition_type": "2D"}, ["MRAcquisitionType is '2D', need 3D"]),
        ({"mr_acquisition_type": None}, ["MRAcquisitionType is missing"]),
        ({"slices": 48}, ["only 48 slice(s), need at least 100"]),
        ({"slices": 1}, ["only 1 slice(s)"]),
        ({"slice_thickness": 3.0, "spacing_between_slices": None}, ["voxel 3.00 mm", "slice spacing", "exceeds 1.50 mm"]),
        ({"pixel_spacing": (1.0, 3.0)}, ["voxel 3.00 mm", "column spacing", "exceeds"]),
        (
            {"pixel_spacing": None, "slice_thickness": None, "spacing_between_slices": None},
            ["voxel size unknown"],
        ),
    ],
)
def test_each_rule_gives_its_own_reason(changes, words):
    decision = select_series(with_(**changes))
    assert not decision.accepted
    for word in words:
        assert word in decision.reason


def test_first_failing_rule_is_reported():
    everything_wrong = with_(
        modality="CT", image_type=("DERIVED",), series_description="DWI", mr_acquisition_type="2D", slices=1
    )
    assert "modality" in select_series(everything_wrong).reason
    assert "DERIVED" in select_series(dataclasses.replace(everything_wrong, modality="MR")).reason
    assert "DWI" in select_series(with_(series_description="DWI", mr_acquisition_type="2D", slices=1)).reason
    assert "2D" in select_series(with_(mr_acquisition_type="2D", slices=1)).reason


def test_spacing_between_slices_wins_over_slice_thickness():
    # Overlapping thick slices reconstructed at 1 mm are still 1 mm apart; a 1 mm slab 3 mm apart is not.
    assert select_series(with_(slice_thickness=2.0, spacing_between_slices=1.0)).accepted
    assert not select_series(with_(slice_thickness=1.0, spacing_between_slices=3.0)).accepted


def test_protocol_name_is_used_when_description_is_empty():
    accepted = select_series(with_(series_description="", protocol_name="sT1W_3D_TFE"))
    assert accepted.accepted
    assert "sT1W_3D_TFE" in accepted.reason
    refused = select_series(with_(series_description=None, protocol_name="DWI"))
    assert not refused.accepted
    assert "protocol name" in refused.reason and "'DWI'" in refused.reason
    # The description, when present, wins over the protocol name.
    assert not select_series(with_(series_description="DWI", protocol_name="T1W_3D_TFE")).accepted


def test_rules_are_configurable():
    loose = SelectionRules(min_slices=40, max_voxel_mm=3.5, require_3d=False)
    assert select_series(with_(slices=48, slice_thickness=3.0, spacing_between_slices=None), loose).accepted
    assert select_series(with_(mr_acquisition_type="2D"), loose).accepted
    custom = SelectionRules(description_patterns=(r"^my_t1$",))
    assert select_series(with_(series_description="MY_T1"), custom).accepted
    assert not select_series(T1_3D, custom).accepted


def test_bad_configured_pattern_fails_early():
    import re

    with pytest.raises(re.error):
        SelectionRules(description_patterns=("t1(",))


# --- header_from_datasets ----------------------------------------------------------------------


def classic_slice(number: int, **overrides) -> Dataset:  # noqa: ANN003
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.SeriesDescription = "T1W_3D_TFE"
    ds.ProtocolName = "T1W_3D_TFE"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    ds.MRAcquisitionType = "3D"
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["MP", "SK"]
    ds.InstanceNumber = number
    ds.PixelSpacing = ["1.0", "1.0"]
    ds.SliceThickness = "1.0"
    ds.SpacingBetweenSlices = "1.0"
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def test_header_from_classic_series():
    datasets = [classic_slice(n) for n in range(1, 171)]
    header = header_from_datasets(datasets)
    assert header == dataclasses.replace(T1_3D, sequence_variant=("MP", "SK"))
    assert select_series(header).accepted


def test_header_from_few_slices_is_refused_for_slice_count():
    header = header_from_datasets([classic_slice(n) for n in range(1, 4)])
    assert header.slices == 3
    assert select_series(header).reason == "only 3 slice(s), need at least 100"


def test_missing_attributes_become_none():
    header = header_from_datasets([Dataset()])
    assert header == SeriesHeader(None, None, None, None, None, (), 1, None, None, None)
    assert select_series(header).reason == "modality is missing, need MR"


def test_empty_series_is_an_error():
    with pytest.raises(ValueError):
        header_from_datasets([])


def enhanced_mr(frame_type: list[str]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.Modality = "MR"
    ds.SeriesDescription = "sT1W_3D_TFE"
    ds.MRAcquisitionType = "3D"
    ds.NumberOfFrames = 170
    measures = Dataset()
    measures.PixelSpacing = [1.0, 1.0]
    measures.SliceThickness = 1.0
    frame = Dataset()
    frame.FrameType = frame_type
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.MRImageFrameTypeSequence = [frame]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def test_header_from_enhanced_mr():
    header = header_from_datasets([enhanced_mr(["ORIGINAL", "PRIMARY", "M_FFE", "NONE"])])
    assert header.slices == 170
    assert header.pixel_spacing == (1.0, 1.0)
    assert header.slice_thickness == 1.0
    assert header.spacing_between_slices is None
    assert header.image_type == ("ORIGINAL", "PRIMARY", "M_FFE", "NONE")
    assert header.mr_acquisition_type == "3D"
    assert select_series(header) == Decision(True, "3D T1 'sT1W_3D_TFE', 170 slices, 1.00 mm")


def test_enhanced_mr_derived_frame_type_is_refused():
    header = header_from_datasets([enhanced_mr(["DERIVED", "PRIMARY", "MPR", "NONE"])])
    decision = select_series(header)
    assert not decision.accepted and "DERIVED" in decision.reason


def test_header_from_legacy_converted_enhanced_mr(tmp_path):
    # highdicom moves MRAcquisitionType into UnassignedSharedConvertedAttributesSequence.
    from model.synth import write_series

    series = write_series(tmp_path, slices=120, rows=8, columns=8, enhanced=True)
    ds = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    header = header_from_datasets([ds])
    assert header.slices == 120
    assert header.mr_acquisition_type == "3D"
    assert header.pixel_spacing == (1.0, 1.0)
    decision = select_series(header)
    assert decision.accepted, decision.reason


# --- pydicom's bundled files -------------------------------------------------------------------


def test_pydicom_mr700_projection_series_is_refused():
    paths = sorted(get_testdata_files("**/MR700/*"))
    if not paths:
        pytest.skip("pydicom's MR700 test files are not installed")
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    header = header_from_datasets(datasets)
    assert header.slices == len(paths) == 7
    assert header.image_type == ("DERIVED", "SECONDARY", "PROJECTION IMAGE")
    decision = select_series(header)
    assert not decision.accepted
    assert "DERIVED" in decision.reason or "PROJECTION" in decision.reason
    # Even if DERIVED were allowed, the projection is still refused.
    rules = SelectionRules(refuse_image_types=("PROJECTION",))
    assert "PROJECTION" in select_series(header, rules).reason


def test_pydicom_localizer_is_refused():
    paths = sorted(get_testdata_files("**/MR1/*"))
    if not paths:
        pytest.skip("pydicom's MR1 test files are not installed")
    decision = select_series(header_from_datasets([pydicom.dcmread(paths[0], stop_before_pixels=True)]))
    assert not decision.accepted
    assert "localizer" in decision.reason and "FAST LOCALIZER" in decision.reason


def test_pydicom_mr_small_is_refused():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    decision = select_series(header_from_datasets([ds]))
    assert not decision.accepted and "DERIVED" in decision.reason


# ---- post-contrast series ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["T1W_3D_TFE +C", "T1+C 3D", "3D T1 C+", "T1W_3D_TFE_GD", "sT1W_3D_TFE GAD", "MPRAGE_POST", "T1 3D post",
     "t1_mprage_sag_CE", "3D T1 contrast", "T1_3D_TFE_postGd", "MPRAGE Gadovist", "T1 3D KM"],
)
def test_contrast_markers_in_the_name_are_refused(name):
    decision = select_series(with_(series_description=name, protocol_name=None))
    assert not decision.accepted
    assert decision.reason.startswith("post-contrast series: series description")
    assert name in decision.reason


@pytest.mark.parametrize(
    "name",
    ["T1W_3D_TFE", "sT1W_3D_TFE_SENSE", "WIP cs_T1W_3D_TFE", "t1_mprage_sag_p2_iso", "Sag 3D BRAVO", "3D SPGR",
     "T1 3D pre Gd", "3D T1 precontrast", "T1 3D non contrast", "MPRAGE post-op"],
)
def test_native_names_are_not_contrast_markers(name):
    decision = select_series(with_(series_description=name, protocol_name=None))
    assert decision.accepted, decision.reason


def test_contrast_marker_in_the_protocol_name_is_refused():
    decision = select_series(with_(series_description="T1W_3D_TFE", protocol_name="T1W_3D_TFE_GD"))
    assert not decision.accepted
    assert "protocol name 'T1W_3D_TFE_GD'" in decision.reason and "'GD'" in decision.reason


def test_contrast_bolus_agent_is_refused():
    decision = select_series(with_(contrast_agent="GADOVIST"))
    assert decision == Decision(
        False, "post-contrast series: Contrast/Bolus Agent is 'GADOVIST' (the model expects a native T1)")


@pytest.mark.parametrize("agent", [None, "", "NONE", "none", "-"])
def test_empty_or_none_contrast_agent_is_native(agent):
    assert select_series(with_(contrast_agent=agent)).accepted


def test_contrast_rule_can_be_switched_off():
    rules = SelectionRules(refuse_contrast=False)
    assert select_series(with_(contrast_agent="Gd", series_description="MPRAGE_POST"), rules).accepted


def test_header_carries_the_contrast_agent(small_series):
    series_dir, _ = small_series
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.iterdir())]
    assert header_from_datasets(datasets).contrast_agent is None
    datasets[0].ContrastBolusAgent = "Dotarem"
    header = header_from_datasets(datasets)
    assert header.contrast_agent == "Dotarem"
    assert "Contrast/Bolus Agent is 'Dotarem'" in select_series(header).reason


def test_header_carries_an_enhanced_contrast_agent_sequence():
    ds = Dataset()
    ds.Modality = "MR"
    item = Dataset()
    item.CodeValue = "C-B0317"
    item.CodeMeaning = "Gadolinium"
    ds.ContrastBolusAgentSequence = [item]
    assert header_from_datasets([ds]).contrast_agent == "Gadolinium"


def test_dispatch_refuses_a_spooled_post_contrast_series(tmp_path):
    """The header dispatch reads from the spool carries ContrastBolusAgent through to the decision."""
    from sqlalchemy import create_engine

    from model.synth import write_classic_series
    from node.dispatch import Dispatcher
    from node.header import header_from_dataset, instance_record
    from storage.jobs import JobQueue
    from storage.models import Base
    from storage.spool import Spool, SpoolKey
    from storage.store import JobStore

    src = tmp_path / "src"
    src.mkdir()
    write_classic_series(src, slices=120, rows=16, columns=16, seed=5)
    spool = Spool(tmp_path / "spool")
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    store = JobStore(engine)
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent = "GADOVIST"
        rec = instance_record(header_from_dataset(ds), ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, 1, "SCANNER")
        target = spool.root / SpoolKey(rec.study_instance_uid, rec.series_instance_uid, rec.sop_instance_uid).relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        store.record_instance(rec, replaced_content=False)
    [snapshot] = store.receiving_series()
    assert store.mark_complete(snapshot, "test")
    queue = JobQueue(engine)
    assert Dispatcher(queue, spool).run() == 1
    view = store.get_series(snapshot.series_instance_uid)
    assert view.state == "skipped"
    assert "Contrast/Bolus Agent is 'GADOVIST'" in view.reason
