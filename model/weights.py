"""Import weights trained with the authors' code (Kensho Hara's 3D-ResNets).

Hara's ResNet/ResNeXt state_dicts name parameters `conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, …, `layerN.0.downsample.{0,1}.*`, `fc.weight` — the
same names our networks use — but his training script saves
``{"epoch", "arch", "state_dict", "optimizer"}`` and, under DataParallel,
prefixes every key with ``module.``. Both are unwrapped here, then the weights
must fit the architecture exactly (strict load) before a checkpoint is written.

Which of the final layer's two outputs is the responder class is not
recorded in the authors' code, so the importer must say
(`responder_index`); with 0 the classifier's two rows are swapped so that our
output 1 is the responder, as everywhere else in this project.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import CheckpointError, ModelInfo, save_checkpoint
from model.network import build_network
from model.preprocess import InputSpec

# The last Linear layer of each network: its output i is class i.
CLASSIFIER = {"densenet121": "class_layers.out"}


def classifier_prefix(architecture: str) -> str:
    return CLASSIFIER.get(architecture, "fc")


def put_responder_last(state: dict[str, torch.Tensor], architecture: str, responder_index: int) -> dict:
    """A copy of `state` whose classifier output 1 is the responder (rows swapped when the authors' was 0)."""
    if responder_index not in (0, 1):
        raise ValueError(f"responder index must be 0 or 1, got {responder_index}")
    if responder_index == 1:
        return dict(state)
    prefix = classifier_prefix(architecture)
    out = dict(state)
    for name in (f"{prefix}.weight", f"{prefix}.bias"):
        if name not in state:
            raise CheckpointError(f"weights do not fit {architecture}: no {name} to reorder")
        if state[name].shape[0] != 2:
            raise CheckpointError(f"{name} has {state[name].shape[0]} outputs, expected 2")
        out[name] = state[name].flip(0).clone()
    return out


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file does not hold a state_dict (a mapping of parameter names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def import_state_dict(
    path: Path, architecture: str, out_dir: Path, *, cutoff: float = 0.5, input_spec: InputSpec, name: str | None,
    responder_index: int,
) -> ModelInfo:
    """Wrap the authors' weights as a checkpoint; `responder_index`: which of their outputs is the responder."""
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
    model.load_state_dict(put_responder_last(state, architecture, responder_index), strict=True)
    return save_checkpoint(
        out_dir, model, name=name or f"{architecture}-imported", architecture=architecture, input_spec=input_spec,
        cutoff=cutoff, synthetic=False,
        training={"imported_from": Path(path).name, "responder_index": responder_index,
                  "responder_index_note": "the output of the imported final layer that is the responder class, as "
                  "given at import; with 0 the classifier rows were swapped so that output 1 is the responder"},
    )
