from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from model.demo import build_demo_model, demo_input_spec
from model.predict import Predictor
from model.preprocess import DEMO_SPEC, PAPER_SPEC, InputSpec, build_transform, head_centre, preprocess, preprocess_volume
from model.synth import FEATURE_CENTER_MM, Subject, synthetic_volume_object, write_series
from model.volume import load_volume
from tests.model.anatomy import mni_intensity


def test_paper_spec_is_the_papers_grid():
    assert PAPER_SPEC.spacing == (1.0, 1.0, 1.0)
    assert PAPER_SPEC.shape == (170, 256, 256)


def test_input_spec_parsing_and_validation():
    assert InputSpec.parse("spacing=4,4,4;shape=44,64,64") == DEMO_SPEC
    assert InputSpec.parse('{"spacing": [2, 2, 2], "shape": [8, 8, 8]}').shape == (8, 8, 8)
    with pytest.raises(ValueError, match="unknown input-spec key"):
        InputSpec.parse("voxel=1")
    with pytest.raises(ValueError, match="orientation"):
        InputSpec(orientation="XYZ")
    with pytest.raises(ValueError, match="spacing"):
        InputSpec(spacing=(1.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def three_acquisitions(tmp_path_factory):
    """The same head (same subject, with the planted feature) as sagittal, axial and oblique series."""
    root = tmp_path_factory.mktemp("orient")
    subject = Subject(responder=True)
    out = {}
    for orientation in ("sag", "ax", "obl"):
        write_series(root / orientation, slices=90, rows=120, columns=120, spacing=2.0,
                     orientation=orientation, subject=subject, seed=3)
        out[orientation] = load_volume(root / orientation)
    return out


def _peak(t: torch.Tensor) -> torch.Tensor:
    """Centre (voxel indices) of the brightest 0.1%: the planted feature."""
    return torch.nonzero(t[0] > t[0].quantile(0.999)).float().mean(0)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_orientations_agree_after_preprocessing(three_acquisitions):
    tensors = {k: preprocess(v, DEMO_SPEC) for k, v in three_acquisitions.items()}
    for tensor in tensors.values():
        assert tensor.shape == (1, *DEMO_SPEC.shape)
        assert tensor.dtype == torch.float32
    sag = tensors["sag"]
    assert _corr(sag, tensors["ax"]) > 0.97
    assert _corr(sag, tensors["obl"]) > 0.95
    assert float((sag - tensors["ax"]).abs().mean()) < 0.1
    # The planted feature lands in the same place whatever the acquisition plane.
    peaks = {k: _peak(t) for k, t in tensors.items()}
    assert torch.allclose(peaks["sag"], peaks["ax"], atol=2.0)  # voxels of 4 mm; the feature is 18 mm off-centre
    assert torch.allclose(peaks["sag"], peaks["obl"], atol=2.0)


def test_a_flipped_acquisition_would_be_caught(three_acquisitions):
    """Guard for the test above: an anterior-posterior or up-down mix-up moves the feature far."""
    sag = preprocess(three_acquisitions["sag"], DEMO_SPEC)
    for dim in (2, 3):
        moved = (_peak(sag) - _peak(torch.flip(sag, dims=[dim]))).abs().max()
        assert moved > 3.0  # more than the 2-voxel tolerance of the agreement test


@pytest.mark.fullsize
def test_paper_size_tensor(three_acquisitions):
    tensor = preprocess(three_acquisitions["sag"], PAPER_SPEC)
    assert tensor.shape == (1, 170, 256, 256)
    assert torch.isfinite(tensor).all()
    sample = tensor.flatten()[::97]
    assert 0.5 < float(sample.quantile(0.99)) < 5.0  # z-scored over the head


# --- The same head gives the same answer -------------------------------------------------------------
# One head "acquired" as a technologist might: sagittal, axial, oblique, with the field of view moved by
# hand, with fewer slices. Sources at 2 mm keep it fast; the network's grid is 4 mm (DEMO_SPEC) or the
# demo model's 6 mm.

SUBJECT = Subject(responder=True, shift_mm=(2.0, -3.0, 1.0))
ACQUISITIONS = {
    "sagittal": dict(orientation="sag"),
    "axial": dict(orientation="ax", shape=(100, 128, 128)),  # a 200 mm slab: the whole head
    "oblique": dict(orientation="obl"),
    # 20 mm anterior and 15 mm inferior of the head, as a hurried technologist places it (LPS).
    "sagittal, FOV 20 mm anterior 15 mm inferior": dict(orientation="sag", fov_offset_mm=(0.0, -20.0, -15.0)),
    "sagittal, 81 slices": dict(orientation="sag", shape=(81, 128, 128)),  # still the whole head
    "axial, FOV moved 7/9/11 mm": dict(orientation="ax", shape=(100, 128, 128), fov_offset_mm=(7.0, 9.0, -11.0)),
}
OFFSET = "sagittal, FOV 20 mm anterior 15 mm inferior"
SPECS = [DEMO_SPEC, demo_input_spec()]


def _acquire(intensity=None, subject: Subject = SUBJECT) -> dict:
    return {name: synthetic_volume_object(subject, seed=3, spacing=2.0, intensity=intensity,
                                          **{"shape": (85, 128, 128), **kwargs})
            for name, kwargs in ACQUISITIONS.items()}


@pytest.fixture(scope="module")
def phantom_acquisitions():
    return _acquire()


@pytest.fixture(scope="module")
def anatomy_acquisitions():
    """Real anatomy: the MNI152 brain (tests/model/anatomy.py) in the same acquisitions."""
    return _acquire(mni_intensity)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.spacing[0]:g}mm")
@pytest.mark.parametrize("head", ["phantom", "anatomy"])
def test_the_same_head_gives_the_same_tensor(head, spec, request):
    volumes = request.getfixturevalue(f"{head}_acquisitions")
    transform = build_transform(spec)
    tensors = {name: preprocess(volume, spec, transform) for name, volume in volumes.items()}
    reference = tensors["sagittal"]
    for name, tensor in tensors.items():
        assert _corr(reference, tensor) >= 0.995, f"{head} {name}: correlation {_corr(reference, tensor):.4f}"


@pytest.mark.parametrize("head", ["phantom", "anatomy"])
def test_a_grid_placed_by_the_field_of_view_would_be_caught(head, request):
    """Guard for the test above: centring on the acquired field of view (what earlier releases
    effectively did) moves the moved-FOV acquisition far below the 0.995 threshold (0.74 with anatomy)."""
    volumes = request.getfixturevalue(f"{head}_acquisitions")
    spec = replace(DEMO_SPEC, centring="fov")
    assert _corr(preprocess(volumes["sagittal"], spec), preprocess(volumes[OFFSET], spec)) < 0.95


def test_the_grid_lies_where_its_affine_says(phantom_acquisitions):
    """The planted feature (its centre known in patient space) is where the tensor's affine puts it,
    whatever the acquisition: so the NIfTI that `preprocess` writes overlays the source exactly.
    The feature is found as the peak of (responder - same head without it), smoothed."""
    feature_ras = (FEATURE_CENTER_MM * SUBJECT.scale + np.asarray(SUBJECT.shift_mm)) * np.array([-1.0, -1.0, 1.0])
    without = _acquire(subject=replace(SUBJECT, responder=False))
    for name in ("sagittal", "oblique", OFFSET):
        out = preprocess_volume(phantom_acquisitions[name], DEMO_SPEC)
        plain = preprocess_volume(without[name], DEMO_SPEC)
        assert np.allclose(out.affine, plain.affine, atol=0.01)  # the feature does not move the grid
        difference = ndimage.gaussian_filter((out.tensor - plain.tensor)[0].numpy(), 1.0)
        peak = np.append(np.unravel_index(np.argmax(difference), difference.shape), 1.0)
        found = (out.affine @ peak)[:3]
        # Within 2.5 mm on a 4 mm grid: a flipped axis or a one-voxel shift would be 4 mm or more off.
        assert np.abs(found - feature_ras).max() < 2.5, f"{name}: feature at {found}, expected {feature_ras}"
        middle = np.append((np.asarray(DEMO_SPEC.shape) - 1) / 2, 1.0)
        assert np.allclose((out.affine @ middle)[:3], out.head_centre_ras)


def test_the_head_centre_ignores_the_field_of_view_and_the_neck(phantom_acquisitions):
    centres = {name: head_centre(volume) for name, volume in phantom_acquisitions.items()}
    for name, centre in centres.items():
        assert np.abs(centre - centres["sagittal"]).max() < 1.0, f"{name}: {centre} vs {centres['sagittal']}"
    # A neck below the head (a column of tissue) does not move the centre: only the top 180 mm count.
    volume = phantom_acquisitions["sagittal"]
    array = volume.array.copy()
    inferior_rows = slice(array.shape[1] - 10, array.shape[1])  # column direction runs inferior (LPS -z)
    array[35:50, inferior_rows, 55:75] = 600.0
    necked = replace(volume, array=array)
    assert np.abs(head_centre(necked) - centres["sagittal"]).max() < 1.0


def test_dicom_classic_and_enhanced_acquisitions_agree(tmp_path):
    """Through real files: classic sagittal slices, an oblique Enhanced MR object, axial slices."""
    series = {
        "sagittal": dict(orientation="sag"),
        "oblique enhanced": dict(orientation="obl", enhanced=True),
        "axial moved": dict(orientation="ax", slices=100, fov_offset_mm=(0.0, -10.0, 5.0)),
    }
    tensors = {}
    for name, kwargs in series.items():
        write_series(tmp_path / name.replace(" ", "_"), **{"slices": 85, "rows": 128, "columns": 128,
                                                           "spacing": 2.0, "subject": SUBJECT, "seed": 3, **kwargs})
        tensors[name] = preprocess(load_volume(tmp_path / name.replace(" ", "_")), DEMO_SPEC)
    for name, tensor in tensors.items():
        assert _corr(tensors["sagittal"], tensor) >= 0.995, name


def test_checkpoints_from_before_head_centring_keep_their_grid():
    legacy = {"orientation": "RAS", "spacing": [4, 4, 4], "shape": [44, 64, 64], "normalisation": "zscore_foreground"}
    assert InputSpec.from_json(legacy).centring == "fov"
    assert InputSpec().centring == "head" and InputSpec.from_json(InputSpec().to_json()).centring == "head"
    with pytest.raises(ValueError, match="centring"):
        InputSpec(centring="scanner")
    with pytest.raises(ValueError, match="orientation"):
        InputSpec(orientation="RRS")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The synthetic demo model, built by our own code as `make demo` builds it (about a minute)."""
    out = tmp_path_factory.mktemp("demo-model")
    build_demo_model(out, progress=False)
    return out


# At the scanner's own 1 mm: a borderline probability is steep enough that the aliasing of a
# 2 mm source (a synthetic shortcut, not what a scanner sends) would move it by itself.
ACQUISITIONS_1MM = {
    "sagittal": dict(orientation="sag"),
    "axial": dict(orientation="ax", shape=(200, 256, 256)),
    "oblique": dict(orientation="obl"),
    OFFSET: dict(orientation="sag", fov_offset_mm=(0.0, -20.0, -15.0)),
    "sagittal, 161 slices": dict(orientation="sag", shape=(161, 256, 256)),
    "axial, FOV moved 7/9/5 mm": dict(orientation="ax", shape=(200, 256, 256), fov_offset_mm=(7.0, 9.0, 5.0)),
}


def _acquire_1mm(subject: Subject, names=ACQUISITIONS_1MM) -> dict:
    return {name: synthetic_volume_object(subject, seed=3, spacing=1.0, **{"shape": (170, 256, 256),
                                                                          **ACQUISITIONS_1MM[name]})
            for name in names}


def _borderline(predictor: Predictor) -> Subject:
    """The head with its planted feature faded until the model scores its sagittal acquisition
    between 0.35 and 0.65, where a probability moves most with its input."""
    low, high = 0.0, 1.0
    for _ in range(8):
        subject = replace(SUBJECT, feature_strength=(low + high) / 2)
        probability = predictor.predict_volume(_acquire_1mm(subject, ["sagittal"])["sagittal"]).probability
        if 0.35 < probability < 0.65:
            break
        low, high = (subject.feature_strength, high) if probability < 0.5 else (low, subject.feature_strength)
    return subject


def test_the_same_head_gets_the_same_probability(demo_checkpoint):
    predictor = Predictor(demo_checkpoint, device="cpu")
    volumes = _acquire_1mm(_borderline(predictor))
    probabilities = {name: predictor.predict_volume(v).probability for name, v in volumes.items()}
    assert 0.3 < probabilities["sagittal"] < 0.7  # not saturated: a moved input would move it
    spread = max(probabilities.values()) - min(probabilities.values())
    assert spread < 0.02, probabilities
    # Guard: the same model fed grids placed by the field of view moves by more than that.
    predictor.transform = build_transform(replace(predictor.info.input_spec, centring="fov"))
    moved = {name: predictor.predict_volume(volumes[name]).probability for name in ("sagittal", OFFSET)}
    assert abs(moved["sagittal"] - moved[OFFSET]) > 0.02, moved


# --- migraine-node preprocess --------------------------------------------------------------------------

def test_preprocess_command_writes_exactly_what_the_network_sees(tmp_path, tiny_checkpoint, capsys):
    import nibabel as nib

    from node.cli import main

    write_series(tmp_path / "s", slices=40, rows=64, columns=64, spacing=4.0, orientation="obl", subject=SUBJECT)
    out, png = tmp_path / "out" / "input.nii.gz", tmp_path / "out" / "input.png"
    assert main(["preprocess", str(tmp_path / "s"), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--png", str(png)]) == 0
    assert "grid centred on the head" in capsys.readouterr().out
    predictor = Predictor(tiny_checkpoint, device="cpu")
    expected = predictor.preprocess(load_volume(tmp_path / "s"))
    image = nib.load(str(out))
    assert image.shape == tuple(predictor.info.input_spec.shape)
    assert np.array_equal(np.asarray(image.dataobj, dtype=np.float32), expected[0].numpy())
    assert np.allclose(image.affine, preprocess_volume(load_volume(tmp_path / "s"), predictor.info.input_spec).affine)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The NIfTI round-trips as a volume: preprocessing it again on its own grid changes nothing.
    again = preprocess(load_volume(out), replace(predictor.info.input_spec, normalisation="zscore_foreground"))
    assert _corr(again, expected) > 0.99


@pytest.mark.parametrize("args, message", [
    (["MISSING", "--out", "x.nii.gz"], "does not exist"),
    (["SERIES", "--out", "x.png"], "ending in .nii.gz"),
    (["TRUNCATED", "--out", "x.nii.gz"], "cannot be read as a series or NIfTI image"),
    (["SERIES", "--out", "/proc/x.nii.gz"], "cannot be written"),
])
def test_preprocess_command_refuses_clearly(tmp_path, tiny_checkpoint, capsys, args, message):
    import gzip

    from node.cli import main

    write_series(tmp_path / "s", slices=12, rows=24, columns=24, spacing=8.0)
    (tmp_path / "t.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + b"\x00" * 100)[:60])
    names = {"SERIES": str(tmp_path / "s"), "MISSING": str(tmp_path / "MISSING"), "TRUNCATED": str(tmp_path / "t.nii.gz")}
    args = [names.get(a, a) for a in args]
    assert main(["preprocess", *args, "--checkpoint", str(tiny_checkpoint)]) == 1
    assert message in capsys.readouterr().err


def test_the_fast_axis_aligned_resampling_is_the_same_trilinear_interpolation():
    """Every axis permutation and flip, other spacing, grid partly outside the source: the separable
    path gives what torch's grid_sample gives (which an oblique source takes)."""
    import itertools

    from model.preprocess import _resample_grid, _resample_separable, resample

    rng = np.random.default_rng(0)
    array = ndimage.gaussian_filter(rng.normal(size=(20, 30, 25)).astype(np.float32), 1)
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            source = np.eye(4)
            source[:3, :3] = 0
            for axis, (ras, sign) in enumerate(zip(permutation, signs)):
                source[ras, axis] = sign * (1.5, 1.0, 2.0)[axis]
            source[:3, 3] = rng.uniform(-20, 20, 3)
            target = np.diag([1.3, 1.3, 1.3, 1.0])
            source_centre = (source @ np.append((np.asarray(array.shape) - 1) / 2, 1.0))[:3]
            # Centred near the source's centre, a little larger than it along some axes.
            target[:3, 3] = source_centre - 1.3 * (np.asarray((18, 22, 20)) - 1) / 2 + rng.uniform(-6, 6, 3)
            to_source = np.linalg.inv(source) @ target
            expected = _resample_grid(array, to_source, (18, 22, 20))
            assert torch.allclose(_resample_separable(array, to_source, (18, 22, 20)), expected, atol=1e-5)
            assert torch.allclose(resample(array, source, target, (18, 22, 20)), expected, atol=1e-5)
            assert float(expected.abs().sum()) > 0  # the grid overlaps the source
