"""Datasets of one series -> `Volume` (float32 array + LPS affine).

Pure: pydicom datasets in, `Volume` out; no pydicom object leaves this module.
highdicom does the geometry: it sorts single-frame slices by position (Philips
InstanceNumbers are not reliably in slice order), checks the spacing is even
and the orientation shared, and applies the modality LUT (RescaleSlope/
Intercept). Multi-frame Enhanced / Legacy Converted Enhanced MR objects go
through `highdicom.Image.get_volume()`.

Classic MR slices in the common form (monochrome, 8/16-bit integers, rescale
slope/intercept at most) take a fast path: highdicom still sorts the slices
and builds the affine (`get_volume_positions`, `Volume.from_attributes`), but
the pixels are stacked straight from native Pixel Data (pydicom's decoders for
compressed syntaxes) and rescaled exactly as highdicom does, without its
per-slice IOD lookups (most of a second at 170 slices). Anything else, and any
series the fast path doubts, goes through `get_volume_from_series`, which
also words the errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from model.sop_classes import MR_IMAGE_STORAGE, MULTIFRAME_SERIES_SOP_CLASSES

# Transfer syntaxes whose Pixel Data pydicom holds as native little-endian bytes (deflate is undone on read).
_NATIVE_LITTLE_ENDIAN = frozenset({
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
})
# Attributes that make highdicom's pixel transform more than rescale slope/intercept: left to highdicom.
_NOT_FAST = ("RealWorldValueMappingSequence", "ModalityLUTSequence", "PixelValueTransformationSequence",
             "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ICCProfile",
             "OpticalPathSequence", "FloatPixelData", "DoubleFloatPixelData", "ImageOrientationSlide",
             "ImageCenterPointCoordinatesSequence")

# What every slice of a plain classic series repeats. Where a slice's elements are byte for byte the
# first slice's (same VR, byte order, character set), so are their values: the checks and the pixel
# format are then decided once, on the first slice, instead of converting each value 170 times.
_UNIFORM_TAGS = tuple(tag_for_keyword(keyword) for keyword in (
    "SpecificCharacterSet", "SOPClassUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns",
    "ImageOrientationPatient", "PixelSpacing", "PhotometricInterpretation", "PresentationLUTShape",
    "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
))
_TRANSFER_SYNTAX_UID = tag_for_keyword("TransferSyntaxUID")

# Image storage SOP classes we can assemble (MR image, Enhanced MR, Legacy Converted Enhanced MR).
IMAGE_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, *MULTIFRAME_SERIES_SOP_CLASSES})
# Affine convention of highdicom and DICOM: columns map (i, j, k) voxel indices to LPS millimetres.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """The series cannot be assembled into one 3D volume; the message says why."""


@dataclass(frozen=True)
class Volume:
    """One 3D image. `array[i, j, k]` lies at `affine @ (i, j, k, 1)` in patient LPS mm."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str | None = None

    @property
    def ras_affine(self) -> np.ndarray:
        """The same affine in RAS (nibabel/MONAI convention)."""
        return LPS_TO_RAS @ self.affine


def _from_highdicom(vol: hd.Volume, datasets: Sequence[Dataset]) -> Volume:
    array = np.asarray(vol.array, dtype=np.float32)
    if array.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got array of shape {array.shape}")
    first = datasets[0]
    return Volume(
        array=array,
        affine=np.asarray(vol.affine, dtype=np.float64),
        spacing=tuple(float(s) for s in vol.spacing),
        study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
        series_instance_uid=str(first.get("SeriesInstanceUID", "")) or None,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")) or None,
    )


def _signature(ds: Dataset) -> tuple:
    """The _UNIFORM_TAGS elements and the transfer syntax, for equality only: raw ones as their
    bytes, converted ones as their values (a raw and a converted element never compare equal)."""
    elements = [ds.get_item(tag) if tag in ds else None for tag in _UNIFORM_TAGS]
    meta = getattr(ds, "file_meta", None)
    elements.append(meta.get_item(_TRANSFER_SYNTAX_UID) if meta is not None and _TRANSFER_SYNTAX_UID in meta else None)
    return tuple(
        None if e is None
        else ("raw", e.VR, e.is_implicit_VR, e.is_little_endian, e.value) if isinstance(e, RawDataElement)
        else ("value", e.VR, e.value)
        for e in elements
    )


def _uniform(datasets: Sequence[Dataset]) -> bool:
    """True when every slice repeats the first slice's _UNIFORM_TAGS (see there)."""
    first = _signature(datasets[0])
    return all(_signature(ds) == first for ds in datasets[1:])


def _check_classic(datasets: Sequence[Dataset], uniform: bool = False) -> None:
    """`uniform` (`_uniform(datasets)`): rows, columns and orientation are the first slice's throughout."""
    checked = datasets[:1] if uniform else datasets
    shapes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in checked)
    if len(shapes) > 1:
        raise VolumeError(f"slices have different rows x columns: {dict(shapes)}")
    orientations = Counter(tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", ())) for ds in checked)
    if len(orientations) > 1:
        raise VolumeError(f"slices have {len(orientations)} different orientations (mixed planes in one series)")
    if () in orientations:
        raise VolumeError("slices lack ImageOrientationPatient")
    if any("ImagePositionPatient" not in ds for ds in datasets):
        raise VolumeError("slices lack ImagePositionPatient")
    positions = [tuple(float(v) for v in ds.ImagePositionPatient) for ds in datasets]
    if len(set(positions)) < len(positions):
        raise VolumeError("two or more slices share one position (duplicate or mixed acquisitions)")


@dataclass(frozen=True)
class _PixelFormat:
    bits_allocated: int
    bits_stored: int
    signed: bool
    native: bool  # native little-endian Pixel Data, read in place

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")


def _pixel_format(ds: Dataset) -> _PixelFormat | None:
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        return None
    return _PixelFormat(bits_allocated, bits_stored, int(ds.PixelRepresentation) == 1,
                        str(ds.file_meta.TransferSyntaxUID) in _NATIVE_LITTLE_ENDIAN)


def _stored_frame(ds: Dataset, rows: int, columns: int, pixel_format: _PixelFormat | None = None) -> np.ndarray | None:
    """The stored values of one slice as pydicom's `pixel_array` gives them; None if unsure.

    Native little-endian data is read in place (values masked to Bits Stored, or
    sign-extended from it, as pydicom does); anything else goes through pydicom's decoders.
    `pixel_format` is the slice's `_pixel_format`, when already known.
    """
    pixel_format = pixel_format or _pixel_format(ds)
    if pixel_format is None:
        return None
    bits_allocated, bits_stored, signed = pixel_format.bits_allocated, pixel_format.bits_stored, pixel_format.signed
    dtype = pixel_format.dtype
    if not pixel_format.native:
        frame = ds.pixel_array
        same_type = frame.dtype.kind == dtype.kind and frame.dtype.itemsize == dtype.itemsize
        return frame if frame.shape == (rows, columns) and same_type else None
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * columns * dtype.itemsize:
        return None
    frame = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    unused = bits_allocated - bits_stored
    if unused and signed:
        frame = (frame << unused) >> unused
    elif unused:
        frame = frame & np.array((1 << bits_stored) - 1, dtype=dtype)
    return frame


def _rescale(ds: Dataset) -> tuple[np.float32, np.float32] | None:
    """highdicom's modality rescale for one slice, in float32 (None: identity)."""
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if not (slope or intercept):
        return None
    pair = (float(slope or 1.0), float(intercept or 0.0))
    if pair == (1.0, 0.0):
        return None
    return np.float64(pair[0]).astype(np.float32), np.float64(pair[1]).astype(np.float32)


def _fast_classic(datasets: Sequence[Dataset], uniform: bool | None = None) -> Volume | None:
    """`get_volume_from_series(datasets, dtype=float32)`, bit for bit, or None where it does not apply.

    `uniform`: `_uniform(datasets)`, when the caller knows it.
    """
    # Before any value below is read: reading converts the first slice's elements, and a converted
    # element never matches the other slices' raw ones.
    uniform = _uniform(datasets) if uniform is None else uniform
    first = datasets[0]
    if "FrameOfReferenceUID" not in first:
        return None
    rows, columns = int(first.Rows), int(first.Columns)
    orientation, pixel_spacing = first.ImageOrientationPatient, first.PixelSpacing
    if any("PixelData" not in ds or any(keyword in ds for keyword in _NOT_FAST) for ds in datasets):
        return None
    for ds in datasets[:1] if uniform else datasets:
        if (
            ds.get("SOPClassUID") != MR_IMAGE_STORAGE
            or ds.get("PhotometricInterpretation") != "MONOCHROME2"
            or ds.get("PresentationLUTShape", "IDENTITY") != "IDENTITY"
            or int(ds.get("SamplesPerPixel", 1)) != 1
            or getattr(ds, "file_meta", None) is None
            or "TransferSyntaxUID" not in ds.file_meta
            or ds.SeriesInstanceUID != first.SeriesInstanceUID
            or ds.FrameOfReferenceUID != first.FrameOfReferenceUID
            or ds.ImageOrientationPatient != orientation
            or ds.PixelSpacing != pixel_spacing
        ):
            return None
    spacing, indices = hd.spatial.get_volume_positions(
        image_positions=[ds.ImagePositionPatient for ds in datasets], image_orientation=orientation
    )
    if spacing is None or indices is None or sorted(indices) != list(range(len(datasets))):
        return None
    ordered = [datasets[indices.index(i)] for i in range(len(datasets))]
    array = np.empty((len(ordered), rows, columns), dtype=np.float32)
    pixel_format = _pixel_format(first) if uniform else None
    for k, ds in enumerate(ordered):
        frame = _stored_frame(ds, rows, columns, pixel_format)
        if frame is None:
            return None
        array[k] = frame  # integers of at most 16 bits: exact in float32
    rescales = [_rescale(first)] * len(ordered) if uniform else [_rescale(ds) for ds in ordered]
    # As highdicom: multiply only when the slope is not 1, add only when the intercept is not 0.
    shared = all(r == rescales[0] for r in rescales)
    for k, rescale in enumerate(rescales[:1] if shared else rescales):
        if rescale is None:
            continue
        target = array if shared else array[k]
        slope, intercept = rescale
        if slope != 1.0:
            target *= slope
        if intercept != 0.0:
            target += intercept
    volume = hd.Volume.from_attributes(
        array=array,
        image_position=ordered[0].ImagePositionPatient,
        image_orientation=orientation,
        pixel_spacing=pixel_spacing,
        spacing_between_slices=spacing,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        frame_of_reference_uid=first.FrameOfReferenceUID,
    )
    return _from_highdicom(volume, datasets)


def _fast_or_none(datasets: Sequence[Dataset], uniform: bool | None = None) -> Volume | None:
    """The fast path; whatever it stumbles on (a missing or malformed attribute) is highdicom's to judge."""
    try:
        return _fast_classic(datasets, uniform)
    except Exception:  # noqa: BLE001  highdicom's path decides, and words the error
        return None


def assemble_volume(datasets: Sequence[Dataset], *, fast: bool = True) -> Volume:
    """Assemble a series (single-frame slices or one multi-frame object).

    `fast=False` takes highdicom's `get_volume_from_series` for classic slices
    even where the fast path applies, and checks every slice (tests compare the two).
    """
    if not datasets:
        raise VolumeError("no instances in the series")
    images = [ds for ds in datasets if "PixelData" in ds or "FloatPixelData" in ds]
    if not images:
        raise VolumeError("the series holds no images (non-image objects only)")
    if len(images) != len(datasets):
        raise VolumeError(f"{len(datasets) - len(images)} instance(s) in the series are not images")
    multiframe = [ds for ds in images if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    try:
        if multiframe:
            if len(images) != 1:
                raise VolumeError(f"{len(images)} objects in a multi-frame series; expected exactly one")
            return _from_highdicom(hd.Image.from_dataset(images[0], copy=False).get_volume(dtype=np.float32), images)
        if len(images) == 1:
            raise VolumeError("a single 2D slice is not a 3D volume")
        uniform = fast and _uniform(images)
        _check_classic(images, uniform)
        volume = _fast_or_none(images, uniform) if fast else None
        if volume is None:
            volume = _from_highdicom(hd.get_volume_from_series(images, dtype=np.float32), images)
        return volume
    except VolumeError:
        raise
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError) as exc:
        raise VolumeError(f"cannot assemble a volume: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    lowered = text.lower()
    if "spacing" in lowered or "regular" in lowered or "equally" in lowered:
        return f"missing slices or uneven slice spacing ({text})"
    return text


def read_series_dir(path: Path) -> list[Dataset]:
    """Read every DICOM file directly in `path` (headers and pixels)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        raise VolumeError(f"{path} does not exist")
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file))
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise VolumeError(f"{file.name} is not a readable DICOM file: {exc}") from None
    if not datasets:
        raise VolumeError(f"no files in {path}")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(f"{path} holds {len(series)} series; give one series folder")
    return datasets


def load_nifti(path: Path) -> Volume:
    """A NIfTI file (research manifests) as a Volume; nibabel's RAS affine becomes LPS."""
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asarray(img.dataobj, dtype=np.float32)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D image, got shape {array.shape}")
    affine = LPS_TO_RAS @ img.affine  # the flip is its own inverse
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(array, affine, spacing, None, None, ())


def load_volume(path: Path) -> Volume:
    """A series folder, one multi-frame file or a NIfTI file."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        return load_nifti(path)
    return assemble_volume(read_series_dir(path))
