from __future__ import annotations

import json

import torch

from model.checkpoint import load_checkpoint
from model.demo import synthetic_items
from model.train import STATE, TrainConfig, train
from tests.conftest import TINY_SPEC


def test_train_writes_best_checkpoint_and_resumes(tmp_path):
    items = synthetic_items(8, seed=3, spec=TINY_SPEC)
    train_items, test_items = items[:6], items[6:]
    config = TrainConfig(epochs=2, batch_size=3, seed=0, device="cpu")
    info = train(train_items, test_items, TINY_SPEC, config, tmp_path, name="unit", synthetic=True, progress=False)
    assert info.synthetic and info.architecture == "resnet18"
    assert info.training["n_train"] == 6 and info.training["n_test"] == 2
    assert info.training["lr"] == 5e-4 and info.training["batch_size"] == 3
    model, loaded = load_checkpoint(tmp_path)
    assert loaded.sha256 == info.sha256
    state = torch.load(tmp_path / STATE, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [0, 1]

    other = TrainConfig(epochs=3, batch_size=3, lr=1e-3, seed=0, device="cpu")
    try:
        train(train_items, test_items, TINY_SPEC, other, tmp_path, name="unit", synthetic=True, progress=False,
              resume=True)
    except ValueError as exc:
        assert "other settings" in str(exc)
    else:
        raise AssertionError("resume with another learning rate must be refused")

    longer = TrainConfig(epochs=3, batch_size=3, seed=0, device="cpu")
    train(train_items, test_items, TINY_SPEC, longer, tmp_path, name="unit", synthetic=True, progress=False,
          resume=True)
    state = torch.load(tmp_path / STATE, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]  # continued, not restarted
