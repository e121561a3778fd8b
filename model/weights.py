"""Import weights trained with the authors' code (Kensho Hara's 3D-ResNets).

Hara's ResNet/ResNeXt state_dicts name parameters `conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, …, `layerN.0.downsample.{0,1}.*`, `fc.weight` — the
same names our networks use — but his training script saves
``{"epoch", "arch", "state_dict", "optimizer"}`` and, under DataParallel,
prefixes every key with ``module.``. Both are unwrapped here, then the weights
must fit the architecture exactly (strict load) before a checkpoint is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import CheckpointError, ModelInfo, save_checkpoint
from model.network import build_network
from model.preprocess import InputSpec


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file does not hold a state_dict (a mapping of parameter names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def import_state_dict(
    path: Path, architecture: str, out_dir: Path, *, cutoff: float = 0.5, input_spec: InputSpec, name: str | None
) -> ModelInfo:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except Exception as exc:  # torch raises several types for bad files
        raise CheckpointError(f"{path} cannot be loaded as PyTorch weights: {exc}") from None
    state = unwrap_state_dict(raw)
    model = build_network(architecture)
    expected = model.state_dict()
    # Checkpoints from torch < 1.1 lack BatchNorm's num_batches_tracked counters.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit {architecture}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"weights do not fit {architecture}: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(expected[k].shape)} (is the first convolution 7x7x7 with one input channel?)"
        )
    model.load_state_dict(state, strict=True)
    return save_checkpoint(
        out_dir, model, name=name or f"{architecture}-imported", architecture=architecture, input_spec=input_spec,
        cutoff=cutoff, synthetic=False, training={"imported_from": Path(path).name},
    )
