"""The SR as readable text (what `migraine-node demo` prints): every value a reader needs, no patient data."""

from __future__ import annotations

import io
import re

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from model.checkpoint import ModelInfo
from model.predict import Prediction
from model.preprocess import InputSpec
from model.synth import write_series
from node.identity import result_identity, source_digest
from node.report import RESEARCH_USE_TEXT, SYNTHETIC_TEXT, build_sr
from node.sr_text import sr_as_text

SHA = "0123456789abcdef" * 4


def _sr_file(tmp_path, label: str, probability: float, synthetic: bool = True) -> pydicom.Dataset:
    """An SR as the worker writes it (built, encoded, read back)."""
    series = write_series(tmp_path / label, slices=16, rows=32, columns=32, spacing=4.0, seed=3)
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.paths]
    model = ModelInfo(name="nsaid-resnet", architecture="resnet18", input_spec=InputSpec(), cutoff=0.42,
                      sha256=SHA, synthetic=synthetic, version="3")
    prediction = Prediction(probability=probability, label=label, cutoff=0.42, model_id=model.model_id,
                            device="cpu", ms=12.3, synthetic=synthetic)
    identity = result_identity(series.series_instance_uid,
                               source_digest((ds.SOPInstanceUID, b"") for ds in evidence), SHA, 0.42)
    buffer = io.BytesIO()
    build_sr(evidence, prediction, model, identity=identity).save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.mark.parametrize(("label", "meaning"), [("responder", "NSAID responder"),
                                                 ("non-responder", "NSAID non-responder")])
def test_sr_text_shows_what_a_reader_needs(tmp_path, label, meaning):
    lines = sr_as_text(_sr_file(tmp_path, label, 0.876543))
    text = "\n".join(lines)
    assert lines[0].startswith("Imaging Measurement Report") and "COMPLETE" in lines[0]
    assert "UNVERIFIED" in lines[0] and "PRELIMINARY" in lines[0]
    # As a fraction (UCUM "1") or in percent, with its unit.
    assert re.search(r"^ +Probability: (0\.8765 \(no units\)|87\.65 Percent)$", text, re.M), text
    assert re.search(r"^ +Decision threshold: (0\.42 \(no units\)|42 Percent)$", text, re.M), text
    assert f"Predicted NSAID response: {meaning}" in text
    assert RESEARCH_USE_TEXT in text and SYNTHETIC_TEXT in text
    # Indented by depth: the measurement group's rows sit below their container.
    group = next(i for i, line in enumerate(lines) if line.strip() == "Measurement Group")
    probability = next(i for i, line in enumerate(lines) if "Probability:" in line)
    indent = len(lines[group]) - len(lines[group].lstrip())
    assert probability > group and len(lines[probability]) - len(lines[probability].lstrip()) > indent
    # No patient data: the synthetic series' name, ID and birth date appear nowhere.
    assert "SYNTHETIC^PHANTOM" not in text and "SYNTH-" not in text and "19800101" not in text


def test_collapsed_subtree_is_one_counted_line(tmp_path):
    ds = _sr_file(tmp_path, "responder", 0.9)
    full, short = sr_as_text(ds), sr_as_text(ds, collapse=("Image Library",))
    library = [line for line in short if "Image Library" in line]
    assert len(library) == 1 and library[0].startswith("  Image Library: (") and "not shown" in library[0]
    hidden = int(library[0].split("(")[1].split()[0])
    assert len(short) == len(full) - hidden
    assert "\n".join(short).endswith("\n".join(full[-3:]))


def test_real_model_sr_has_no_synthetic_statement(tmp_path):
    text = "\n".join(sr_as_text(_sr_file(tmp_path, "responder", 0.5, synthetic=False)))
    assert RESEARCH_USE_TEXT in text and SYNTHETIC_TEXT not in text


def _code(value: str, scheme: str, meaning: str) -> Sequence:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return Sequence([code])


def _item(value_type: str, name: Sequence, **attrs) -> Dataset:  # noqa: ANN003
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = name
    for key, value in attrs.items():
        setattr(item, key, value)
    return item


def test_every_value_type_and_no_identifiers():
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4"
    measured = Dataset()
    measured.NumericValue = "12.5"
    measured.MeasurementUnitsCodeSequence = _code("mm3", "UCUM", "cubic millimeter")
    items = [
        _item("UIDREF", _code("121012", "DCM", "Device Observer UID"), UID="1.2.3"),
        _item("IMAGE", _code("260753009", "SCT", "Source"), ReferencedSOPSequence=Sequence([ref])),
        _item("COMPOSITE", _code("121112", "DCM", "Source of Measurement"), ReferencedSOPSequence=Sequence([ref])),
        _item("SCOORD", _code("111030", "DCM", "Image Region"), GraphicType="POLYLINE",
              GraphicData=[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        _item("NUM", _code("118565006", "SCT", "Volume"), MeasuredValueSequence=Sequence([measured])),
        _item("PNAME", _code("121008", "DCM", "Person Observer Name"), PersonName="DOE^JANE"),
        _item("TEXT", _code("121030", "DCM", "Subject ID"), TextValue="PAT-0042"),
        _item("DATE", _code("121031", "DCM", "Subject Birth Date"), Date="19700101"),
    ]
    root = Dataset()
    root.ValueType = "CONTAINER"
    root.ConceptNameCodeSequence = _code("126000", "DCM", "Imaging Measurement Report")
    root.CompletionFlag, root.VerificationFlag = "PARTIAL", "VERIFIED"
    root.ContentSequence = Sequence(items)
    lines = sr_as_text(root)
    assert lines[0] == "Imaging Measurement Report [PARTIAL, VERIFIED]"
    assert "  Device Observer UID: 1.2.3" in lines
    assert "  Source: SOP Instance 1.2.3.4" in lines
    assert "  Image Region: POLYLINE with 3 points" in lines
    assert "  Volume: 12.5 cubic millimeter" in lines
    text = "\n".join(lines)
    assert "DOE" not in text and "PAT-0042" not in text and "19700101" not in text
    assert "  Subject ID: (not shown)" in lines
