"""Tensor -> `Prediction`, on CUDA when present (autocast) or the CPU.

`Predictor` keeps one model loaded for the life of a worker process; the node
builds it once and calls `predict_volume` per job. Which runtime computes the
forward pass (torch, OpenVINO, ONNX Runtime) is model/runtime.py's choice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.checkpoint import ModelInfo, load_checkpoint
from model.preprocess import build_transform, preprocess
from model.runtime import RUNTIMES, Runtime, autocast_dtype, load_runtime
from model.volume import Volume

__all__ = ["RUNTIMES", "Prediction", "Predictor", "autocast_dtype", "resolve_device"]


@dataclass(frozen=True)
class Prediction:
    probability: float  # of response to NSAIDs (the "responder" class)
    label: str  # "responder" | "non-responder"
    cutoff: float
    model_id: str
    device: str
    ms: float  # inference only (preprocessing excluded)
    synthetic: bool
    runtime: str = "torch"  # "torch" | "onnxruntime" | "openvino": what computed the forward pass

    def to_json(self) -> dict:
        return asdict(self)


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' -> CUDA if available else CPU; 'cuda' without a GPU falls back to CPU."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {requested!r}")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Predictor:
    def __init__(self, checkpoint: Path, device: str = "auto", runtime: str = "auto",
                 cache_dir: Path | None = None) -> None:
        """`runtime`: see model/runtime.py; `cache_dir` keeps ONNX exports across starts (None: a temp dir)."""
        self.device = resolve_device(device)
        model, self.info = load_checkpoint(checkpoint, map_location="cpu")
        self.runtime: Runtime = load_runtime(runtime, model, self.info, self.device,
                                             cache_dir=Path(cache_dir) if cache_dir is not None else None,
                                             device_requested=device)
        self.device = self.runtime.device
        self.transform = build_transform(self.info.input_spec)

    @property
    def model_info(self) -> ModelInfo:
        return self.info

    def predict_tensor(self, tensor: torch.Tensor) -> Prediction:
        """`tensor`: (1, D, H, W) preprocessed input."""
        started = time.perf_counter()
        logits = self.runtime.logits(tensor.unsqueeze(0))
        probability = float(torch.softmax(logits.float(), dim=1)[0, 1])
        ms = (time.perf_counter() - started) * 1000
        label = self.info.labels[1] if probability >= self.info.cutoff else self.info.labels[0]
        return Prediction(
            probability=probability,
            label=label,
            cutoff=self.info.cutoff,
            model_id=self.info.model_id,
            device=self.device.type,
            ms=round(ms, 1),
            synthetic=self.info.synthetic,
            runtime=self.runtime.name,
        )

    def preprocess(self, volume: Volume) -> torch.Tensor:
        return preprocess(volume, self.info.input_spec, self.transform)

    def predict_volume(self, volume: Volume) -> Prediction:
        return self.predict_tensor(self.preprocess(volume))
