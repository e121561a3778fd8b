"""What the network sees, for a person to check by eye: the preprocessed input
tensor as NIfTI (with its patient-space affine, so any viewer overlays it on
the source series) and a three-plane PNG through the grid's centre."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.preprocess import Preprocessed


def write_nifti(preprocessed: Preprocessed, path: Path) -> Path:
    """The (1, X, Y, Z) tensor as a 3D float32 NIfTI; its affine maps voxels to RAS mm."""
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: the output must end in .nii or .nii.gz")
    data = preprocessed.tensor[0].detach().cpu().numpy().astype(np.float32)
    image = nib.Nifti1Image(data, preprocessed.affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"migraine-node network input"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _to_ras(preprocessed: Preprocessed) -> np.ndarray:
    """The array with axes flipped/permuted into R, A, S order (display only)."""
    data = preprocessed.tensor[0].detach().cpu().numpy()
    directions = preprocessed.affine[:3, :3]
    order = [int(np.argmax(np.abs(directions[ras]))) for ras in range(3)]
    data = np.transpose(data, order)
    for ras, axis in enumerate(order):
        if directions[ras, axis] < 0:
            data = np.flip(data, axis=ras)
    return data


def write_three_planes(preprocessed: Preprocessed, path: Path, title: str = "") -> Path:
    """Sagittal, coronal and axial slices through the grid centre (patient's right on the viewer's left)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = _to_ras(preprocessed)  # (R, A, S)
    mm_r, mm_a, mm_s = np.abs(preprocessed.affine[:3, :3]).max(axis=1)  # axis-aligned grid: spacing along R, A, S
    cr, ca, cs = (s // 2 for s in data.shape)
    # (name, image with rows = vertical axis, row spacing / column spacing, flip columns for radiological view)
    views = [
        ("sagittal (anterior right)", data[cr, :, :].T, mm_s / mm_a, False),
        ("coronal", data[:, ca, :].T, mm_s / mm_r, True),
        ("axial (anterior up)", data[:, :, cs].T, mm_a / mm_r, True),
    ]
    low, high = np.percentile(data, [1, 99.5])
    fig = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for n, (name, plane, aspect, radiological) in enumerate(views, start=1):
        ax = fig.add_subplot(1, 3, n)
        ax.imshow(plane[:, ::-1] if radiological else plane, cmap="gray", origin="lower", vmin=low, vmax=high,
                  aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "network input", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
