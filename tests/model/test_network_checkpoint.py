from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_info, save_checkpoint
from model.network import ARCHITECTURES, NetworkError, build_network, count_parameters
from model.predict import Predictor, autocast_dtype, resolve_device
from model.synth import write_series
from model.volume import load_volume
from model.weights import import_state_dict
from tests.conftest import TINY_SPEC


def test_paper_resnet18_is_the_hara_network():
    model = build_network("resnet18")
    conv1 = model.conv1
    assert conv1.kernel_size == (7, 7, 7) and conv1.stride == (1, 2, 2) and conv1.in_channels == 1
    assert 32e6 < count_parameters(model) < 34e6  # about 33 M, as the issue says
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and "layer2.0.downsample.0.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gives_two_logits(arch):
    model = build_network(arch).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2)


def test_unknown_architecture():
    with pytest.raises(NetworkError, match="resnet18"):
        build_network("vgg16")


def test_checkpoint_round_trip_and_refusals(tmp_path, tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    assert info.architecture == "resnet18" and info.synthetic is True
    assert info.input_spec == TINY_SPEC
    assert info.model_id.startswith("test-random@") and len(info.sha256) == 64
    assert {"torch", "monai"} <= info.versions.keys()
    assert not model.training

    # Corrupted weights: refused by hash.
    bad = tmp_path / "bad"
    save_checkpoint(bad, build_network("resnet18"), name="x", architecture="resnet18", input_spec=TINY_SPEC,
                    synthetic=True)
    weights = bad / "weights.pt"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)

    # A sidecar claiming another architecture than the weights: refused.
    other = tmp_path / "other"
    save_checkpoint(other, build_network("resnet18"), name="x", architecture="resnet18", input_spec=TINY_SPEC,
                    synthetic=True)
    sidecar = json.loads((other / "model.json").read_text())
    sidecar["architecture"] = "resnet34"
    (other / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="do not fit architecture 'resnet34'"):
        load_checkpoint(other)

    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_info(tmp_path / "nothing")


def test_predictor_on_cpu(tmp_path, tiny_checkpoint):
    write_series(tmp_path / "s", slices=40, rows=48, columns=48, spacing=4.0)
    predictor = Predictor(tiny_checkpoint, device="cuda")  # no GPU here: must fall back to the CPU
    prediction = predictor.predict_volume(load_volume(tmp_path / "s"))
    assert prediction.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert 0.0 <= prediction.probability <= 1.0
    assert prediction.label == ("responder" if prediction.probability >= 0.5 else "non-responder")
    assert prediction.model_id == predictor.info.model_id and prediction.synthetic
    again = predictor.predict_volume(load_volume(tmp_path / "s"))
    assert again.probability == pytest.approx(prediction.probability, abs=1e-6)  # eval mode: deterministic
    # The channels-last fast path computes what the plain network computes.
    model, _ = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        logits = model(predictor.preprocess(load_volume(tmp_path / "s")).unsqueeze(0))
    assert float(torch.softmax(logits, 1)[0, 1]) == pytest.approx(prediction.probability, abs=1e-4)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_import_hara_state_dict(tmp_path):
    """A state_dict as Hara's training script saves it (DataParallel prefix, wrapped) imports unchanged."""
    torch.manual_seed(1)
    source = build_network("resnet18").state_dict()
    wrapped = {"epoch": 100, "arch": "resnet-18", "state_dict": {f"module.{k}": v for k, v in source.items()}}
    torch.save(wrapped, tmp_path / "save_100.pth")
    info = import_state_dict(tmp_path / "save_100.pth", "resnet18", tmp_path / "ckpt", input_spec=TINY_SPEC, name=None,
                             responder_index=1)
    model, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.sha256 == info.sha256 and loaded.synthetic is False
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])

    torch.save(build_network("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="do not fit resnet18"):
        import_state_dict(tmp_path / "r34.pth", "resnet18", tmp_path / "x", input_spec=TINY_SPEC, name=None,
                          responder_index=1)
