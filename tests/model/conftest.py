from __future__ import annotations

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.network import build_network
from model.preprocess import InputSpec

TINY_SPEC = InputSpec(spacing=(8.0, 8.0, 8.0), shape=(24, 32, 32))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Random-weight ResNet18 at a tiny input spec: fast, and honest about being untrained."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out, build_network("resnet18"), name="test-random", architecture="resnet18",
                    input_spec=TINY_SPEC, cutoff=0.5, synthetic=True, training={"note": "random weights"})
    return out
