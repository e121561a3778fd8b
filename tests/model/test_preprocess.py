from __future__ import annotations

import pytest
import torch

from model.preprocess import DEMO_SPEC, PAPER_SPEC, InputSpec, preprocess
from model.synth import Subject, write_series
from model.volume import load_volume


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
