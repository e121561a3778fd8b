"""Where the forward pass runs: torch, or an ONNX export of the network run by
OpenVINO or ONNX Runtime.

Most servers beside a PACS have no GPU. On the CPU, OpenVINO runs the exported
network in about three quarters of torch's time on the same cores, fp32, with
the same answer (bench/infer.py, docs/model.md: it fuses batch norm, ReLU and
the residual adds into its convolutions and runs them near the cores' fp32
peak; ONNX Runtime is no faster than torch). On CUDA torch stays, with bf16/fp16
autocast. `[model] runtime` picks one: "auto" (CUDA: torch; CPU: OpenVINO,
falling back to torch with one warning if it is missing or cannot run), or
"torch", "onnxruntime", "openvino" (failing with a clear message).

The export uses torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, it
needs onnxscript): torch's default since 2.9, while the TorchScript exporter
warns that it "will be removed"; it traces with fake tensors, so exporting at
the paper's input costs no forward pass. Exports are cached as
`<cache_dir>/<arch>-<sha256[:16]>-<D>x<H>x<W>.onnx` with a JSON sidecar of the
key (checkpoint sha256, input shape, torch version, opset) and the file's own
sha256; a cached file is used only when both match, else it is exported again.
Both files are written atomically (temp file + rename) under a lock, since
several worker processes may start together.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from model.checkpoint import ModelInfo, sha256_file

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
# What "auto" may pick on the CPU, fastest first: only runtimes measured faster than torch there
# (bench/infer.py, paper's input, 2 cores: OpenVINO 0.76 of torch's time; ONNX Runtime 1.00, so never).
AUTO_CPU_RUNTIMES = ("openvino",)
OPSET = 18
CACHE_FORMAT = 1
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


class RuntimeUnavailable(RuntimeError):
    """The requested inference runtime cannot run this model on this machine."""


class Runtime(Protocol):
    name: str
    device: torch.device

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(1, 1, D, H, W) float32 on the CPU -> (1, 2) float32 logits on the CPU."""
        ...


def import_openvino():  # noqa: ANN201  the openvino module
    """`import openvino` without its usage telemetry.

    Importing openvino otherwise sends an event to Intel's analytics and writes
    a client id under ~/intel (opt-out, by default on): a node on a hospital
    network must never call out. With the telemetry package masked, OpenVINO
    uses the no-op stub it ships for when that package is absent.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: the import raises ImportError
    import openvino

    return openvino


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None on CPU (fp32 there)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_threads() -> int:
    """Intra-op threads for both ONNX runtimes (ONNX Runtime's intra_op_num_threads, OpenVINO's
    INFERENCE_NUM_THREADS): as many as torch uses, which the worker sets per process."""
    return max(1, torch.get_num_threads())


def installed_cpu_runtimes() -> list[str]:
    """The runtimes "auto" may pick on the CPU that are installed, fastest first."""
    return [name for name in AUTO_CPU_RUNTIMES if importlib.util.find_spec(_PACKAGES[name]) is not None]


class TorchRuntime:
    """The network itself: channels-last-3d (24% faster on CPU at the paper's size), autocast on CUDA."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device, memory_format=torch.channels_last_3d).eval()
        self._amp = autocast_dtype(device)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            if self._amp is not None:
                with torch.autocast(device_type="cuda", dtype=self._amp):
                    out = self.model(batch)
            else:
                out = self.model(batch)
            out = out.float().cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


class OnnxRuntimeRuntime:
    """ONNX Runtime, CPU execution provider, all graph optimisations, fp32."""

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, onnx_path: Path, threads: int | None = None, optimization: str = "ORT_ENABLE_ALL") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
        options.intra_op_num_threads = threads or cpu_threads()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: array})[0].copy())


class OpenVinoRuntime:
    """OpenVINO on the CPU, latency hint, fp32.

    fp32 is forced: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO's default
    inference precision is bf16, 1.7x faster again but it moved the probability
    by up to 1.8e-3 (random weights, 28x36x36 input) and 9.6e-4 at the paper's
    input; the parity budget is 1e-3.
    """

    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, onnx_path: Path, precision: str = "f32", hint: str = "LATENCY", threads: int | None = None) -> None:
        ov = import_openvino()
        core = ov.Core()
        # Without INFERENCE_NUM_THREADS OpenVINO takes every core, in every worker process.
        config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision,
                  "INFERENCE_NUM_THREADS": threads or cpu_threads()}
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        self._request = self.compiled.create_infer_request()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        self._request.infer({0: array})
        return torch.from_numpy(np.array(self._request.get_output_tensor(0).data, dtype=np.float32))


# -- export and cache ---------------------------------------------------------


def cache_key(info: ModelInfo, shape: tuple[int, ...]) -> dict:
    """What a cached export must have been made from to be used."""
    return {
        "format": CACHE_FORMAT,
        "sha256": info.sha256,
        "architecture": info.architecture,
        "input_shape": [int(s) for s in shape],
        "torch": torch.__version__,
        "opset": OPSET,
    }


def cache_paths(cache_dir: Path, info: ModelInfo, shape: tuple[int, ...]) -> tuple[Path, Path]:
    stem = f"{info.architecture}-{info.sha256[:16]}-{'x'.join(str(s) for s in shape[2:])}"
    return cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"


def _cached(onnx_path: Path, sidecar: Path, key: dict) -> str | None:
    """None when the cached export is usable, else why not."""
    if not onnx_path.exists() or not sidecar.exists():
        return "not cached"
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable sidecar ({exc})"
    if recorded.get("key") != key:
        return "its key does not match this checkpoint and input shape"
    if recorded.get("onnx_sha256") != sha256_file(onnx_path):
        return "the file's sha256 does not match its sidecar"
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter warns and logs about its own internals (deprecations, torchvision ops not
    installed, each optimiser pass): nothing the node can act on, and pytest turns warnings into errors."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx_bytes(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The network as an ONNX model (weights inside) for a fixed input shape (1, 1, D, H, W)."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(shape, dtype=torch.float32)
    with _quiet_export():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["image"], output_names=["logits"])
    return program.model_proto.SerializeToString()


def exported_onnx(model: nn.Module, info: ModelInfo, shape: tuple[int, ...], cache_dir: Path) -> Path:
    """The cached export for this checkpoint and input shape, exported now when missing or not matching."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, sidecar = cache_paths(cache_dir, info, shape)
    key = cache_key(info, shape)
    with open(cache_dir / ".onnx-export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one exporter when several workers start together
        why = _cached(onnx_path, sidecar, key)
        if why is None:
            log.debug("using cached ONNX export %s", onnx_path)
            return onnx_path
        if why != "not cached":
            log.info("cached ONNX export %s not used (%s): exporting again", onnx_path, why)
        data = export_onnx_bytes(model, shape)
        _write_atomically(onnx_path, data)
        record = {"key": key, "onnx_sha256": hashlib.sha256(data).hexdigest()}
        _write_atomically(sidecar, (json.dumps(record, indent=2) + "\n").encode())
        log.info("exported %s to ONNX for input %s: %s", info.model_id, "x".join(map(str, shape)), onnx_path)
        return onnx_path


def _build_onnx_runtime(name: str, model: nn.Module, info: ModelInfo, cache_dir: Path | None) -> Runtime:
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        raise RuntimeUnavailable(f"the {_PACKAGES[name]} package is not installed")
    shape = (1, 1, *info.input_spec.shape)
    factory = OpenVinoRuntime if name == "openvino" else OnnxRuntimeRuntime
    writable = cache_dir is not None and _writable(cache_dir)
    if cache_dir is not None and not writable:
        log.warning("ONNX cache %s is not writable: exporting to a temporary folder (again at every start)", cache_dir)
    try:
        if writable:
            return factory(exported_onnx(model, info, shape, cache_dir))
        # Nowhere to keep it: both runtimes hold the model in memory once built, so the file can go.
        with tempfile.TemporaryDirectory(prefix="migraine-node-onnx-") as tmp:
            return factory(exported_onnx(model, info, shape, Path(tmp)))
    except RuntimeUnavailable:
        raise
    except Exception as exc:  # exporter and runtimes raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeUnavailable(f"{type(exc).__name__}: {first}") from exc


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def load_runtime(
    requested: str, model: nn.Module, info: ModelInfo, device: torch.device,
    cache_dir: Path | None = None, device_requested: str = "auto",
) -> Runtime:
    """The runtime `[model] runtime` asks for (see the module docstring for "auto")."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested == "torch" or (requested == "auto" and device.type == "cuda"):
        return TorchRuntime(model, device)
    if requested == "auto":
        installed = installed_cpu_runtimes()
        if not installed:
            log.warning("runtime auto: %s not installed: using torch on the CPU", " or ".join(AUTO_CPU_RUNTIMES))
            return TorchRuntime(model, device)
        try:
            return _build_onnx_runtime(installed[0], model, info, cache_dir)
        except RuntimeUnavailable as exc:
            log.warning("runtime auto: %s cannot run %s (%s); using torch on the CPU", installed[0], info.model_id, exc)
            return TorchRuntime(model, device)
    if device_requested == "cuda" and device.type == "cuda":
        raise RuntimeUnavailable(f'runtime "{requested}" runs on the CPU, but device = "cuda": '
                                 'set [model] device = "cpu" (or "auto"), or runtime = "torch" or "auto"')
    try:
        return _build_onnx_runtime(requested, model, info, cache_dir)
    except RuntimeUnavailable as exc:
        raise RuntimeUnavailable(
            f'[model] runtime = "{requested}" cannot run {info.model_id}: {exc} '
            f'(use runtime = "auto" to fall back to torch, or "torch")'
        ) from exc.__cause__
