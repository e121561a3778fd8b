"""A DICOM Structured Report as readable text: what a radiologist's viewer would show.

`sr_as_text(ds)` walks any SR content tree (CONTAINER, TEXT, CODE, NUM,
UIDREF, IMAGE, COMPOSITE, SCOORD, ...) and returns one line per content
item, indented by depth, as "concept name: value". Pure: a dataset in,
lines out. Patient and subject identifiers (person names, Subject ID, Subject
Birth Date) are never shown.
"""

from __future__ import annotations

from collections.abc import Collection

from pydicom.dataset import Dataset

INDENT = "  "
# TID 1007/1008 subject context rows that can carry a patient's name, ID or birth date.
_IDENTIFYING_CONCEPTS = {("DCM", "121029"), ("DCM", "121030"), ("DCM", "121031")}
_HIDDEN = "(not shown)"


def _meaning(sequence) -> str:  # noqa: ANN001  a pydicom Sequence of code items
    if not sequence:
        return ""
    code = sequence[0]
    meaning = str(code.get("CodeMeaning", "") or "")
    if meaning:
        return meaning
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return f"{value} ({code.get('CodingSchemeDesignator', '')})"


def _concept(item: Dataset) -> tuple[str, tuple[str, str] | None]:
    sequence = item.get("ConceptNameCodeSequence")
    if not sequence:
        return "", None
    code = sequence[0]
    key = (str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")))
    return _meaning(sequence), key


def _number(value) -> str:  # noqa: ANN001  DS or str
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:g}" if abs(number) < 1e6 else text


def _num(item: Dataset) -> str:
    measured = item.get("MeasuredValueSequence")
    if not measured:
        qualifier = _meaning(item.get("NumericValueQualifierCodeSequence"))
        return qualifier or "(no value)"
    value = measured[0]
    number = _number(value.get("NumericValue", ""))
    units = value.get("MeasurementUnitsCodeSequence")
    unit = _meaning(units)
    if not unit:
        return number
    return f"{number} ({unit})" if str(units[0].get("CodeValue", "")) == "1" else f"{number} {unit}"


def _reference(item: Dataset) -> str:
    refs = item.get("ReferencedSOPSequence")
    if not refs:
        return "(no reference)"
    ref = refs[0]
    text = f"SOP Instance {ref.get('ReferencedSOPInstanceUID', '?')}"
    frames = ref.get("ReferencedFrameNumber")
    if frames is not None:
        text += f" frame {frames}"
    return text


def _coordinates(item: Dataset) -> str:
    data = item.get("GraphicData") or []
    dims = 3 if item.ValueType == "SCOORD3D" else 2
    points = len(data) // dims if data else 0
    text = f"{item.get('GraphicType', '?')} with {points} point{'s' if points != 1 else ''}"
    if item.ValueType == "SCOORD3D" and item.get("ReferencedFrameOfReferenceUID"):
        text += f" in frame of reference {item.ReferencedFrameOfReferenceUID}"
    return text


def _value(item: Dataset, key: tuple[str, str] | None) -> str | None:
    """The item's value as text (None for a CONTAINER, which only titles its children)."""
    kind = str(item.get("ValueType", ""))
    if key in _IDENTIFYING_CONCEPTS or kind == "PNAME":
        return _HIDDEN
    if kind == "CONTAINER":
        return None
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        return _num(item)
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        return _reference(item)
    if kind in ("SCOORD", "SCOORD3D"):
        return _coordinates(item)
    if kind == "TCOORD":
        return f"{item.get('TemporalRangeType', '?')}"
    if kind == "DATETIME":
        return str(item.get("DateTime", ""))
    if kind == "DATE":
        return str(item.get("Date", ""))
    if kind == "TIME":
        return str(item.get("Time", ""))
    return f"({kind or 'unknown'} item)"


def _count(items) -> int:  # noqa: ANN001  a pydicom Sequence
    return sum(1 + _count(item.get("ContentSequence")) for item in items or ())


def _walk(items, depth: int, lines: list[str], collapse: Collection[str]) -> None:  # noqa: ANN001
    for item in items or ():
        prefix = INDENT * depth
        if "ReferencedContentItemIdentifier" in item:
            target = ".".join(str(v) for v in item.ReferencedContentItemIdentifier)
            lines.append(f"{prefix}{item.get('RelationshipType', '')} content item {target}".rstrip())
            continue
        name, key = _concept(item)
        value = _value(item, key)
        children = item.get("ContentSequence")
        if name in collapse and children:
            hidden = _count(children)
            value = f"{value} " if value is not None else ""
            lines.append(f"{prefix}{name}: {value}({hidden} content item{'s' if hidden != 1 else ''} not shown)")
            continue
        if value is None:
            lines.append(f"{prefix}{name or '(container)'}")
        else:
            lines.append(f"{prefix}{name}: {value}" if name else f"{prefix}{value}")
        _walk(children, depth + 1, lines, collapse)


def sr_as_text(ds: Dataset, collapse: Collection[str] = ()) -> list[str]:
    """Header line (title, completion/verification/preliminary flags), then the content tree.

    Items whose concept name is in `collapse` (e.g. "Image Library") are shown as one line
    that counts their descendants.
    """
    title, _ = _concept(ds)
    flags = [str(ds.get(flag)) for flag in ("CompletionFlag", "VerificationFlag", "PreliminaryFlag")
             if ds.get(flag)]
    header = title or "Structured Report"
    if flags:
        header += f" [{', '.join(flags)}]"
    lines = [header]
    _walk(ds.get("ContentSequence"), 1, lines, collapse)
    return lines
