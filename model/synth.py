"""Synthetic Philips-like 3D T1 studies for tests, benchmarks and the demo.

Nothing here is patient data: a geometric head phantom with T1-like contrast
(bright white matter, grey cortex, dark CSF), written as one MR Image Storage
file per slice the way a Philips Ingenia exports a T1W_3D_TFE series. Every
object says it is synthetic (PatientName, SeriesDescription, ImageComments).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - NOT PATIENT DATA"
# Orientation of the slice plane: (row direction, column direction) in LPS.
ORIENTATIONS = {
    "sag": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "ax": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "cor": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class SyntheticSeries:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    paths: tuple[Path, ...]


def phantom(shape: tuple[int, int, int], spacing: float = 1.0, seed: int = 0) -> np.ndarray:
    """Head phantom in (slice, row, column) order, uint16 stored values."""
    rng = np.random.default_rng(seed)
    n_s, n_r, n_c = shape
    s, r, c = np.meshgrid(
        (np.arange(n_s) - n_s / 2) * spacing,
        (np.arange(n_r) - n_r / 2) * spacing,
        (np.arange(n_c) - n_c / 2) * spacing,
        indexing="ij",
        sparse=True,
    )
    head = (s / 80) ** 2 + (r / 100) ** 2 + (c / 90) ** 2
    brain = (s / 68) ** 2 + (r / 88) ** 2 + (c / 78) ** 2
    white = (s / 48) ** 2 + (r / 66) ** 2 + (c / 56) ** 2
    ventricle = (s / 8) ** 2 + (r / 24) ** 2 + (c / 14) ** 2
    img = np.zeros(np.broadcast_shapes(s.shape, r.shape, c.shape), dtype=np.float32)
    img[head <= 1] = 300  # scalp / skull
    img[brain <= 1] = 600  # grey matter
    img[white <= 1] = 900  # white matter
    img[ventricle <= 1] = 120  # CSF
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_classic_series(
    out_dir: Path,
    slices: int = 170,
    rows: int = 256,
    columns: int = 256,
    orientation: str = "sag",
    seed: int = 0,
    study_instance_uid: str | None = None,
    series_description: str = "T1W_3D_TFE",
) -> SyntheticSeries:
    """Write one file per slice into `out_dir` (InstanceNumbers shuffled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    volume = phantom((slices, rows, columns), seed=seed)
    row_dir, col_dir = (np.array(v) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime(2026, 1, 1, 9, 0, 0)
    numbers = rng.permutation(slices) + 1
    origin = -(row_dir * columns + col_dir * rows + normal * slices) / 2
    sop_uids, paths = [], []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "SYNTHETIC^PHANTOM"
        ds.PatientID = f"SYNTH-{seed:06d}"
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "F"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
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
        ds.InstanceNumber = int(numbers[k])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "MP"
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 8.1
        ds.EchoTime = 3.7
        ds.FlipAngle = 8
        ds.SliceThickness = 1.0
        ds.SpacingBetweenSlices = 1.0
        ds.ImagesInAcquisition = slices
        ds.ImagePositionPatient = [float(x) for x in origin + normal * k]
        ds.ImageOrientationPatient = [float(x) for x in (*row_dir, *col_dir)]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1.25
        ds.RescaleType = "US"
        ds.PixelData = volume[k].tobytes()
        path = out_dir / f"IM_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        paths.append(path)
    return SyntheticSeries(study_uid, series_uid, tuple(sop_uids), tuple(paths))
