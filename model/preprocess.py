"""Volume -> network input tensor, exactly as the checkpoint's input spec says.

One MONAI `Compose`: reorient to the spec's patient orientation, resample onto
an axis-aligned grid at the spec's spacing (so sagittal, axial and oblique
acquisitions of the same head give the same tensor), pad/crop around the
centre to the spec's shape, normalise intensities. The paper stacked 1 mm
slices and padded to 256x256x170; its default spec is that grid in RAS order
(left-right 170, posterior-anterior 256, inferior-superior 256).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, NormalizeIntensity, Orientation, ResizeWithPadOrCrop, ScaleIntensityRangePercentiles, Spacing

from model.volume import Volume

NORMALISATIONS = ("zscore_foreground", "zscore_nonzero", "percentile")


@dataclass(frozen=True)
class InputSpec:
    """What the network expects; stored in every checkpoint's sidecar."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] = (170, 256, 256)
    normalisation: str = "zscore_foreground"

    def __post_init__(self) -> None:
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("RLAPSI"):
            raise ValueError(f"orientation must be three of R/L, A/P, S/I, got {self.orientation!r}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive millimetre values, got {self.spacing}")
        if len(self.shape) != 3 or any(int(s) < 8 for s in self.shape):
            raise ValueError(f"shape must be three sizes of at least 8 voxels, got {self.shape}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> InputSpec:
        return cls(
            orientation=str(data["orientation"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            shape=tuple(int(v) for v in data["shape"]),
            normalisation=str(data.get("normalisation", "zscore_foreground")),
        )

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """CLI form: JSON, or 'spacing=4,4,4;shape=44,64,64;orientation=RAS'."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json({**cls().to_json(), **json.loads(text)})
        values = cls().to_json()
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in values:
                raise ValueError(f"unknown input-spec key {key!r} (known: {', '.join(values)})")
            values[key] = value.split(",") if key in ("spacing", "shape") else value.strip()
        return cls.from_json(values)


PAPER_SPEC = InputSpec()
DEMO_SPEC = InputSpec(spacing=(4.0, 4.0, 4.0), shape=(44, 64, 64))


class AntiAlias:
    """Gaussian blur before downsampling (sigma = 0.4 x the zoom factor per axis).

    MONAI's Spacing samples without low-pass filtering; going from 1 mm to
    4 mm that aliases, and the aliasing differs between a sagittal, an axial
    and an oblique acquisition of the same head.
    """

    def __init__(self, target_spacing: tuple[float, float, float]) -> None:
        self.target = np.asarray(target_spacing, dtype=np.float64)

    def __call__(self, img: MetaTensor) -> MetaTensor:
        source = np.asarray(img.pixdim, dtype=np.float64)[:3]
        # Input axes are already in the spec orientation, so they pair with the target spacing.
        sigma = np.where(self.target > source * 1.25, 0.4 * self.target / np.maximum(source, 1e-6), 0.0)
        if not sigma.any():
            return img
        blurred = ndimage.gaussian_filter(img.as_tensor()[0].numpy(), sigma=tuple(sigma))
        return MetaTensor(torch.from_numpy(blurred)[None], meta=img.meta)


class ForegroundZScore:
    """Z-score with mean and standard deviation taken over the head only.

    Foreground: voxels above `fraction` of the 99.5th percentile. Statistics
    over the whole grid would depend on how much air the field of view holds,
    so the same head scanned sagittally and axially would normalise apart.
    Background noise and zero padding both land near the same low value.
    """

    def __init__(self, fraction: float = 0.1) -> None:
        self.fraction = fraction

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        x = x.to(torch.float32)
        flat = x.flatten()
        sample = flat[:: max(1, flat.numel() // 1_000_000)]
        threshold = self.fraction * torch.quantile(sample, 0.995)
        mask = x > threshold
        if int(mask.sum()) < 2:
            return torch.zeros_like(x)
        fg = x[mask]
        return (x - fg.mean()) / fg.std().clamp_min(1e-6)


def build_transform(spec: InputSpec) -> Compose:
    """The preprocessing pipeline for `spec` (input: channel-first MetaTensor)."""
    if spec.normalisation == "zscore_foreground":
        normalise = ForegroundZScore()
    elif spec.normalisation == "zscore_nonzero":
        normalise = NormalizeIntensity(nonzero=True, channel_wise=True)
    else:
        normalise = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    return Compose(
        [
            Orientation(axcodes=spec.orientation.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            AntiAlias(spec.spacing),
            Spacing(pixdim=spec.spacing, diagonal=True, mode="bilinear", padding_mode="zeros"),
            ResizeWithPadOrCrop(spatial_size=spec.shape),
            normalise,
        ]
    )


def to_meta_tensor(volume: Volume) -> MetaTensor:
    """Channel-first tensor carrying the RAS affine MONAI expects."""
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
        affine=torch.as_tensor(volume.ras_affine, dtype=torch.float64),
    )


def preprocess(volume: Volume, spec: InputSpec, transform: Compose | None = None) -> torch.Tensor:
    """(1, *spec.shape) float32 tensor ready for the network (batch axis not added)."""
    out = (transform or build_transform(spec))(to_meta_tensor(volume))
    tensor = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
    return tensor.to(torch.float32).contiguous()
