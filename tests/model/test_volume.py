from __future__ import annotations

import copy
import random
import re
import subprocess

import numpy as np
import pydicom
import pytest

from model.synth import write_series
from model.volume import VolumeError, _fast_classic, assemble_volume, load_volume, read_series_dir


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic")
    write_series(out, slices=24, rows=32, columns=32, spacing=4.0, seed=1)
    return out


def test_classic_series_is_sorted_by_position_not_instance_number(classic):
    datasets = read_series_dir(classic)
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers != sorted(numbers)  # the synthetic series shuffles them, as Philips can
    volume = assemble_volume(datasets)
    assert volume.array.shape == (24, 32, 32)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((4.0, 4.0, 4.0))
    # Slices ordered along the slice normal: the first index's position is the lowest.
    positions = sorted(np.array(ds.ImagePositionPatient, dtype=float) @ np.cross(
        np.array(ds.ImageOrientationPatient[:3], dtype=float), np.array(ds.ImageOrientationPatient[3:], dtype=float))
        for ds in datasets)
    assert len(positions) == 24
    # RescaleSlope 1.25 applied: stored max 4095 at most, real values may exceed.
    raw_max = max(int(ds.pixel_array.max()) for ds in datasets)
    assert volume.array.max() == pytest.approx(raw_max * 1.25)
    assert set(volume.sop_instance_uids) == {ds.SOPInstanceUID for ds in datasets}


def test_multiframe_matches_classic(tmp_path):
    a = write_series(tmp_path / "a", slices=20, rows=24, columns=24, spacing=4.0, seed=5)
    b = write_series(tmp_path / "b", slices=20, rows=24, columns=24, spacing=4.0, seed=5, enhanced=True)
    va, vb = load_volume(tmp_path / "a"), load_volume(tmp_path / "b")
    assert len(b.paths) == 1
    assert vb.array.shape == va.array.shape
    np.testing.assert_allclose(vb.affine, va.affine, atol=1e-3)
    # The classic series takes the fast path, the multi-frame object highdicom's: the same values.
    assert _fast_classic(read_series_dir(tmp_path / "a")) is not None
    np.testing.assert_array_equal(vb.array, va.array)
    assert a.series_instance_uid != b.series_instance_uid


def _reads(classic):
    return read_series_dir(classic)


def test_missing_slice_is_refused(classic):
    datasets = _reads(classic)
    datasets.sort(key=lambda ds: float(ds.SliceLocation))
    del datasets[10]
    with pytest.raises(VolumeError, match="spacing|missing"):
        assemble_volume(datasets)


def test_mixed_orientation_is_refused(classic):
    datasets = _reads(classic)
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(VolumeError, match="orientation"):
        assemble_volume(datasets)


def test_varying_matrix_is_refused(classic):
    datasets = _reads(classic)
    odd = datasets[2]
    odd.Rows, odd.Columns = 16, 16
    odd.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
    with pytest.raises(VolumeError, match="rows x columns"):
        assemble_volume(datasets)


def test_single_slice_and_non_images_are_refused(classic):
    datasets = _reads(classic)
    with pytest.raises(VolumeError, match="single 2D slice"):
        assemble_volume(datasets[:1])
    sr = copy.deepcopy(datasets[0])
    del sr.PixelData
    with pytest.raises(VolumeError, match="not images"):
        assemble_volume([*datasets, sr])
    with pytest.raises(VolumeError, match="no images"):
        assemble_volume([sr])
    with pytest.raises(VolumeError, match="no instances"):
        assemble_volume([])


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(VolumeError, match="junk.dcm"):
        read_series_dir(tmp_path)


def test_nifti_loads_with_lps_affine(tmp_path):
    import nibabel as nib

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "x.nii.gz")
    volume = load_volume(tmp_path / "x.nii.gz")
    assert volume.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(volume.ras_affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert pydicom is not None


# ---- the fast path for classic slices: bit for bit what highdicom's get_volume_from_series gives ----


def _assert_same_volume(fast, slow) -> None:
    assert fast.array.dtype == slow.array.dtype == np.float32
    assert fast.array.shape == slow.array.shape
    assert fast.array.tobytes() == slow.array.tobytes()  # bit for bit: -0.0 is not 0.0 here
    assert fast.affine.dtype == slow.affine.dtype and fast.affine.tobytes() == slow.affine.tobytes()
    assert fast.spacing == slow.spacing
    assert (fast.study_instance_uid, fast.series_instance_uid, fast.sop_instance_uids, fast.frame_of_reference_uid) \
        == (slow.study_instance_uid, slow.series_instance_uid, slow.sop_instance_uids, slow.frame_of_reference_uid)


def _fast_matches_highdicom(datasets) -> None:
    """The fast path takes the series and gives what highdicom gives; so does assemble_volume."""
    datasets = list(datasets)
    random.Random(3).shuffle(datasets)  # arrival order is not slice order
    slow = assemble_volume(datasets, fast=False)
    fast = _fast_classic(datasets)
    assert fast is not None, "the fast path declined a series it is meant to take"
    _assert_same_volume(fast, slow)
    _assert_same_volume(assemble_volume(datasets), slow)


def test_fast_path_matches_highdicom_on_a_classic_series(classic):
    _fast_matches_highdicom(read_series_dir(classic))


def test_fast_path_matches_highdicom_on_an_oblique_series_with_per_slice_rescale(tmp_path):
    write_series(tmp_path, slices=12, rows=16, columns=20, spacing=2.5, orientation="obl", seed=2)
    datasets = read_series_dir(tmp_path)
    # Philips scales each slice on its own; some slices have the identity, one no rescale at all.
    rescales = [(1.25, 0), (0.7071, -1024), (1, 0), (2, 0.5), ("", ""), (-1.5, 0), (-0.3333, 0.1)]
    for k, ds in enumerate(datasets):
        pixels = ds.pixel_array.copy()
        pixels[0, :3] = 0  # a negative slope makes these -0.0, which an added intercept of 0 would undo
        ds.PixelData = pixels.tobytes()
        slope, intercept = rescales[k % len(rescales)]
        if slope == "":
            del ds.RescaleSlope, ds.RescaleIntercept
        else:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    _fast_matches_highdicom(datasets)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", [(16, 12), (16, 16), (8, 8), (8, 6)], ids=lambda b: f"{b[0]}-{b[1]}bit")
def test_fast_path_matches_highdicom_on_stored_bits(classic, bits, signed):
    """Values beyond Bits Stored are masked (unsigned) or sign-extended (signed), as pydicom does."""
    allocated, stored = bits
    rng = np.random.default_rng(allocated + stored + signed)
    datasets = read_series_dir(classic)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    for ds in datasets:
        raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(ds.Rows, ds.Columns), endpoint=True)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
        ds.PixelRepresentation = int(signed)
        ds.PixelData = raw.astype(dtype).tobytes()  # every bit set somewhere, unused high bits included
    _fast_matches_highdicom(datasets)


# DCMTK re-encodes the series; the fast path reads native little endian in place, the rest through pydicom.
ENCODERS = {
    "implicit-vr": ("/usr/bin/dcmconv", "+ti"),
    "big-endian": ("/usr/bin/dcmconv", "+tb"),
    "deflated": ("/usr/bin/dcmconv", "+td"),
    "rle": ("/usr/bin/dcmcrle", "+un"),
    "jpeg-ls-lossless": ("/usr/bin/dcmcjpls", "+el", "+un"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_fast_path_matches_highdicom_in_other_transfer_syntaxes(classic, tmp_path, encoding):
    for src in sorted(classic.iterdir()):
        subprocess.run([*ENCODERS[encoding], str(src), str(tmp_path / src.name)], check=True, capture_output=True,
                       timeout=60)
    datasets = read_series_dir(tmp_path)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} != {"1.2.840.10008.1.2.1"}
    _fast_matches_highdicom(datasets)


def _monochrome1(ds) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


def _modality_lut(ds) -> None:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = list(range(4095, -1, -1))
    ds.ModalityLUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept


def _real_world_values(ds) -> None:
    item = pydicom.Dataset()
    item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = 0, 4095
    item.RealWorldValueSlope, item.RealWorldValueIntercept = 0.5, 3.0
    item.LUTLabel, item.LUTExplanation = "T1", "synthetic"
    ds.RealWorldValueMappingSequence = [item]


def _enhanced_sop_class(ds) -> None:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"


@pytest.mark.parametrize("change", [_monochrome1, _modality_lut, _real_world_values, _enhanced_sop_class],
                         ids=lambda f: f.__name__.strip("_"))
def test_fast_path_leaves_other_pixel_transforms_to_highdicom(classic, change):
    datasets = read_series_dir(classic)
    for ds in datasets:
        change(ds)
    assert _fast_classic(datasets) is None
    try:
        expected = assemble_volume(datasets, fast=False)
    except VolumeError as exc:
        with pytest.raises(VolumeError, match=re.escape(str(exc))):
            assemble_volume(datasets)
    else:
        _assert_same_volume(assemble_volume(datasets), expected)


# ---- slices read from disk keep their values raw: what one slice alone changes must still be seen ----


def _one_rescaled(ds) -> None:
    ds.RescaleSlope = "2"


def _one_smaller(ds) -> None:
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()


def _one_turned(ds) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]


def _one_signed(ds) -> None:
    ds.PixelRepresentation = 1
    ds.PixelData = (ds.pixel_array.astype(np.int32) - 2000).astype(np.int16).tobytes()  # negative values


def _one_of_another_series(ds) -> None:
    uid = str(ds.SeriesInstanceUID)
    ds.SeriesInstanceUID = uid[:-1] + ("2" if uid[-1] == "1" else "1")


ONE_SLICE_CHANGES = [_one_rescaled, _monochrome1, _one_smaller, _one_turned, _one_signed, _one_of_another_series,
                     _real_world_values]


@pytest.mark.parametrize("change", ONE_SLICE_CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_one_slice_that_differs_on_disk_is_judged_as_highdicom_judges_it(classic, tmp_path, change):
    """The fast path decides the format once when every slice repeats the first one's bytes
    (model.volume._uniform): a single slice whose file says otherwise must still be read as highdicom
    reads it, or refused with highdicom's reason."""
    from model.volume import _uniform

    for k, src in enumerate(sorted(classic.iterdir())):
        ds = pydicom.dcmread(src)
        if k == 7:
            change(ds)
        ds.save_as(tmp_path / src.name)
    assert _uniform(read_series_dir(classic))
    try:
        expected = assemble_volume(read_series_dir(tmp_path), fast=False)
    except VolumeError as exc:
        with pytest.raises(VolumeError, match=re.escape(str(exc))):
            assemble_volume(read_series_dir(tmp_path))
    else:
        _assert_same_volume(assemble_volume(read_series_dir(tmp_path)), expected)
