"""Synthetic Philips-like 3D T1 studies for tests, benchmarks and the demo.

Nothing here is patient data: a head phantom with T1-like contrast (bright
white matter, grey cortex, dark CSF) defined in patient space, so the same head
can be written as a sagittal, axial or oblique acquisition, as one MR Image
Storage file per slice (as a Philips Ingenia exports T1W_3D_TFE) or as one
multi-frame Legacy Converted Enhanced MR object. Every object says it is
synthetic (PatientName, SeriesDescription, ImageComments).

`responder=True` plants a learnable feature (a small bright ellipsoid near the
midline) so the demo model has something real to learn; it has no clinical
meaning whatsoever.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - NOT PATIENT DATA"
SERIES_DESCRIPTION = "T1W_3D_TFE"
FEATURE_CENTER_MM = np.array([0.0, -18.0, 12.0])  # LPS
FEATURE_RADII_MM = np.array([9.0, 12.0, 9.0])
EDGE_MM = 0.5  # narrowest soft edge of a structure (tanh scale, mm): an MR image is band-limited


def _rotation_x(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


# Slice plane (row direction, column direction) in LPS for each orientation.
ORIENTATIONS: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "sag": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "ax": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    "cor": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    # Sagittal tilted 15 degrees about the left-right axis, as a planner would align it to AC-PC.
    "obl": (_rotation_x(15) @ np.array([0.0, 1.0, 0.0]), _rotation_x(15) @ np.array([0.0, 0.0, -1.0])),
}


@dataclass(frozen=True)
class Subject:
    """Per-subject variation, so a model must generalise rather than memorise."""

    scale: float = 1.0
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gain: float = 1.0
    responder: bool = False
    noise: float = 12.0
    # Opacity of the planted feature (responders only): below 1 a borderline case for tests.
    feature_strength: float = 1.0

    @classmethod
    def random(cls, rng: np.random.Generator, responder: bool) -> Subject:
        return cls(
            scale=float(rng.uniform(0.92, 1.08)),
            shift_mm=tuple(float(v) for v in rng.uniform(-4, 4, 3)),
            gain=float(rng.uniform(0.85, 1.15)),
            responder=responder,
        )


def head_intensity(
    points_lps: np.ndarray, subject: Subject, rng: np.random.Generator, edge_mm: float = EDGE_MM
) -> np.ndarray:
    """Stored T1-like values (0-4095) at patient-space points of shape (..., 3).

    `edge_mm`: width of every structure's soft edge; an acquisition at coarser
    voxels sees wider edges (synthetic_volume passes half its spacing).
    """
    p = (points_lps - np.asarray(subject.shift_mm)) / subject.scale
    x, y, z = p[..., 0], p[..., 1], p[..., 2]

    def inside(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        """How much of the point lies inside the ellipsoid (0..1), with a ~1 mm soft edge.

        An MR image is band-limited (it is reconstructed from k-space); a hard
        edge sampled at points would alias, so the same head sampled at another
        slice position or angle would hold a different amount of each structure.
        """
        radius = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
        distance_mm = (radius - 1.0) * (sum(r) / 3)  # approximate signed distance to the surface
        return 0.5 * (1.0 - np.tanh(distance_mm / edge_mm))

    def paint(c: tuple[float, float, float], r: tuple[float, float, float], value: float, opacity: float = 1.0) -> None:
        weight = inside(c, r) * opacity
        img[...] = img * (1.0 - weight) + value * weight

    img = np.zeros(x.shape, dtype=np.float32)
    paint((0, 0, 0), (76, 96, 86), 320)  # scalp
    paint((0, 0, 0), (70, 90, 80), 80)  # skull / CSF rim
    paint((0, 0, 2), (66, 86, 74), 560)  # grey matter
    paint((0, 2, 6), (50, 68, 54), 860)  # white matter
    for side in (-1, 1):  # lateral ventricles
        paint((side * 9, -4, 14), (6, 26, 9), 110)
    paint((0, 38, -38), (16, 14, 12), 600)  # cerebellum
    if subject.responder:
        paint(tuple(FEATURE_CENTER_MM), tuple(FEATURE_RADII_MM), 1250, subject.feature_strength)
    img *= subject.gain
    img += rng.normal(0, subject.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095)


@dataclass(frozen=True)
class SyntheticSeries:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    paths: tuple[Path, ...]


def _geometry(orientation: str, slices: int, rows: int, columns: int, spacing: float,
              fov_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}")
    row_dir, col_dir = ORIENTATIONS[orientation]
    normal = np.cross(row_dir, col_dir)
    # First voxel centre such that the field of view is centred on the patient origin, moved by
    # `fov_offset_mm` (LPS), as a technologist places the box by hand.
    origin = -spacing * (row_dir * (columns - 1) + col_dir * (rows - 1) + normal * (slices - 1)) / 2
    return row_dir, col_dir, normal, origin + np.asarray(fov_offset_mm, dtype=np.float64)


Intensity = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""Stored values at patient-space LPS points of shape (..., 3): another head than the phantom."""


def synthetic_volume(
    slices: int, rows: int, columns: int, spacing: float, orientation: str, subject: Subject, seed: int,
    fov_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), intensity: Intensity | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 array of shape (slices, rows, columns), positions of each slice)."""
    rng = np.random.default_rng(seed)
    row_dir, col_dir, normal, origin = _geometry(orientation, slices, rows, columns, spacing, fov_offset_mm)
    r = np.arange(rows)[:, None, None] * spacing * col_dir
    c = np.arange(columns)[None, :, None] * spacing * row_dir
    plane = r + c  # (rows, columns, 3)
    out = np.empty((slices, rows, columns), dtype=np.float32)
    positions = np.array([origin + normal * spacing * k for k in range(slices)])
    for k in range(slices):
        points = plane + positions[k]
        if intensity is None:
            out[k] = head_intensity(points, subject, rng, edge_mm=max(EDGE_MM, 0.5 * spacing))
        else:
            out[k] = intensity(points, rng)
    # Partial-volume blur (~1.2 mm FWHM): real images have no perfectly sharp edges.
    out = ndimage.gaussian_filter(out, sigma=0.5 / spacing)
    return np.clip(out, 0, 4095).astype(np.uint16), positions


def synthetic_volume_object(
    subject: Subject, seed: int, spacing: float = 2.0, shape: tuple[int, int, int] = (90, 128, 128),
    orientation: str = "sag", fov_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    intensity: Intensity | None = None,
):
    """The phantom as an in-memory `model.volume.Volume` (no DICOM): fast training data."""
    from model.volume import Volume

    slices, rows, columns = shape
    array, positions = synthetic_volume(slices, rows, columns, spacing, orientation, subject, seed, fov_offset_mm,
                                        intensity)
    row_dir, col_dir, normal, origin = _geometry(orientation, slices, rows, columns, spacing, fov_offset_mm)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = normal * spacing, col_dir * spacing, row_dir * spacing, origin
    return Volume(array.astype(np.float32) * 1.25, affine, (spacing,) * 3, None, None, ())


def _base_dataset(
    study_uid: str, series_uid: str, frame_uid: str, seed: int, series_description: str, patient_id: str | None
) -> Dataset:
    when = dt.datetime(2026, 1, 1, 9, 0, 0)
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = patient_id or f"SYNTH-{seed:06d}"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"SYN{seed:06d}"
    ds.StudyID = "1"
    ds.StudyDescription = "MRI BRAIN (SYNTHETIC)"
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.Manufacturer = "Philips"
    ds.ManufacturerModelName = "Ingenia"
    ds.MagneticFieldStrength = 3
    ds.SeriesDescription = series_description
    ds.ProtocolName = series_description
    ds.ImageComments = SYNTHETIC_NOTE
    ds.SeriesNumber = 301
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "MP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = 8.1
    ds.EchoTime = 3.7
    ds.FlipAngle = 8
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1.25
    ds.RescaleType = "US"
    ds.WindowCenter = 600
    ds.WindowWidth = 1200
    return ds


def write_series(
    out_dir: Path,
    slices: int = 170,
    rows: int = 256,
    columns: int = 256,
    spacing: float = 1.0,
    orientation: str = "sag",
    responder: bool = False,
    enhanced: bool = False,
    seed: int = 0,
    subject: Subject | None = None,
    study_instance_uid: str | None = None,
    series_description: str = SERIES_DESCRIPTION,
    patient_id: str | None = None,
    fov_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    intensity: Intensity | None = None,
) -> SyntheticSeries:
    """Write one synthetic 3D T1 series into `out_dir` (shuffled InstanceNumbers).

    A second series of the same study needs the same `study_instance_uid`
    and `patient_id` (PACS key studies by patient and study).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subject = subject or Subject(responder=responder)
    volume, positions = synthetic_volume(slices, rows, columns, spacing, orientation, subject, seed, fov_offset_mm,
                                         intensity)
    row_dir, col_dir, _, _ = _geometry(orientation, slices, rows, columns, spacing, fov_offset_mm)
    rng = np.random.default_rng(seed + 1)
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    numbers = rng.permutation(slices) + 1
    datasets = []
    for k in range(slices):
        ds = _base_dataset(study_uid, series_uid, frame_uid, seed, series_description, patient_id)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(numbers[k])
        ds.SliceThickness = spacing
        ds.SpacingBetweenSlices = spacing
        ds.ImagesInAcquisition = slices
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = round(float(positions[k] @ np.cross(row_dir, col_dir)), 4)
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelData = volume[k].tobytes()
        datasets.append(ds)
    if enhanced:
        return _write_multiframe(out_dir, datasets, series_uid, study_uid)
    paths = []
    for k, ds in enumerate(datasets):
        path = out_dir / f"IM_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return SyntheticSeries(study_uid, series_uid, tuple(ds.SOPInstanceUID for ds in datasets), tuple(paths))


def _write_multiframe(out_dir: Path, datasets: list[Dataset], series_uid: str, study_uid: str) -> SyntheticSeries:
    """One Legacy Converted Enhanced MR object built by highdicom from the slices."""
    import highdicom as hd

    sop_uid = generate_uid()
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=series_uid,
        series_number=int(datasets[0].SeriesNumber),
        sop_instance_uid=sop_uid,
        instance_number=1,
    )
    image.ImagesInAcquisition = 1
    image.ImageComments = SYNTHETIC_NOTE
    path = out_dir / "IM_0000.dcm"
    image.save_as(path, enforce_file_format=True)
    return SyntheticSeries(study_uid, series_uid, (sop_uid,), (path,))


def write_classic_series(out_dir: Path, **kwargs) -> SyntheticSeries:  # noqa: ANN003
    """Kept for callers that want the classic one-file-per-slice form explicitly."""
    return write_series(out_dir, enhanced=False, **kwargs)
