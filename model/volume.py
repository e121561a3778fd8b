"""Datasets of one series -> `Volume` (float32 array + LPS affine).

Pure: pydicom datasets in, `Volume` out; no pydicom object leaves this module.
highdicom does the geometry: it sorts single-frame slices by position (Philips
InstanceNumbers are not reliably in slice order), checks the spacing is even
and the orientation shared, and applies the modality LUT (RescaleSlope/
Intercept). Multi-frame Enhanced / Legacy Converted Enhanced MR objects go
through `highdicom.Image.get_volume()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from model.sop_classes import MR_IMAGE_STORAGE, MULTIFRAME_SERIES_SOP_CLASSES

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


def _check_classic(datasets: Sequence[Dataset]) -> None:
    shapes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets)
    if len(shapes) > 1:
        raise VolumeError(f"slices have different rows x columns: {dict(shapes)}")
    orientations = Counter(tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", ())) for ds in datasets)
    if len(orientations) > 1:
        raise VolumeError(f"slices have {len(orientations)} different orientations (mixed planes in one series)")
    if () in orientations:
        raise VolumeError("slices lack ImageOrientationPatient")
    if any("ImagePositionPatient" not in ds for ds in datasets):
        raise VolumeError("slices lack ImagePositionPatient")
    positions = [tuple(float(v) for v in ds.ImagePositionPatient) for ds in datasets]
    if len(set(positions)) < len(positions):
        raise VolumeError("two or more slices share one position (duplicate or mixed acquisitions)")


def assemble_volume(datasets: Sequence[Dataset]) -> Volume:
    """Assemble a series (single-frame slices or one multi-frame object)."""
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
        _check_classic(images)
        return _from_highdicom(hd.get_volume_from_series(images, dtype=np.float32), images)
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
