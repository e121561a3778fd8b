"""CPU runtimes (model/runtime.py): same answer as torch, chosen as configured, exports cached safely."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.runtime as runtime_module
from model.checkpoint import load_checkpoint, save_checkpoint
from model.network import build_network
from model.predict import Predictor
from model.preprocess import InputSpec
from model.runtime import RuntimeUnavailable, cache_key, cache_paths, load_runtime

ROOT = Path(__file__).resolve().parents[2]
SPEC = InputSpec(spacing=(8.0, 8.0, 8.0), shape=(28, 36, 36))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random-initialised ResNet18 saved as a real checkpoint."""
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("runtime-ckpt")
    save_checkpoint(out, build_network("resnet18"), name="runtime-random", architecture="resnet18",
                    input_spec=SPEC, synthetic=True)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, checkpoint):
    """One export shared by the tests that only read it (an export takes seconds)."""
    directory = tmp_path_factory.mktemp("onnx-cache")
    Predictor(checkpoint, device="cpu", runtime="onnxruntime", cache_dir=directory)
    return directory


@pytest.fixture(scope="module")
def inputs():
    # The random network's logits are about +-0.1 (p 0.47, 0.41) at scales 1 and 3; at 10 they are
    # about +-0.6 (p 0.22), where a scale error in the logits moves p far more.
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(1, *SPEC.shape, generator=generator) * scale for scale in (1.0, 3.0, 10.0)]


def eager_logits(checkpoint, tensor: torch.Tensor) -> torch.Tensor:
    """Plain torch: contiguous layout, no runtime in between."""
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(tensor.unsqueeze(0)).float()


def eager_probability(checkpoint, tensor: torch.Tensor) -> float:
    return float(torch.softmax(eager_logits(checkpoint, tensor), dim=1)[0, 1])


@pytest.fixture
def exports(monkeypatch):
    """Counts real exports."""
    calls = []
    real = runtime_module.export_onnx_bytes

    def counting(model, shape):  # noqa: ANN001, ANN202
        calls.append(shape)
        return real(model, shape)

    monkeypatch.setattr(runtime_module, "export_onnx_bytes", counting)
    return calls


@pytest.fixture
def no_export(monkeypatch):
    def refuse(model, shape):  # noqa: ANN001, ANN202
        raise AssertionError("exported although a valid cached export exists")

    monkeypatch.setattr(runtime_module, "export_onnx_bytes", refuse)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_same_probability_as_torch_eager(runtime, checkpoint, cache, inputs):
    predictor = Predictor(checkpoint, device="cpu", runtime=runtime, cache_dir=cache)
    expected = [eager_probability(checkpoint, x) for x in inputs]
    assert abs(expected[0] - expected[1]) > 1e-3  # the inputs tell runtimes apart: a constant answer fails
    assert min(abs(p - 0.5) for p in expected) < 0.1 and max(abs(p - 0.5) for p in expected) > 0.2
    for x, p in zip(inputs, expected):
        # The logits themselves: with logits near 0, |dp| < 1e-3 alone would let a few % scale error through.
        rt_logits, eager = predictor.runtime.logits(x.unsqueeze(0)), eager_logits(checkpoint, x)
        assert rt_logits.shape == eager.shape == (1, 2)
        assert torch.allclose(rt_logits, eager, rtol=1e-3, atol=1e-4), (runtime, rt_logits, eager)
        prediction = predictor.predict_tensor(x)
        assert prediction.runtime == runtime and prediction.device == "cpu"
        assert abs(prediction.probability - p) < 1e-3, (runtime, prediction.probability, p)
        assert prediction.to_json()["runtime"] == runtime


def test_auto_picks_openvino_on_the_cpu(checkpoint, cache, inputs, no_export):
    predictor = Predictor(checkpoint, device="cpu", runtime="auto", cache_dir=cache)
    assert predictor.runtime.name == "openvino" and predictor.predict_tensor(inputs[0]).runtime == "openvino"
    assert predictor.predict_tensor(inputs[0]).device == "cpu"


def test_auto_without_openvino_uses_torch(monkeypatch, caplog, checkpoint, cache, no_export):
    # ONNX Runtime measured no faster than torch on the CPU (bench/infer.py): "auto" does not pick it.
    real_find_spec = runtime_module.importlib.util.find_spec
    monkeypatch.setattr(runtime_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    assert runtime_module.installed_cpu_runtimes() == []
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        assert Predictor(checkpoint, device="cpu", runtime="auto", cache_dir=cache).runtime.name == "torch"
    assert [r.getMessage() for r in caplog.records] == ["runtime auto: openvino not installed: using torch on the CPU"]


def test_auto_keeps_torch_on_cuda(monkeypatch, checkpoint):
    built = []

    class FakeTorch:
        name = "torch"

        def __init__(self, model, device):  # noqa: ANN001
            built.append(device)

    monkeypatch.setattr(runtime_module, "TorchRuntime", FakeTorch)
    model, info = load_checkpoint(checkpoint)
    chosen = load_runtime("auto", model, info, torch.device("cuda"))
    assert isinstance(chosen, FakeTorch) and built == [torch.device("cuda")]


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, caplog, checkpoint, tmp_path, inputs):
    def broken(model, shape):  # noqa: ANN001, ANN202
        raise ValueError("unsupported operator Foo\nmore detail")

    monkeypatch.setattr(runtime_module, "export_onnx_bytes", broken)
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        predictor = Predictor(checkpoint, device="cpu", runtime="auto", cache_dir=tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unsupported operator Foo" in warnings[0].getMessage()
    assert "using torch" in warnings[0].getMessage()
    assert predictor.runtime.name == "torch"
    assert abs(predictor.predict_tensor(inputs[0]).probability - eager_probability(checkpoint, inputs[0])) < 1e-4


def test_explicit_runtime_failure_is_a_clear_error(monkeypatch, checkpoint, tmp_path):
    def broken(model, shape):  # noqa: ANN001, ANN202
        raise ValueError("unsupported operator Foo")

    monkeypatch.setattr(runtime_module, "export_onnx_bytes", broken)
    with pytest.raises(RuntimeUnavailable) as caught:
        Predictor(checkpoint, device="cpu", runtime="openvino", cache_dir=tmp_path)
    message = str(caught.value)
    assert '[model] runtime = "openvino" cannot run runtime-random@' in message
    assert "unsupported operator Foo" in message and 'runtime = "auto"' in message

    real_find_spec = runtime_module.importlib.util.find_spec
    monkeypatch.setattr(runtime_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(RuntimeUnavailable, match="the onnxruntime package is not installed"):
        Predictor(checkpoint, device="cpu", runtime="onnxruntime", cache_dir=tmp_path)

    model, info = load_checkpoint(checkpoint)
    with pytest.raises(RuntimeUnavailable, match='runs on the CPU, but device = "cuda"'):
        load_runtime("openvino", model, info, torch.device("cuda"), device_requested="cuda")
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnxruntime, openvino"):
        load_runtime("tensorrt", model, info, torch.device("cpu"))


def test_both_onnx_runtimes_use_cpu_threads(monkeypatch, checkpoint, cache, no_export):
    """One source of truth for the thread count: without it OpenVINO takes every core in every worker process."""
    monkeypatch.setattr(runtime_module, "cpu_threads", lambda: 1)
    ov = Predictor(checkpoint, device="cpu", runtime="openvino", cache_dir=cache).runtime
    assert int(ov.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    ort = Predictor(checkpoint, device="cpu", runtime="onnxruntime", cache_dir=cache).runtime
    assert ort.session.get_session_options().intra_op_num_threads == 1


def test_cache_is_reused(checkpoint, cache, no_export):
    onnx_path, sidecar = cache_paths(cache, load_checkpoint(checkpoint)[1], (1, 1, *SPEC.shape))
    before = (onnx_path.stat().st_mtime_ns, sidecar.stat().st_mtime_ns)
    Predictor(checkpoint, device="cpu", runtime="openvino", cache_dir=cache)  # no_export: must not export
    assert (onnx_path.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == before
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_mismatched_or_corrupted_cache_is_rebuilt(checkpoint, cache, tmp_path, exports, inputs):
    shutil.copytree(cache, tmp_path / "cache")
    _, info = load_checkpoint(checkpoint)
    shape = (1, 1, *SPEC.shape)
    onnx_path, sidecar = cache_paths(tmp_path / "cache", info, shape)
    expected = eager_probability(checkpoint, inputs[0])

    # Another checkpoint's export under this name: its key says so, and it is not used.
    record = json.loads(sidecar.read_text())
    record["key"]["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(record))
    predictor = Predictor(checkpoint, device="cpu", runtime="onnxruntime", cache_dir=tmp_path / "cache")
    assert len(exports) == 1
    assert json.loads(sidecar.read_text())["key"] == cache_key(info, shape)
    assert abs(predictor.predict_tensor(inputs[0]).probability - expected) < 1e-3

    # Different weights in the .onnx with a sidecar that claims this key: the file's sha256 gives it away.
    torch.manual_seed(99)
    other = runtime_module.export_onnx_bytes(build_network("resnet18").eval(), shape)
    exports.clear()
    onnx_path.write_bytes(other)
    predictor = Predictor(checkpoint, device="cpu", runtime="onnxruntime", cache_dir=tmp_path / "cache")
    assert len(exports) == 1 and onnx_path.read_bytes() != other
    assert abs(predictor.predict_tensor(inputs[0]).probability - expected) < 1e-3

    # Another input shape is another cache entry.
    assert cache_paths(tmp_path, info, (1, 1, 28, 36, 40))[0] != onnx_path
    assert cache_key(info, (1, 1, 28, 36, 40)) != cache_key(info, shape)


def test_no_cache_dir_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch, inputs):
    monkeypatch.setattr(runtime_module.tempfile, "tempdir", str(tmp_path))
    predictor = Predictor(checkpoint, device="cpu", runtime="openvino", cache_dir=None)
    assert list(tmp_path.iterdir()) == []  # exported to a temp dir, removed once the runtime holds the model
    assert abs(predictor.predict_tensor(inputs[0]).probability - eager_probability(checkpoint, inputs[0])) < 1e-3


def test_config_runtime_key(tmp_path, monkeypatch):
    from node.config import load_settings
    from node.errors import ConfigError

    assert load_settings().model.runtime == "auto"
    config = tmp_path / "config.toml"
    config.write_text('[model]\nruntime = "openvino"\n')
    assert load_settings(config).model.runtime == "openvino"
    monkeypatch.setenv("MIGRAINE_NODE_MODEL__RUNTIME", "torch")
    assert load_settings(config).model.runtime == "torch"
    monkeypatch.delenv("MIGRAINE_NODE_MODEL__RUNTIME")
    config.write_text('[model]\nruntime = "tensorrt"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "[model] runtime" in message and "'tensorrt'" in message
    assert all(value in message for value in ("'auto'", "'torch'", "'onnxruntime'", "'openvino'"))


def test_worker_uses_the_configured_runtime_and_cache(tmp_path, checkpoint, cache, no_export):
    from node.config import load_settings
    from node.worker import Worker

    data_dir = tmp_path / "data"
    shutil.copytree(cache, data_dir / "cache")  # the node's cache: <data_dir>/cache
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{data_dir}"\n[model]\ncheckpoint = "{checkpoint}"\n'
                      'device = "cpu"\nruntime = "onnxruntime"\n')
    worker = Worker(load_settings(config), queue=None)
    assert worker.predictor.runtime.name == "onnxruntime"  # no_export: it used <data_dir>/cache


def test_predict_command_runtime_flag(tmp_path, capsys, checkpoint):
    from model.synth import write_series
    from node.cli import main

    write_series(tmp_path / "s", slices=120, rows=48, columns=48, spacing=2.0)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "s"), "--checkpoint", str(checkpoint), "--json", "--no-select",
                 "--runtime", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == "torch" and result["device"] == "cpu"
    assert {"probability", "label", "cutoff", "model_id", "device", "ms", "synthetic"} <= set(result)
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "s"), "--checkpoint", str(checkpoint), "--runtime", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_openvino_never_calls_home(tmp_path):
    """`import openvino` would send a usage event to Intel and write ~/intel/openvino_ga_cid; through
    import_openvino (the only way the node loads it) it does neither."""
    code = ("import sys; from model.runtime import import_openvino; ov = import_openvino(); ov.Core(); "
            "import openvino.tools.ovc as ovc; "
            "assert sys.modules.get('openvino_telemetry') is None, 'telemetry imported'; "
            "assert ovc.telemetry.__class__.__module__.endswith('telemetry_stub'), ovc.telemetry")
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "intel").exists()
    # Guard, read rather than run (a plain import would call out): importing openvino.tools.ovc
    # starts the telemetry, so the checks above look at the path that would send.
    ovc = importlib.util.find_spec("openvino.tools.ovc")
    assert "init_ovc_telemetry" in Path(ovc.origin).read_text()
