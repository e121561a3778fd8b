"""Decide whether a completed series is the 3D T1 the model was trained on.

The model (Wei et al., iScience 2023) saw sagittal 3D T1 TFE volumes, 1 mm
isotropic, from a Philips Ingenia 3T. Anything else (a localizer, a reformat, a
2D or thick-slice series, another contrast) would still get a prediction, just a
meaningless one, so it is refused here with a reason a PACS administrator can
act on. `select_series` is pure; `header_from_datasets` only reads headers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage

MR_IMAGE_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})

# Vendor-neutral 3D T1 names. Matched case-insensitively with re.search against
# SeriesDescription (or ProtocolName when that is empty). 2D variants that slip
# through (e.g. a 2D SPGR) are caught by the MRAcquisitionType rule.
_NOT_FLAIR = r"^(?!.*flair)"  # a "T1 3D" name that also says FLAIR is a FLAIR, not the trained contrast
DEFAULT_T1_3D_PATTERNS: tuple[str, ...] = (
    # Philips 3D T1 turbo field echo: T1W_3D_TFE, sT1W_3D_TFE_SENSE, WIP cs_T1W_3D_TFE, T1_3D_TFE, 3D_T1W_TFE
    r"(t1w?[-_ ]*3d|3d[-_ ]*t1w?)[-_ ]*tfe",
    # Siemens / Canon MPRAGE: t1_mprage_sag_p2_iso, MPRAGE, MP-RAGE, 3D MPRAGE (not MP2RAGE: its INV/UNI images differ)
    r"mp[-_ ]?rage",
    # GE BRAVO (IR-prepared 3D FSPGR): Sag 3D BRAVO, SAG FSPGR BRAVO, BRAVO
    r"(?<![a-z])bravo(?![a-z])",
    # GE spoiled gradient echo, plain or IR-prepared: FSPGR 3D, 3D SPGR, IR-FSPGR
    r"(?<![a-z])(ir[-_ ]?)?f?spgr(?![a-z])",
    # Generic "T1 3D", "T1W 3D", "T1-weighted 3D"
    _NOT_FLAIR + r".*(?<!\d)t1(w|[-_ ]?weighted)?[-_ ]*3d(?![a-z0-9])",
    # Generic "3D T1", "3D_T1W"
    _NOT_FLAIR + r".*(?<![a-z0-9])3d[-_ ]*t1(?!\d)",
)

# Names of planning scans and of reformats/projections made on the console or PACS.
DEFAULT_REFUSE_DESCRIPTION_PATTERNS: tuple[str, ...] = (
    r"survey",  # Philips Survey, CoilSurveyScan
    r"locali[sz]er",  # FAST LOCALIZER, localiser
    r"(?<![a-z])loc(?![a-z])",  # 3-pl loc, loc_sag
    r"scout",  # Siemens AAHead_Scout
    r"pilot",  # GE "T/S/C RF FAST PILOT"
    r"(?<![a-z])ref(?![a-z])|refscan",  # Philips SENSE reference scan
    r"(?<![a-z])mpr(?![a-z])|reformat",  # "T1 post contrast MPR tra", tra_MPR (but not MPRAGE)
    r"(?<![a-z])(min)?mip(?![a-z])",  # MIP / MinIP projections
)

# Contrast markers in SeriesDescription or ProtocolName: the model saw native (non-contrast) T1 only.
# Matched case-insensitively. Pre-contrast and negated forms ("pre Gd", "non contrast", "w/o contrast")
# are not markers, nor are words that merely contain the letters (T1W_3D_TFE, SENSE, posterior, post-op).
_NOT_NEGATED = r"(?<!pre[-_ ])(?<!non[-_ ])(?<!no[-_ ])(?<!w/o[-_ ])(?<!without[-_ ])(?<!ohne[-_ ])"
DEFAULT_CONTRAST_PATTERNS: tuple[str, ...] = (
    r"\+[-_ ]?c(?![a-z])",  # +C, T1+C, T1 +C
    r"(?<![a-z])c[-_ ]?\+",  # C+, T1 C+
    _NOT_NEGATED + r"(?<![a-z])(gd|gad|gado|gadolinium|gadovist|dotarem|multihance|prohance)(?![a-z])",  # +Gd, GAD
    _NOT_NEGATED + r"(?<![a-z])post(?![a-z])(?![-_ ]?op)",  # MPRAGE_POST, T1 post (not post-op)
    r"(?<![a-z])post[-_ ]?(gd|gad|gado|c|ce|contrast|kontrast|km)(?![a-z])",  # POSTGD, postcontrast
    _NOT_NEGATED + r"(?<![a-z])(ce|km)(?![a-z])",  # T1_CE, CE-T1; German KM (Kontrastmittel)
    _NOT_NEGATED + r"(?<![a-z])(?<!pre)(?<!non)(contrast|kontrast)",  # contrast, T1 contrast (not precontrast)
)

# Contrast/Bolus Agent values that mean "none".
_NO_AGENT = frozenset({"", "NONE", "NO", "N/A", "NA", "-", "0", "NATIVE", "NATIV", "KEIN", "KEINE"})

# Why each refused ImageType value matters, in the administrator's words.
_IMAGE_TYPE_MEANING = {
    "DERIVED": "a reformat or derived image",
    "PROJECTION": "a projection image such as a MIP",
    "LOCALIZER": "a localizer",
    "SECONDARY": "a secondary capture or post-processed image",
    "MPR": "a multiplanar reformat",
    "MIP": "a maximum intensity projection",
}


@dataclass(frozen=True)
class SeriesHeader:
    """The attributes selection looks at, taken from one representative instance of the series plus counts."""

    modality: str | None
    series_description: str | None
    protocol_name: str | None
    sop_class_uid: str | None
    mr_acquisition_type: str | None  # (0018,0023) e.g. "3D"
    image_type: tuple[str, ...]  # (0008,0008) values, upper-case
    slices: int  # single-frame instances, or the frames of multi-frame objects
    pixel_spacing: tuple[float, float] | None  # (0028,0030) row, column spacing in mm
    slice_thickness: float | None  # (0018,0050)
    spacing_between_slices: float | None  # (0018,0088)
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    contrast_agent: str | None = None  # (0018,0010) Contrast/Bolus Agent, or the agent sequence's meaning


@dataclass(frozen=True)
class SelectionRules:
    """What counts as the trained 3D T1; defaults follow the paper's acquisition with some slack."""

    description_patterns: tuple[str, ...] = DEFAULT_T1_3D_PATTERNS
    modality: str = "MR"
    require_3d: bool = True
    min_slices: int = 100
    max_voxel_mm: float = 1.5
    refuse_image_types: tuple[str, ...] = ("DERIVED", "PROJECTION", "LOCALIZER", "SECONDARY", "MPR", "MIP")
    refuse_description_patterns: tuple[str, ...] = DEFAULT_REFUSE_DESCRIPTION_PATTERNS
    refuse_contrast: bool = True
    contrast_patterns: tuple[str, ...] = DEFAULT_CONTRAST_PATTERNS

    def __post_init__(self) -> None:
        # A bad regex in configuration should fail at start-up, not on the first study.
        for pattern in (*self.description_patterns, *self.refuse_description_patterns, *self.contrast_patterns):
            re.compile(pattern, re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str


def _matches(patterns: Sequence[str], text: str) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def _contrast_marker(patterns: Sequence[str], text: str) -> str | None:
    """The text of the first contrast marker found in `text`, or None."""
    for pattern in patterns:
        found = re.search(pattern, text, re.IGNORECASE) if text else None
        if found:
            return found.group(0)
    return None


def _refused_image_type(image_type: Sequence[str], refuse: Sequence[str]) -> str | None:
    """First refused term (in rule order) that is a word of an ImageType value ('PROJECTION IMAGE' has PROJECTION)."""
    words = {w for value in image_type for w in re.split(r"[\s_]+", value.upper()) if w}
    return next((term for term in refuse if term.upper() in words), None)


def _voxel_mm(header: SeriesHeader) -> tuple[float, str] | None:
    """Largest known voxel edge and which one it is; slice spacing prefers SpacingBetweenSlices."""
    edges: list[tuple[float, str]] = []
    if header.pixel_spacing is not None:
        edges += [(abs(header.pixel_spacing[0]), "row spacing"), (abs(header.pixel_spacing[1]), "column spacing")]
    slice_mm = header.spacing_between_slices or header.slice_thickness
    if slice_mm:
        edges.append((abs(slice_mm), "slice spacing"))
    edges = [e for e in edges if e[0] > 0]
    return max(edges, key=lambda e: e[0]) if edges else None


def select_series(header: SeriesHeader, rules: SelectionRules = SelectionRules()) -> Decision:
    """Apply the rules in a fixed order and report the first that fails, so the reason is stable."""

    def refuse(reason: str) -> Decision:
        return Decision(False, reason)

    # 1. Modality (and, when known, an MR image storage class rather than e.g. a secondary capture or spectroscopy).
    if not header.modality:
        return refuse(f"modality is missing, need {rules.modality}")
    if header.modality.upper() != rules.modality.upper():
        return refuse(f"modality '{header.modality}' is not {rules.modality}")
    if rules.modality.upper() == "MR" and header.sop_class_uid and header.sop_class_uid not in MR_IMAGE_SOP_CLASSES:
        return refuse(f"SOP class {header.sop_class_uid} is not an MR image storage class")

    # 2. Localizers, reformats and projections, by ImageType and then by name.
    term = _refused_image_type(header.image_type, rules.refuse_image_types)
    if term is not None:
        meaning = _IMAGE_TYPE_MEANING.get(term.upper(), "not an original acquisition")
        shown = "\\".join(header.image_type)
        return refuse(f"ImageType {shown} contains {term.upper()} ({meaning})")
    if header.series_description and header.series_description.strip():
        name, field = header.series_description.strip(), "series description"
    elif header.protocol_name and header.protocol_name.strip():
        name, field = header.protocol_name.strip(), "protocol name (series description is empty)"
    else:
        name, field = "", ""
    if name and _matches(rules.refuse_description_patterns, name):
        return refuse(f"a localizer/survey or reformat series ({field} '{name}')")

    # 2b. Post-contrast: the model was trained on native T1 only.
    if rules.refuse_contrast:
        agent = (header.contrast_agent or "").strip()
        if agent.upper() not in _NO_AGENT:
            return refuse(f"post-contrast series: Contrast/Bolus Agent is '{agent}' (the model expects a native T1)")
        for label, value in (("series description", header.series_description),
                             ("protocol name", header.protocol_name)):
            marker = _contrast_marker(rules.contrast_patterns, (value or "").strip())
            if marker:
                return refuse(f"post-contrast series: {label} '{value.strip()}' has the contrast marker "
                              f"'{marker}' (the model expects a native T1)")

    # 3. The protocol name says 3D T1.
    if not name:
        return refuse("no SeriesDescription or ProtocolName, cannot tell whether it is a 3D T1")
    if not _matches(rules.description_patterns, name):
        return refuse(f"{field} '{name}' does not match a 3D T1 protocol (T1W_3D_TFE, MPRAGE, BRAVO, FSPGR, ...)")

    # 4. A 3D acquisition.
    if rules.require_3d and (header.mr_acquisition_type or "").strip().upper() != "3D":
        got = header.mr_acquisition_type
        return refuse(f"MRAcquisitionType is '{got}', need 3D" if got else "MRAcquisitionType is missing, need 3D")

    # 5. Enough slices to cover the brain.
    if header.slices < rules.min_slices:
        return refuse(f"only {header.slices} slice(s), need at least {rules.min_slices}")

    # 6. Near-isotropic thin voxels.
    voxel = _voxel_mm(header)
    if voxel is None:
        return refuse("voxel size unknown (no PixelSpacing, SliceThickness or SpacingBetweenSlices)")
    size, edge = voxel
    if size > rules.max_voxel_mm:
        return refuse(f"voxel {size:.2f} mm ({edge}) exceeds {rules.max_voxel_mm:.2f} mm")

    return Decision(True, f"3D T1 '{name}', {header.slices} slices, {size:.2f} mm")


# --- building the header from datasets ---------------------------------------------------------


def _lookup(ds: Dataset, keyword: str) -> object | None:
    """Top level first, then the first item of each functional group macro (shared, then first frame).

    Enhanced MR keeps PixelMeasures and FrameType in functional groups; Legacy Converted Enhanced MR
    also moves MRAcquisitionType and friends into Unassigned*ConvertedAttributesSequence.
    """
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        for element in seq[0]:
            if element.VR == "SQ" and element.value:
                value = element.value[0].get(keyword)
                if value not in (None, ""):
                    return value
    return None


def _text(value: object | None) -> str | None:
    return (str(value).strip() or None) if value is not None else None


def _strings(value: object | None) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str | bytes) else list(value)  # type: ignore[call-overload]
    return tuple(s for v in values if (s := str(v).strip().upper()))


def _float(value: object | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def header_from_datasets(datasets: Sequence[Dataset]) -> SeriesHeader:
    """Summarise a series for selection from its headers; pixel data is never touched.

    The first dataset is representative; slices counts every frame of every object, which is
    len(datasets) for a classic series and NumberOfFrames for one Enhanced MR object.
    """
    if not datasets:
        raise ValueError("a series needs at least one dataset")
    ds = datasets[0]
    spacing = _lookup(ds, "PixelSpacing")
    try:
        pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None else None  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        pixel_spacing = None
    image_type = _strings(ds.get("ImageType")) or _strings(_lookup(ds, "FrameType"))
    return SeriesHeader(
        modality=_text(ds.get("Modality")),
        series_description=_text(ds.get("SeriesDescription")),
        protocol_name=_text(ds.get("ProtocolName")),
        sop_class_uid=_text(ds.get("SOPClassUID")),
        mr_acquisition_type=_text(_lookup(ds, "MRAcquisitionType")),
        image_type=image_type,
        slices=sum(_frames(d) for d in datasets),
        pixel_spacing=pixel_spacing,
        slice_thickness=_float(_lookup(ds, "SliceThickness")),
        spacing_between_slices=_float(_lookup(ds, "SpacingBetweenSlices")),
        scanning_sequence=_strings(_lookup(ds, "ScanningSequence")),
        sequence_variant=_strings(_lookup(ds, "SequenceVariant")),
        contrast_agent=_contrast_agent(ds),
    )


def _contrast_agent(ds: Dataset) -> str | None:
    """(0018,0010) Contrast/Bolus Agent, else the first item of an Enhanced MR agent sequence."""
    agent = _text(_lookup(ds, "ContrastBolusAgent"))
    if agent:
        return agent
    seq = _lookup(ds, "ContrastBolusAgentSequence")
    try:
        item = seq[0] if seq else None  # type: ignore[index]
    except (TypeError, IndexError):
        item = None
    if item is None:
        return None
    return _text(item.get("CodeMeaning")) or _text(item.get("CodeValue")) or "present"
