from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest

from model.synth import write_series
from model.volume import VolumeError, assemble_volume, load_volume, read_series_dir


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
    np.testing.assert_allclose(vb.array, va.array)
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
