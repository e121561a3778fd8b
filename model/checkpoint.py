"""Checkpoints: weights plus a JSON sidecar that drives inference.

Layout of a checkpoint directory:
    weights.pt   torch state_dict, loaded with weights_only=True
    model.json   architecture, input spec, cutoff, label names, library
                 versions, sha256 of weights.pt, training summary, synthetic flag

Preprocessing at inference follows the sidecar's input spec, never constants
in code. The model id on every result is ``<name>@<first 12 hex of sha256>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.network import ARCHITECTURES, build_network
from model.preprocess import InputSpec

WEIGHTS = "weights.pt"
SIDECAR = "model.json"
FORMAT_VERSION = 1
LABELS = ("non-responder", "responder")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match its sidecar."""


@dataclass(frozen=True)
class ModelInfo:
    """The sidecar, as a value that crosses stages (worker, SR builder, CLI)."""

    name: str
    architecture: str
    input_spec: InputSpec
    cutoff: float
    sha256: str
    synthetic: bool
    labels: tuple[str, str] = LABELS
    versions: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    version: str = "1"

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "input_spec": self.input_spec.to_json(),
            "cutoff": self.cutoff,
            "labels": list(self.labels),
            "sha256": self.sha256,
            "synthetic": self.synthetic,
            "versions": self.versions,
            "training": self.training,
        }


def library_versions() -> dict:
    import monai

    return {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    *,
    name: str,
    architecture: str,
    input_spec: InputSpec,
    cutoff: float = 0.5,
    synthetic: bool,
    training: dict | None = None,
    version: str = "1",
) -> ModelInfo:
    """Write weights then sidecar, each atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= cutoff <= 1.0:
        raise CheckpointError(f"cutoff must be within 0..1, got {cutoff}")
    tmp = directory / f".{WEIGHTS}.tmp"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, tmp)
    os.replace(tmp, directory / WEIGHTS)
    info = ModelInfo(
        name=name,
        architecture=architecture,
        input_spec=input_spec,
        cutoff=float(cutoff),
        sha256=sha256_file(directory / WEIGHTS),
        synthetic=synthetic,
        versions=library_versions(),
        training=training or {},
        version=version,
    )
    tmp = directory / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    os.replace(tmp, directory / SIDECAR)
    return info


def read_info(directory: Path) -> ModelInfo:
    path = Path(directory) / SIDECAR
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a checkpoint directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    try:
        if data.get("architecture") not in ARCHITECTURES:
            raise CheckpointError(f"{path}: unknown architecture {data.get('architecture')!r}")
        return ModelInfo(
            name=str(data["name"]),
            architecture=str(data["architecture"]),
            input_spec=InputSpec.from_json(data["input_spec"]),
            cutoff=float(data["cutoff"]),
            sha256=str(data["sha256"]),
            synthetic=bool(data["synthetic"]),
            labels=tuple(data.get("labels", LABELS)),
            versions=dict(data.get("versions", {})),
            training=dict(data.get("training", {})),
            version=str(data.get("version", "1")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: incomplete or invalid sidecar ({exc})") from None


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Network in eval mode plus its sidecar; refuses a corrupted or mismatched checkpoint."""
    directory = Path(directory)
    info = read_info(directory)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights} not found")
    actual = sha256_file(weights)
    if actual != info.sha256:
        raise CheckpointError(
            f"{weights} is corrupted or was replaced: sha256 {actual[:12]}… does not match the sidecar's {info.sha256[:12]}…"
        )
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise CheckpointError(f"{weights} cannot be loaded: {exc}") from None
    model = build_network(info.architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"weights do not fit architecture {info.architecture!r}: {first}") from None
    return model.eval(), info
