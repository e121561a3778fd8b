"""Real anatomy for geometry tests: the MNI ICBM152 2009a T1 template (1 mm, brain only) that the
nilearn package ships inside its wheel (no download). Sampled at patient-space points, so the same
brain can be "acquired" in any plane, field of view and slice count by model/synth.py."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def template_path() -> Path:
    spec = importlib.util.find_spec("nilearn")  # located, never imported (it pulls in scikit-learn)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed (make test installs it): no MNI template")
    return Path(next(iter(spec.submodule_search_locations))) / TEMPLATE


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(template_path()))
    return np.asarray(image.dataobj, dtype=np.float32), np.linalg.inv(image.affine)


def mni_intensity(points_lps: np.ndarray, rng: np.random.Generator, noise: float = 8.0) -> np.ndarray:
    """Stored values (about 0-2000) of the MNI brain at LPS points, with scanner-like noise."""
    array, ras_to_voxel = _template()
    ras = points_lps * np.array([-1.0, -1.0, 1.0])
    voxels = ras @ ras_to_voxel[:3, :3].T + ras_to_voxel[:3, 3]
    values = ndimage.map_coordinates(array, np.moveaxis(voxels, -1, 0), order=1, mode="constant", cval=0.0)
    values = values * 8.0 + rng.normal(0, noise, values.shape)
    return np.clip(values, 0, 4095).astype(np.float32)
