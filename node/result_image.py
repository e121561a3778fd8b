"""The prediction burned into a Secondary Capture image, for PACS viewers that show no SR.

Plain Secondary Capture Image Storage (PS3.3 A.8.1) is the image IOD that every
viewer displays, OHIF v3 included: 8-bit MONOCHROME2, uncompressed Explicit VR
Little Endian. The picture is landscape, to fill a viewer's landscape viewport:
the centre slice of the analysed series on the left and a text panel on its right
(never over the anatomy) saying what the model predicted, with the same words as
the SR (`image_text_lines`).

Modality is "OT", not "MR": this is a rendered result, and a PACS routing rule
"send every MR to the AI node" must not feed it back to the node. Conversion Type
is "WSD" (workstation). Everything here is pure: arrays and headers in, a dataset
out. Messages never carry patient identifiers.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.transforms import IdentityTransform
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy import ndimage

from model.checkpoint import ModelInfo
from model.predict import Prediction
from node import __version__
from node.report import MANUFACTURER, RESEARCH_USE_TEXT, SYNTHETIC_TEXT

RESULT_IMAGE_SERIES_DESCRIPTION = "AI: NSAID response result image"
RESULT_IMAGE_SERIES_NUMBER = 9902
TITLE = "AI RESULT: NSAID response prediction"
LABEL_TEXT = {"responder": "NSAID responder", "non-responder": "NSAID non-responder"}
SLICE_HEIGHT = 512  # px: the slice's height, so a viewer need not magnify it (blurrily) itself
MAX_SLICE_WIDTH = 2048  # px: a degenerate aspect ratio must not make a huge image
PANEL_WIDTH = 672  # px: the text panel right of the slice; a square slice makes a 1184 x 512 image
FONT_PX = 29  # body font size: DejaVu Sans cap height is 0.73 em, 21 px
FONT_MIN_PX = 22  # the smallest it shrinks to for text that would overflow the panel: 16 px cap height
PROMINENT_SCALE = 1.15  # the prediction line, in bold, relative to the body font
_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT_FILE, FONT_BOLD_FILE = _FONT_DIR / "DejaVuSans.ttf", _FONT_DIR / "DejaVuSans-Bold.ttf"
DERIVATION_DESCRIPTION = (
    "Centre slice of the analysed series, windowed 1st-99th percentile to 8 bit, resampled to square "
    "pixels, with the AI result written in a text panel beside the image by migraine-node"
)
# Type 2 patient and study attributes: present (empty if the source lacks them).
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "ReferringPhysicianName", "StudyID")
# Type 3 attributes copied when the source has them; lossy compression stays flagged on derived images.
_COPY_IF_PRESENT = ("SpecificCharacterSet", "IssuerOfPatientID", "StudyDescription", "LossyImageCompression",
                    "LossyImageCompressionRatio", "LossyImageCompressionMethod")
PURPOSE_OF_REFERENCE = codes.DCM.SourceImageForImageProcessingOperation  # DCM 121322, CID 7202
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def image_text_lines(prediction: Prediction, model: ModelInfo) -> list[str]:
    """The words on the image, one string per line, so the SR and the terminal demo can show the same.

    Raises ValueError for a prediction that is out of range or contradicts itself.
    """
    _check_prediction(prediction, model)
    decimals = _decimals(prediction.probability, prediction.cutoff)
    lines = [
        TITLE,
        f"Prediction: {LABEL_TEXT[prediction.label]}",
        f"Probability of response: {prediction.probability:.{decimals}f}   (cutoff {prediction.cutoff:.{decimals}f})",
        f"Model: {model.model_id}",
        RESEARCH_USE_TEXT,
    ]
    if prediction.synthetic or model.synthetic:
        lines.append(SYNTHETIC_TEXT)
    return lines


def _check_prediction(prediction: Prediction, model: ModelInfo) -> None:
    """An image a clinician may glance at must not show a result that contradicts itself."""
    if prediction.label not in LABEL_TEXT:
        raise ValueError(f"unknown prediction label {prediction.label!r}; expected one of {', '.join(LABEL_TEXT)}")
    for name, value in (("probability", prediction.probability), ("cutoff", prediction.cutoff)):
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} must be within 0..1, got {value}")
    if (prediction.label == "responder") != (prediction.probability >= prediction.cutoff):
        raise ValueError(f"label {prediction.label!r} contradicts probability {prediction.probability} "
                         f"against cutoff {prediction.cutoff}")
    if prediction.model_id != model.model_id:
        raise ValueError(f"prediction is from model {prediction.model_id!r}, not {model.model_id!r}")


def _decimals(probability: float, cutoff: float) -> int:
    """Fewest decimals (2 to 6) at which the printed probability and cutoff still order as the label says."""
    for decimals in range(2, 6):
        if (round(probability, decimals) >= round(cutoff, decimals)) == (probability >= cutoff):
            return decimals
    return 6


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """1st-99th percentile to 0..255: any stored dtype, and a few hot voxels do not darken the brain."""
    values = np.asarray(pixels, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [1, 99])
    if high <= low:  # nearly all one value (a mostly empty slice): the full range instead
        low, high = finite.min(), finite.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) / (high - low)
    return np.round(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)


def resample(image: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Bilinear resample to square pixels, SLICE_HEIGHT px tall (at most MAX_SLICE_WIDTH px wide).

    The SC carries no pixel spacing, so viewers draw its pixels square: resampling
    to square pixels keeps the anatomy's proportions. A fixed height makes the slice
    and the text panel beside it the same size whatever the matrix; a larger source
    is low-pass filtered before it is shrunk, so it does not alias.
    """
    rows, columns = image.shape
    row_mm, column_mm = pixel_spacing
    height, width = rows * row_mm / min(pixel_spacing), columns * column_mm / min(pixel_spacing)
    factor = min(SLICE_HEIGHT / height, MAX_SLICE_WIDTH / width)
    shape = (max(1, round(height * factor)), max(1, round(width * factor)))
    scale = (rows / shape[0], columns / shape[1])
    offset = (0.5 * scale[0] - 0.5, 0.5 * scale[1] - 0.5)  # pixel centres onto pixel centres
    data = image.astype(np.float32)
    if max(scale) > 1:  # shrinking: anti-alias first
        data = ndimage.gaussian_filter(data, [max(0.0, (s - 1) / 2) for s in scale], mode="nearest")
    out = ndimage.affine_transform(data, scale, offset=offset, output_shape=shape, order=1, mode="nearest")
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def _fonts(size: int) -> tuple[FontProperties, FontProperties, FontProperties]:
    """(title, prominent, body) fonts at body size `size` px: DejaVu Sans, bundled with matplotlib."""
    bold = FontProperties(fname=FONT_BOLD_FILE, size=size)
    prominent = FontProperties(fname=FONT_BOLD_FILE, size=round(PROMINENT_SCALE * size))
    return bold, prominent, FontProperties(fname=FONT_FILE, size=size)


_TEXT_WIDTHS: dict[tuple[str, str, float], float] = {}
_TEXT_WIDTHS_MAX = 4096


def _text_width(text: str, font: FontProperties, renderer) -> float:  # noqa: ANN001
    """Rendered width in px at 72 dpi, remembered: most lines of a report (the disclaimers, the model)
    are the same in every report, and measuring them was half of the text panel's ~45 ms."""
    key = (text, font.get_file(), font.get_size_in_points())
    width = _TEXT_WIDTHS.get(key)
    if width is None:
        width = renderer.get_text_width_height_descent(text, font, ismath=False)[0]
        if len(_TEXT_WIDTHS) >= _TEXT_WIDTHS_MAX:
            _TEXT_WIDTHS.clear()
        _TEXT_WIDTHS[key] = width
    return width


def _wrap(lines: list[str], width: float, fonts: list[FontProperties], renderer) -> list[list[str]]:  # noqa: ANN001
    """Greedy word wrap by the rendered width, only where a line does not fit; one list per line.

    A word wider than the panel (a long model id) breaks after "@", "-", "_" or "/"
    where it can, else between characters, rather than being cut off.
    """
    wrapped = []
    for line, font in zip(lines, fonts):
        def fits(text: str, font: FontProperties = font) -> bool:
            return _text_width(text, font, renderer) <= width

        def pieces(word: str) -> list[str]:
            out = []
            while len(word) > 1 and not fits(word):
                fitting = [n for n in range(len(word) - 1, 0, -1) if fits(word[:n])] or [1]
                cut = next((n for n in fitting if word[n - 1] in "@-_/"), fitting[0])  # after "@" in a model id
                out, word = [*out, word[:cut]], word[cut:]
            return [*out, word]

        rows, current = [], None
        for word in line.split(" "):
            if current is not None and (not word or fits(f"{current} {word}")):
                current = f"{current} {word}"
                continue
            if current is not None:
                rows.append(current.rstrip())
            *full, current = pieces(word)
            rows.extend(full)
        wrapped.append([*rows, current.rstrip()])
    return wrapped


def _layout(lines: list[str], width: int, size: int, prominent: int | None):  # noqa: ANN202
    """(rows as (top, text, font), height needed) for body font size `size`."""
    title, big, body = _fonts(size)
    fonts = [title if i == 0 else big if i == prominent else body for i in range(len(lines))]
    margin, gap = round(0.6 * size), round(0.5 * size)
    probe = FigureCanvasAgg(Figure(figsize=(width / 72, 1), dpi=72))
    paragraphs = _wrap(lines, width - 2 * margin, fonts, probe.get_renderer())
    rows, top = [], margin
    for paragraph, font in zip(paragraphs, fonts):
        leading = round(1.25 * font.get_size_in_points())
        for text in paragraph:
            rows.append((top, text, font))
            top += leading
        top += gap
    return rows, (top - gap + margin if rows else 2 * margin)


def render_text_panel(lines: list[str], width: int = PANEL_WIDTH, height: int = SLICE_HEIGHT,
                      prominent: int | None = 1) -> np.ndarray:
    """White text on black, `width` px wide, at least `height` px tall (uint8, rows x columns).

    The first line (the title) is bold, line `prominent` (the prediction) bold and
    larger, the rest regular. Lines wrap only where they do not fit the width. If
    the text needs more than `height`, the font shrinks step by step to FONT_MIN_PX;
    if it still needs more, the panel grows: text is never cut. Rendered with
    matplotlib's Agg canvas at 72 dpi, so font points are pixels.
    """
    for size in range(FONT_PX, FONT_MIN_PX - 1, -1):
        rows, needed = _layout(lines, width, size, prominent)
        if needed <= height:
            break
    height = max(height, needed)
    figure = Figure(figsize=(width / 72, height / 72), dpi=72, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    margin = round(0.6 * size)
    for top, text, font in rows:
        figure.text(margin, height - top, text, fontproperties=font, color="white",
                    va="top", ha="left", transform=IdentityTransform(), parse_math=False)
    canvas.draw()
    panel = np.asarray(canvas.buffer_rgba())[..., 0]
    out = np.zeros((height, width), dtype=np.uint8)  # the canvas may round a size by one pixel
    out[: min(height, panel.shape[0]), : min(width, panel.shape[1])] = panel[:height, :width]
    return out


def compose_result_pixels(pixels: np.ndarray, lines: list[str],
                          pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Landscape: the windowed, resampled slice on the left, the text panel on its right.

    The slice is SLICE_HEIGHT px tall (vertically centred should the panel have had to
    grow); width and height are even (no odd-length Pixel Data).
    """
    image = resample(window_to_uint8(pixels), pixel_spacing)
    panel_width = PANEL_WIDTH + (image.shape[1] % 2)
    panel = render_text_panel(lines, panel_width, SLICE_HEIGHT)
    height = max(panel.shape[0], image.shape[0])
    height += height % 2
    canvas = np.zeros((height, image.shape[1] + panel_width), dtype=np.uint8)
    top = (height - image.shape[0]) // 2
    canvas[top: top + image.shape[0], : image.shape[1]] = image
    canvas[: panel.shape[0], image.shape[1]:] = panel
    return canvas


def _ascii(text: str) -> str:
    """Header text in the default repertoire, whatever Specific Character Set came with the patient data."""
    return text.replace("\u2014", "-").replace("\u00a0", " ").encode("ascii", "replace").decode("ascii")


def _frame_group(source: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """First item of a functional group macro: the frame's own, else the shared one, else top level."""
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame and len(per_frame) >= frame and per_frame[frame - 1].get(sequence):
        return per_frame[frame - 1][sequence][0]
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(sequence):
        return shared[0][sequence][0]
    return source if "PerFrameFunctionalGroupsSequence" not in source else None


def _pixel_spacing(source: Dataset, frame: int | None) -> tuple[float, float]:
    """(row, column) spacing in mm for the square-pixel resample; (1, 1) when unknown or invalid."""
    group = _frame_group(source, frame, "PixelMeasuresSequence")
    spacing = group.get("PixelSpacing") if group is not None else None
    if spacing is None or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        return (1.0, 1.0)
    return (float(spacing[0]), float(spacing[1]))


def patient_orientation(source: Dataset, frame: int | None = None) -> list[str]:
    """Patient Orientation (row, column directions, e.g. ["P", "F"]) from the source's orientation, or [].

    An SC has no Image Orientation (Patient); these letters keep the image's sides
    nameable. Most significant letter first, as PS3.3 C.7.6.1.1.1 asks.
    """
    group = _frame_group(source, frame, "PlaneOrientationSequence")
    cosines = group.get("ImageOrientationPatient") if group is not None else None
    if cosines is None or len(cosines) != 6:
        return []
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    result = []
    for vector in (cosines[:3], cosines[3:]):
        order = sorted(range(3), key=lambda axis: -abs(float(vector[axis])))
        result.append("".join(letters[a][float(vector[a]) > 0] for a in order if abs(float(vector[a])) > 0.01))
    return result


def _check_inputs(pixels: np.ndarray, source: Dataset, frame: int | None, uids: dict[str, str]) -> None:
    """Refuse what would make a wrong or invalid object, naming the problem but never the patient."""
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"pixels must be a 2D slice (rows x columns), got shape {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.number) or np.issubdtype(pixels.dtype, np.complexfloating):
        raise ValueError(f"pixels must be real numbers, got dtype {pixels.dtype}")
    for attr in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(attr):
            raise ValueError(f"source header lacks {attr}")
    size = (source.get("Rows"), source.get("Columns"))
    if size not in ((None, None), pixels.shape):
        raise ValueError(f"pixels shape {pixels.shape} differs from the source's {size[0]} x {size[1]}")
    for name, uid in uids.items():
        if not isinstance(uid, str) or len(uid) > 64 or not _UID_RE.match(uid):
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    frames = int(source.get("NumberOfFrames") or 0)
    if frames > 1 and frame is None:
        raise ValueError(f"source is multi-frame ({frames} frames): referenced_frame_number is required")
    if frame is not None and not 1 <= frame <= frames:
        where = f"the source's frames 1..{frames}" if frames else "a single-frame source (pass None)"
        raise ValueError(f"referenced_frame_number {frame} is outside {where}")


def _copy_patient_study(source: Dataset, ds: Dataset) -> None:
    """Same patient and study as the source, so PACS files the image into the analysed study."""
    ds.StudyInstanceUID = source.StudyInstanceUID
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])
        else:
            setattr(ds, keyword, None)
    if ds.PatientSex not in (None, "", "M", "F", "O"):  # enumerated values; unknown becomes empty
        ds.PatientSex = None
    for keyword in _COPY_IF_PRESENT:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])


def _source_reference(source: Dataset, frame: int | None) -> Sequence:
    """General Reference module: the instance (and frame) the picture was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(PURPOSE_OF_REFERENCE)]
    return Sequence([item])


def _series_and_equipment(ds: Dataset, series_instance_uid: str, model: ModelInfo,
                          institution_name: str | None) -> None:
    """General Series, General Equipment and SC Equipment: a series of its own, made by this node."""
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = RESULT_IMAGE_SERIES_NUMBER
    ds.SeriesDescription = RESULT_IMAGE_SERIES_DESCRIPTION
    ds.BodyPartExamined = "BRAIN"  # unpaired, so no Laterality (dciodvfy asks for one while the part is unknown)
    ds.Manufacturer = MANUFACTURER
    if institution_name:
        ds.InstitutionName = institution_name[:64]
        if not institution_name.isascii() and "SpecificCharacterSet" not in ds:
            ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ManufacturerModelName = _ascii(model.model_id)[:64]
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"


def _image_modules(ds: Dataset, image: np.ndarray, source: Dataset, frame: int | None, lines: list[str]) -> None:
    """General Image, General Reference, SC Image, Image Pixel and an identity VOI window (8 bits as drawn)."""
    ds.InstanceNumber = 1
    ds.PatientOrientation = patient_orientation(source, frame) or None
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = DERIVATION_DESCRIPTION
    ds.SourceImageSequence = _source_reference(source, frame)
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = _ascii(" | ".join(lines))[:10240]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    ds.add_new(0x7FE00010, "OB", image.tobytes())


def build_result_image(
    pixels: np.ndarray,
    source: Dataset,
    prediction: Prediction,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    referenced_frame_number: int | None = None,
    institution_name: str | None = None,
    created: dt.datetime | None = None,
) -> Dataset:
    """Secondary Capture of the centre slice with the result written beside it, in the source's study.

    `pixels` is the slice as stored (rows x columns); `source` the header of its
    instance; a multi-frame source needs `referenced_frame_number`. `created` sets
    the creation, series, content and capture date/time (default: now).

    Burned In Annotation is "NO": PS3.3 C.7.6.1 (General Image) means text enough
    to identify the patient and the date of acquisition. The only text burned in is
    the result, the model and the use statements (no name, ID or date), so "NO" is
    true; the patient identifiers travel in the header, as in the source image.
    """
    pixels = np.asarray(pixels)
    _check_inputs(pixels, source, referenced_frame_number,
                  {"series_instance_uid": series_instance_uid, "sop_instance_uid": sop_instance_uid})
    lines = image_text_lines(prediction, model)
    image = compose_result_pixels(pixels, lines, _pixel_spacing(source, referenced_frame_number))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_instance_uid
    _copy_patient_study(source, ds)
    _series_and_equipment(ds, series_instance_uid, model, institution_name)
    _image_modules(ds, image, source, referenced_frame_number, lines)
    when = created or dt.datetime.now()
    day, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.SeriesDate, ds.ContentDate, ds.DateOfSecondaryCapture = day, day, day, day
    ds.InstanceCreationTime, ds.SeriesTime, ds.ContentTime, ds.TimeOfSecondaryCapture = time, time, time, time
    return ds
